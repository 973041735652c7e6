"""`polyhead` command line. `serve` and `adapters` arrive with the serving issue."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polyhead", description="Many adapters, one frozen base model.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="run benchmarks/engine_throughput.py (from a source checkout)")
    sub.add_parser("serve", help="run the HTTP server (not available yet)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        print("polyhead serve: the HTTP server arrives with the serving issue; not available yet", file=sys.stderr)
        return 1
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_throughput.py"
    if not script.is_file():
        print(f"polyhead bench: {script} not found (benchmarks ship with the source checkout)", file=sys.stderr)
        return 1
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
