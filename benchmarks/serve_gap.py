"""At concurrency 1, how much time does the serving path add around the model's work, and why is it more than
the empty app's?

serve_load's concurrency-1 target compares polyhead with the floor (the same ingress on a stub model that
answers at once) plus the engine's time for one row. This asks whether the path around the model costs the
same whether the model answers at once or after a forward's time. Stub models only (polyhead's own mean
would include its first loads of adapters, made on demand in each replica). Side by side in one local Ray
Serve instance (serving.app.start_local_ray, direct ingress), loaded in turn, in alternating order, for
--rounds:
  instant      serve_load's floor: the stub model answers at once
  sleep T      the same stub, each batch first sleeping T ms on a thread of its replica (as the engine's
               forward runs on one): the cores are idle meanwhile, or run whatever else is there
  stream T     the same, copying 24 MB buffers for T ms instead (a forward's sweep through memory, which
               leaves the CPU caches cold)
Before Ray starts, the same question for the forward itself: Engine.infer on one row (64 LoRA r=16
adapters, a random one per call) back to back, as serve_load's engine reference measures it, against the
same call after 10 ms asleep, or streaming memory, between calls (as a served forward always comes after
the serving work of its request), on one torch thread and on a thread per core, --rounds alternating.
Each app runs `--replicas` model replicas, each one request at a time from a closed loop of one client
(wrk, else the py client), half /v1/embeddings and half /v1/classify, `--tokens` tokens per input, for 64
adapter names (unknown to a stub: they pass through).
Columns: the client's p50; the ingress's mean end-to-end time (polyhead_request_seconds); the model's work
per batch (T); and the gap = the ingress's
mean wait for the model's answer minus that work (polyhead_queue_seconds: routing, Ray's calls both ways,
the replica's request handling, batching; each answer reports its work). Timings are reported, never
asserted.

    .venv/bin/python benchmarks/serve_gap.py [--work-ms 5,25,60] [--rounds 3] [--duration 6] [--tokens 128]
    .venv/bin/python benchmarks/serve_gap.py --rounds 1 --duration 2 --work-ms 25 --out /tmp/sg   # smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from load_clients import run_py, run_wrk  # noqa: E402
from serve_load import N_ADAPTERS, RESULTS_DIR, TARGETS, floor_app, make_texts, scrape, warm  # noqa: E402

MEANS = {"e2e_ms": "polyhead_request_seconds", "gap_ms": "polyhead_queue_seconds"}


def scrape_means(url: str) -> dict:
    """_sum and _count of the ingress's latency histograms, summed over routes."""
    return scrape(url, r"polyhead_(?:request|queue)_seconds_(?:sum|count)")


def mean_ms(before: dict, after: dict, series: str) -> float | None:
    n = after.get(series + "_count", 0.0) - before.get(series + "_count", 0.0)
    return (after.get(series + "_sum", 0.0) - before.get(series + "_sum", 0.0)) / n * 1e3 if n else None


BETWEEN_MS = 10.0  # work between two forwards in the engine part


def engine_between(base: str, names: list[str], texts: list[str], tmp: Path, tok, rounds: int) -> dict:
    """Median Engine.infer ms for one row, by (torch threads, what runs between calls), over `rounds`."""
    import random

    import torch

    from serving import Engine, Request
    from tests.adapter_factory import make_lora

    engine = Engine.from_pretrained(base, dtype="auto", max_slots=len(names), max_rank=16)
    for i, name in enumerate(names):
        engine.load_adapter(name, str(make_lora(tmp / "adapters" / name, engine.schema, seed=100 + i, r=16, alpha=32,
                                                targets=TARGETS, head="SEQ_CLS", num_labels=2)))
    ids = [tok(t)["input_ids"] for t in texts]
    src, dst = torch.ones(6 << 20), torch.empty(6 << 20)  # 24 MB each

    def between(kind: str) -> None:
        start = time.perf_counter()
        if kind == "sleep":
            time.sleep(BETWEEN_MS / 1000)
        elif kind == "stream":
            while time.perf_counter() - start < BETWEEN_MS / 1000:
                dst.copy_(src)

    def median_ms(kind: str, calls: int = 30) -> float:
        rng, times = random.Random(0), []
        for _ in range(calls + 3):
            between(kind)
            rows = [Request(adapter=rng.choice(names), input_ids=rng.choice(ids))]
            start = time.perf_counter()
            engine.infer(rows)
            times.append(time.perf_counter() - start)
        return statistics.median(times[3:]) * 1e3

    cases = [(t, k) for t in sorted({1, os.cpu_count() or 1}) for k in ("back to back", "sleep", "stream")]
    got: dict = {c: [] for c in cases}
    for rnd in range(rounds):
        for threads, kind in (cases if rnd % 2 == 0 else cases[::-1]):
            torch.set_num_threads(threads)
            got[(threads, kind)].append(median_ms(kind))
    torch.set_num_threads(os.cpu_count() or 1)
    return {f"{t} thread{'s' if t > 1 else ''}, {k}": statistics.median(v) for (t, k), v in got.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-ms", default="5,25,60", help="stub work times in ms (sleep and stream each)")
    ap.add_argument("--stream-ms", default="25", help="work times that also get a stream app ('' for none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per app and round")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--replicas", type=int, default=os.cpu_count() or 1, help="model replicas (default: a core each)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    load = run_wrk if shutil.which("wrk") else run_py
    client = "wrk" if load is run_wrk else "py"

    from transformers import AutoTokenizer

    from serving.app import direct_ingress_url, free_ports, load_config, start_local_ray
    from serving.app.tokens import probe_encodings

    tmp = Path(tempfile.mkdtemp(prefix="polyhead-serve-gap-"))
    try:
        base = str(load_config(None).resolved_base_dir())
        tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
        texts = make_texts(tok, 256, args.tokens, seed=args.tokens)
        names = [f"lora-{i:02d}" for i in range(N_ADAPTERS)]
        cfg = {"max_batch_size": 32, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 64,
               "max_queued_requests": 256, "max_pending_rows": 64, "num_replicas": args.replicas}
        builders = {"instant": lambda full: floor_app(full, probes)}
        work_ms = {"instant": 0.0}
        for ms in (float(x) for x in args.work_ms.split(",") if x):
            builders[f"sleep {ms:g}"] = lambda full, s=ms / 1000: floor_app(full, probes, work_s=s, work="sleep")
            work_ms[f"sleep {ms:g}"] = ms
        for ms in (float(x) for x in args.stream_ms.split(",") if x):
            builders[f"stream {ms:g}"] = lambda full, s=ms / 1000: floor_app(full, probes, work_s=s, work="stream")
            work_ms[f"stream {ms:g}"] = ms
        full = load_config(None, **cfg).model_dump()
        probes = probe_encodings(tok)
        forwards = engine_between(base, names, texts, tmp, tok, args.rounds)
        for case, ms in forwards.items():
            print(f"Engine.infer, one row, {case}: {ms:.1f} ms", flush=True)
        ports = free_ports(2 * len(builders) + 2)
        start_local_ray(2 * args.replicas + 2, direct_ingress_ports=ports, log_to_driver=False)
        import ray
        from ray import serve

        apps = {}
        try:
            for i, (label, build) in enumerate(builders.items()):
                name = f"app{i}"
                serve.run(build(full), name=name, route_prefix=f"/{name}")
                apps[label] = (direct_ingress_url(name, ports), f"/{name}")
                warm(apps[label][0] + apps[label][1], "polyhead", names[:4], texts)  # prefix "": in the url
            rows = {label: [] for label in apps}
            for rnd in range(args.rounds):
                order = list(apps) if rnd % 2 == 0 else list(reversed(apps))
                for label in order:
                    url, prefix = apps[label]
                    before = scrape_means(url + prefix)
                    r = load(url, prefix, texts, names, 1, args.duration, seed=rnd, tmp=tmp)
                    time.sleep(1.2)  # the ingress's histograms reach its /metrics
                    after = scrape_means(url + prefix)
                    row = {"p50_ms": r["p50_ms"], "req_per_s": r["req_per_s"],
                           **{k: mean_ms(before, after, s) for k, s in MEANS.items()}, "work_ms": work_ms[label]}
                    rows[label].append(row)
                    print(f"round {rnd} {label:>10}: p50 {row['p50_ms']:.1f} ms, e2e {row['e2e_ms']:.1f}, "
                          f"work {row['work_ms']:.1f}, gap {row['gap_ms']:.1f}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()

        summary = {label: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for label, rs in rows.items()}
        report = {"benchmark": "serve_gap", "date": dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version(), "ray": ray.__version__},
                  "settings": {"rounds": args.rounds, "duration_s": args.duration, "tokens": args.tokens,
                               "replicas": args.replicas, "client": client,
                               "app_config": cfg},
                  "rounds": rows, "median": summary, "engine_one_row_ms": forwards}
        table = ("| app | p50 ms | ingress e2e ms | model work ms | gap ms | gap - instant's ms |\n"
                 "|---|---|---|---|---|---|\n")
        for label, s in summary.items():
            table += (f"| {label} | {s['p50_ms']:.1f} | {s['e2e_ms']:.1f} | {s['work_ms']:.1f} | {s['gap_ms']:.1f} | "
                      f"{s['gap_ms'] - summary['instant']['gap_ms']:+.1f} |\n")
        table += (f"\n| Engine.infer, one row (median of {args.rounds} rounds' medians) | ms |\n|---|---|\n"
                  + "".join(f"| {case}{'' if 'back' in case else f' {BETWEEN_MS:g} ms between calls'} | {ms:.1f} |\n"
                            for case, ms in forwards.items()))
        print("\n" + table)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_gap.json").write_text(json.dumps(report, indent=1))
        (args.out / "serve_gap.md").write_text(
            f"# serve_gap ({report['date']})\n\nConcurrency 1, {args.tokens}-token inputs, client `{client}`, "
            f"{args.replicas} model replicas per app, medians of {args.rounds} alternating rounds of "
            f"{args.duration:g} s. gap = the ingress's mean wait for the model's answer minus the model's work "
            f"(`polyhead_queue_seconds`).\n\n{table}")
        print(f"wrote {args.out}/serve_gap.json and .md")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
