"""A/B of two polyhead app configs, side by side in one Ray instance: both apps deployed at once, loaded in turn.

This machine's speed drifts (one config measured 79-137 req/s within 20 minutes), so two serve_load runs
taken minutes apart cannot tell a 20 % change from noise. Here apps `a` and `b` (serve_load's polyhead app
config, each with its own overrides) stay deployed together, and every round loads each once at every level,
in alternating order (a b, b a, ...), with the same closed-loop client (wrk if installed). The idle app costs
next to nothing. Reported per level: each config's median req/s, p50 and p99 over the rounds, and the median
of the per-round ratios b/a, which compares measurements taken seconds apart.

    python benchmarks/serve_ab.py --a '{"coalesce_window_ms": 0}' --b '{"coalesce_window_ms": 4}'
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from load_clients import run_py, run_wrk  # noqa: E402
from serve_load import N_ADAPTERS, TARGETS, batch_stats, fmt, make_texts, scrape, warm  # noqa: E402

VARIANTS = ("a", "b")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="{}", help="JSON ServeConfig overrides of app a")
    ap.add_argument("--b", default="{}", help="JSON ServeConfig overrides of app b")
    ap.add_argument("--levels", default="1,8,32", help="concurrency levels (default 1,8,32)")
    ap.add_argument("--tokens", type=int, default=128, help="input length in tokens, specials included")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per level, app and round")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--client", choices=["auto", "wrk", "py"], default="auto")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="writes serve_ab.json and serve_ab.md here")
    args = ap.parse_args(argv)
    overrides = {"a": json.loads(args.a), "b": json.loads(args.b)}
    levels = sorted({int(x) for x in args.levels.split(",") if x})
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "py")
    load = run_wrk if client == "wrk" else run_py

    from transformers import AutoTokenizer

    from serving.app import build_app, direct_ingress_url, free_ports, load_config, start_local_ray
    from serving import Engine
    from serving.engine import auto_dtype
    from tests.adapter_factory import make_lora

    tmp = Path(tempfile.mkdtemp(prefix="polyhead-serve-ab-"))
    try:
        base_cfg = load_config(None)
        base = str(base_cfg.resolved_base_dir())
        texts = make_texts(AutoTokenizer.from_pretrained(base, local_files_only=True), 256, args.tokens, seed=args.tokens)
        schema = Engine.from_pretrained(base, max_slots=1).schema
        names = [f"lora-{i:02d}" for i in range(N_ADAPTERS)]
        dirs = {name: str(make_lora(tmp / "adapters" / name, schema, seed=100 + i, r=16, alpha=32, targets=TARGETS,
                                    head="SEQ_CLS", num_labels=2)) for i, name in enumerate(names)}
        common = {"max_batch_size": 32, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 64,
                  "max_queued_requests": 256, "max_pending_rows": 64, "num_replicas": os.cpu_count() or 1,
                  "num_threads": 1, "max_slots": N_ADAPTERS, "max_rank": 16, "dtype": auto_dtype("cpu") if args.dtype == "auto" else args.dtype,
                  "adapters": dirs}
        configs = {v: dict(common, **overrides[v]) for v in VARIANTS}
        push_s = load_config(None, **configs["a"]).metrics_push_s
        ports = free_ports(8)
        start_local_ray(4 * (os.cpu_count() or 1) + 2, direct_ingress_ports=ports, log_to_driver=False)
        import ray
        from ray import serve

        report = {"benchmark": "serve_ab", "date": dt.datetime.now().isoformat(timespec="seconds"),
                  "settings": {"tokens": args.tokens, "levels": levels, "rounds": args.rounds,
                               "duration_s": args.duration, "client": client,
                               "common": {k: v for k, v in common.items() if k != "adapters"},
                               "a": overrides["a"], "b": overrides["b"]},
                  "rounds": []}
        try:
            urls = {}
            for v in VARIANTS:
                serve.run(build_app(configs[v]), name=v, route_prefix=f"/{v}")  # Serve wants distinct prefixes
                urls[v] = direct_ingress_url(v, ports) + f"/{v}"
                warm(urls[v].removesuffix(f"/{v}"), "polyhead", names, texts, replicas=configs[v]["num_replicas"],
                     prefix=f"/{v}")
            print(f"a: {overrides['a']}  b: {overrides['b']}  client {client}", flush=True)
            for r in range(args.rounds):
                order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                row = {}
                for conc in levels:
                    for v in order:
                        before = scrape(urls[v])
                        url, prefix = urls[v].rsplit("/", 1)
                        res = load(url, "/" + prefix, texts, names, conc, args.duration, seed=1000 * r + conc, tmp=tmp)
                        time.sleep(max(1.0, push_s + 0.3))
                        res.update(batch_stats("polyhead", before, scrape(urls[v]), res["seconds"]))
                        row[f"{v}@{conc}"] = res
                        print(f"  round {r} c={conc:3d} {v}: {res['ok_per_s']:6.1f} ok/s  p50 {fmt(res['p50_ms'])}  "
                              f"p99 {fmt(res['p99_ms'])} ms  batch {fmt(res.get('mean_batch_size'))}", flush=True)
                report["rounds"].append(row)
        finally:
            serve.shutdown()
            ray.shutdown()
        report["summary"] = summarize(report["rounds"], levels)
        table = summary_table(report["summary"])
        print(f"\n{table}")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_ab.json").write_text(json.dumps(report, indent=1))
        (args.out / "serve_ab.md").write_text(
            f"# serve_ab ({report['date']})\n\n{args.tokens}-token inputs, {args.rounds} rounds x {args.duration} s "
            f"per level and app, client `{client}`, order alternating per round.\n\n"
            f"- a: `{json.dumps(overrides['a'])}`\n- b: `{json.dumps(overrides['b'])}`\n"
            f"- both: `{json.dumps(report['settings']['common'])}`\n\n{table}\n")
        print(f"wrote {args.out}/serve_ab.json, .md")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(rounds: list[dict], levels: list[int]) -> list[dict]:
    out = []
    for conc in levels:
        item = {"concurrency": conc}
        for v in VARIANTS:
            runs = [r[f"{v}@{conc}"] for r in rounds]
            for key in ("ok_per_s", "p50_ms", "p99_ms", "mean_batch_size"):
                vals = [x[key] for x in runs if x.get(key) is not None]
                item[f"{v}_{key}"] = statistics.median(vals) if vals else None
        ratios = [r[f"b@{conc}"]["ok_per_s"] / r[f"a@{conc}"]["ok_per_s"] for r in rounds if r[f"a@{conc}"]["ok_per_s"]]
        item["ratio_ok_per_s"] = statistics.median(ratios) if ratios else None
        item["ratios"] = ratios
        p50s = [r[f"b@{conc}"]["p50_ms"] / r[f"a@{conc}"]["p50_ms"] for r in rounds
                if r[f"a@{conc}"].get("p50_ms") and r[f"b@{conc}"].get("p50_ms")]
        item["ratio_p50"] = statistics.median(p50s) if p50s else None
        out.append(item)
    return out


def summary_table(summary: list[dict]) -> str:
    lines = ["| conc | a ok/s | b ok/s | b/a ok/s (median of rounds) | per round | a p50 ms | b p50 ms | b/a p50 | "
             "a p99 ms | b p99 ms | a batch | b batch |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['concurrency']} | {fmt(s['a_ok_per_s'])} | {fmt(s['b_ok_per_s'])} | "
                     f"{fmt(s['ratio_ok_per_s'], 2)} | {' '.join(fmt(x, 2) for x in s['ratios'])} | "
                     f"{fmt(s['a_p50_ms'])} | {fmt(s['b_p50_ms'])} | {fmt(s['ratio_p50'], 2)} | {fmt(s['a_p99_ms'])} | "
                     f"{fmt(s['b_p99_ms'])} | {fmt(s['a_mean_batch_size'])} | {fmt(s['b_mean_batch_size'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
