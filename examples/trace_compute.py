#!/usr/bin/env python3
"""Trace every compute(qty, price) call of the demo program, and its printf calls in libc.

    python3 examples/trace_compute.py
"""

import ptprobe
from _build import build_demo


def main() -> None:
    demo = build_demo()

    def on_compute(hit: ptprobe.Hit) -> None:
        qty, price = hit.args[0], hit.args[1]
        print(f"[{hit.tid}] compute(qty={qty}, price={price})")

    def on_printf(hit: ptprobe.Hit) -> None:
        print(f"[{hit.tid}] printf({hit.read_str(hit.args[0])!r}, {hit.read_str(hit.args[1])!r}, ...)")

    with ptprobe.run([demo, "4"]) as session:
        compute = session.probe(f"uprobe:{demo}:compute", on_compute)
        printf = session.probe("uprobe:libc.so.6:printf", on_printf)
        status = session.wait()
    print(f"exit status {status}")
    for probe in (compute, printf):
        print(f"{probe.name}: {probe.hits} hits via {', '.join(s.mechanism for s in probe.sites)}")


if __name__ == "__main__":
    main()
