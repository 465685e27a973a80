#!/usr/bin/env python3
"""Change what the program computes: double every price on its way into compute().

    python3 examples/change_result.py
"""

import ptprobe
from _build import build_demo


def main() -> None:
    demo = build_demo()

    def double_price(hit: ptprobe.Hit) -> None:
        hit.regs.rsi = hit.regs.rsi * 2       # the second argument

    with ptprobe.run([demo, "4"]) as session:
        session.probe(f"uprobe:{demo}:compute", double_price)
        session.wait()


if __name__ == "__main__":
    main()
