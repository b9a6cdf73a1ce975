"""Run benchmark sections: ``python -m pmedit.bench [SECTION ...] [--quick] [--json PATH]``."""
from __future__ import annotations

import argparse
import sys
import time

from pmedit.bench import sections
from pmedit.bench.harness import format_table
from pmedit.fileio import atomic_write_json, machine_info


def main(argv: list[str] | None = None) -> int:
    available = sections()
    parser = argparse.ArgumentParser(prog="python -m pmedit.bench", description=__doc__)
    parser.add_argument("sections", nargs="*", help=f"sections to run (default: all): {', '.join(available)}")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a few minutes in all)")
    parser.add_argument("--json", metavar="PATH", help="write the figures and machine info as JSON")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, mod in available.items():
            print(f"{name:12s} {getattr(mod, 'HELP', '')}")
        return 0
    unknown = [s for s in args.sections if s not in available]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; available: {list(available)}")
    chosen = args.sections or list(available)
    info = machine_info()
    print(f"# pmedit.bench on {info['cpu_model']} ({info['cpu_count']} cores)"
          + (f", {info['cuda']['device']}" if info["cuda"] else "") + f", torch {info['torch']}", flush=True)
    all_rows, results = [], {"machine": info, "quick": args.quick, "sections": {}}
    for name in chosen:
        t0 = time.perf_counter()
        print(f"\n## {name}", flush=True)
        rows = available[name].run(quick=args.quick)
        print(format_table(rows), flush=True)
        print(f"({time.perf_counter() - t0:.1f} s)", flush=True)
        all_rows.extend(rows)
        results["sections"][name] = [r.to_dict() for r in rows]
    if args.json:
        atomic_write_json(args.json, results, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
