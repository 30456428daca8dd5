"""Command line: `python -m harness.report <sweep> [<sweep> ...] [--out <folder>]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.config import output_problem
from harness.report import __doc__ as doc
from harness.report import write_report


def main(argv: list[str] | None = None) -> None:
    """Rebuild the report of sweep folders (merged into one when several)."""
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=(doc or "").split("\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep folders (or single job folders)")
    parser.add_argument("--out", type=Path, help="where to write (default: the first sweep folder)")
    args = parser.parse_args(argv)
    missing = [str(s) for s in args.sweeps if not s.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    problem = None if args.out is None else output_problem(args.out)
    if problem is not None:
        parser.error(f"--out {args.out} {problem}; expected a folder (it is created if missing)")
    try:
        out = write_report(*args.sweeps, out=args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"results: {out}/summary.md, {out}/report.html")


if __name__ == "__main__":
    main()
