"""Build examples/demo.c into build/ (shared by the example scripts)."""

import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(os.path.dirname(HERE), "build")


def build_demo() -> str:
    """Compile demo.c with a 5-byte NOP at each function entry; return the binary's path."""
    os.makedirs(BUILD, exist_ok=True)
    obj = os.path.join(BUILD, "demo.o")
    exe = os.path.join(BUILD, "demo")
    subprocess.run(["gcc", "-O1", "-g", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-c", "-o", obj,
                    os.path.join(HERE, "demo.c")], check=True)
    subprocess.run(["gcc", "-no-pie", "-o", exe, obj], check=True)
    return exe
