"""Fuzz every input parser with many more examples than CI runs (tests/fuzzing.py).

    .venv/bin/python -m bench.fuzz --examples 2000
    .venv/bin/python -m bench.fuzz --examples 500 ws mqtt

Prints, per parser, how many examples ran and how they were answered, and the failure found
(hypothesis's shrunk example, with a ``@reproduce_failure`` blob); exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # decoding garbage images warns a lot

from tests.fuzzing import PROPERTIES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="examples per parser")
    parser.add_argument("parsers", nargs="*", metavar="PARSER",
                        help=f"some of: {', '.join(PROPERTIES)} (default: all)")
    args = parser.parse_args()
    if unknown := set(args.parsers) - set(PROPERTIES):
        parser.error(f"unknown parser {', '.join(sorted(unknown))}; choose from {', '.join(PROPERTIES)}")
    failed: list[str] = []
    for name in args.parsers or PROPERTIES:
        prop = PROPERTIES[name]
        print(f"{name}: {prop.what} …", flush=True)
        start = time.monotonic()
        try:
            outcomes = prop.run(args.examples)
        except Exception as e:  # the failure hypothesis found (and shrank)
            failed.append(name)
            print(f"{name}: FAILED after {time.monotonic() - start:.0f} s", flush=True)
            traceback.print_exception(e, limit=-3)
            continue
        total = sum(outcomes.values())
        print(f"{name}: {total} examples, no failure, {time.monotonic() - start:.0f} s")
        for label, n in outcomes.most_common():
            print(f"  {n:6d}  {label}")
    print(f"failed: {', '.join(failed)}" if failed else "no failure found", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
