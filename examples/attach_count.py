#!/usr/bin/env python3
"""Attach to a running demo program for half a second, count compute() calls, detach.

    python3 examples/attach_count.py
"""

import subprocess
import threading

import ptprobe
from _build import build_demo


def main() -> None:
    demo = build_demo()
    proc = subprocess.Popen([demo, "100000000"], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()                         # it is running
    threading.Thread(target=proc.stdout.read, daemon=True).start()   # keep its pipe drained
    with ptprobe.attach(proc.pid) as session:
        probe = session.probe(f"uprobe:{demo}:compute")
        session.wait(timeout=0.5)
    # detached: the program runs on, unharmed, with its original code
    print(f"{probe.hits} calls of compute() in 0.5 s, via {probe.sites[0].mechanism}")
    proc.kill()
    proc.wait()


if __name__ == "__main__":
    main()
