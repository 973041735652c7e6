"""How fast does the served app answer under closed-loop HTTP load, against an empty app, the bare engine and
Ray's own many-models recipe, and does it shed (not collapse) under overload?

One local Ray Serve instance, every Ray port on 127.0.0.1 (serving.app.start_local_ray), runs side by side:
  floor        the same Ingress (FastAPI, tokenization, JSON) bound to a stub model (as many replicas as
               polyhead's model) whose @serve.batch method returns at once: the cost of Ray Serve + the
               ingress alone
  polyhead     build_app(): Ingress -> ModelServer (--replicas replicas of --threads torch threads, each one
               Engine, batches mixing many adapters); default one replica per core, one thread each, as
               deploy/serve_config.yaml ships
  proxied      the same polyhead app reached through Ray Serve's HTTP proxy (the cluster's entry) instead of
               its ingress replica's own port
  multiplexed  benchmarks/multiplexed_peft.py: @serve.multiplexed(max_num_models_per_replica=8), one PEFT
               model per adapter id, @serve.batch (split by Ray per model id), adapter in the
               serve_multiplexed_model_id header; the same replicas and threads as polyhead; through Serve's
               proxy, as Ray's guide serves it (the proxy routes each model id to a replica that has it)
and, right after polyhead's run at each level (its apps idle, so that the machine's drift over the run
cannot tell the two apart):
  engine       serving.Engine.infer in this process, with a torch thread per core, on the same texts
               (tokenization included), at the rows polyhead had in its batches at that level (mean batch
               size x mean replicas computing: one engine doing all the work; 1 row at concurrency 1;
               rows/s = batch / time per call)

Ray runs as `polyhead serve` runs it, with Serve's direct ingress (serving.app.start_local_ray): floor and
polyhead are loaded on their ingress replicas' own ports; --proxy runs every app through Serve's proxy (no
direct ingress; no `proxied` row then).
Load (benchmarks/load_clients.py): closed loop, `wrk` + Lua when installed (else the py client), each request
POST /v1/embeddings or /v1/classify (half each) for a random adapter among 64 PEFT LoRA adapters (r=16,
every encoder linear, 2-label SEQ_CLS head) and one input of exactly 32 or 128 tokens, for --duration s per
level, app and input length. The load generator's own CPU time is reported (it shares the cores).
Batch size and adapters per batch: polyhead's /metrics histograms (as a scrape sees them), the stub's and
the multiplexed replica's own counters. Model loads/s: polyhead's on-demand adapter loads (its warm-up loads
every adapter in every model replica first), the multiplexed replicas' model loads.
Overload: per input length, saturation is the first level after which goodput (200/s) grows < 5 %; the
py client (every answer's latency, by status) runs at that level and at --overload-factor (4) times it,
three times: its clients honouring Retry-After on a 429/503 (as the openai client does: the targets are
checked on this run), retrying at once (a client that ignores the server, reported beside it), and honouring
it beside 1/8 as many clients that reconnect for every request and never wait (what the others are advised).
The tables compare against the serving issue's targets (columns "bound" and "met"). Timings are reported,
never asserted.

    .venv/bin/python benchmarks/serve_load.py [--duration 10] [--levels 1,8,32,128,512] [--tokens 32,128]
    .venv/bin/python benchmarks/serve_load.py --duration 2 --levels 1,8 --out /tmp/sl   # smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
from load_clients import run_py, run_wrk  # noqa: E402
from multiplexed_peft import multiplexed_app  # noqa: E402
from serve_report import APPS, fmt, good, level_table, overload_table, targets_table, write_report  # noqa: E402,F401

RESULTS_DIR = HERE / "results"
N_ADAPTERS = 64
TARGETS = ("query", "key", "value", "dense")  # every encoder linear (make_lora skips the pooler)
PREFIX = {"polyhead": "", "proxied": "", "floor": "/floor", "multiplexed": "/mux"}
SCRAPED = ("polyhead", "proxied")  # batch statistics from the polyhead app's /metrics
GROWTH = 1.05  # saturation: the next level's goodput grows less than this
WARM_PASSES = 12  # polyhead's warm-up: passes over the adapters until each model replica has loaded each
RECONNECTING_SHARE = 8  # the third overload run adds overload concurrency / this many clients that reconnect for
# every request and never wait (load_clients.run_py's `reconnecting`): what the honouring clients are advised then
WORDS = ("the quick brown fox jumps over lazy dog river mountain city house green blue red small large "
         "happy sad fast slow light dark water fire earth wind music book table chair window door road "
         "tree flower garden morning evening night summer winter people friend family school work time").split()


def make_texts(tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    """n random texts of exactly `tokens` tokens (special tokens included) for this tokenizer."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        words = [rng.choice(WORDS) for _ in range(tokens)]
        while len(tokenizer(" ".join(words))["input_ids"]) > tokens:
            words.pop()
        out.append(" ".join(words))
    return out


def floor_app(config: dict, probes: list[dict], work_s: float = 0.0, work: str = "sleep"):
    """The polyhead Ingress on a stub ModelServer that answers every row of a batch at once. probes: the real
    model's answer to the ingress's tokenizer check (serving/app/tokens.py), so the floor has polyhead's ingress.
    work_s > 0: each batch first spends that long on a thread of the replica, as the engine's forward does,
    asleep (work "sleep") or copying 24 MB buffers ("stream": a forward's sweep through memory, which leaves the
    CPU caches cold); its answers then report it as their compute_s (benchmarks/serve_gap.py)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from serving.app.http import Ingress

    hidden = 384

    @serve.deployment(max_ongoing_requests=config["max_ongoing_requests"],
                      max_queued_requests=config["max_queued_requests"], ray_actor_options={"num_cpus": 0.1})
    class StubModel:
        def __init__(self, max_batch_size: int, wait_s: float):
            # answers as large as the real model's: distinct floats cost what real ones do to pickle and to
            # write as JSON (a list of one repeated 0.0 pickles as one memo entry and prints as "0.0")
            self.embedding = [random.Random(i).uniform(-0.2, 0.2) for i in range(hidden)]
            self._batch.set_max_batch_size(max_batch_size)
            self._batch.set_batch_wait_timeout_s(wait_s)
            self.n = {"batches": 0, "rows": 0, "adapters": 0}
            self.thread = ThreadPoolExecutor(max_workers=1) if work_s > 0 else None
            if work_s > 0 and work == "stream":
                import torch

                self.src, self.dst = torch.ones(6 << 20), torch.empty(6 << 20)  # 24 MB each, float32

        def _work(self) -> float:
            start = time.perf_counter()
            if work == "stream":
                while time.perf_counter() - start < work_s:
                    self.dst.copy_(self.src)
            else:
                time.sleep(work_s)
            return time.perf_counter() - start

        def info(self) -> dict:
            return {"model_name": "stub", "max_tokens": 512, "hidden_size": hidden, "vocab_size": 30522,
                    "causal": False, "draining": False, "probes": probes}

        def counts(self) -> dict:
            return dict(self.n, replica=serve.get_replica_context().replica_id.unique_id)

        async def list_adapters(self) -> list:
            return []

        async def infer_rows(self, rows: list[dict]) -> list[dict]:
            return list(await asyncio.gather(*(self.infer(r) for r in rows)))

        async def infer(self, row: dict) -> dict:
            out = await self._batch(row)
            out["load_s"] = None
            return out

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def _batch(self, rows: list[dict]) -> list[dict]:
            compute_s = 0.0
            if self.thread is not None:
                compute_s = await asyncio.get_running_loop().run_in_executor(self.thread, self._work)
            adapters = len({r.get("adapter") for r in rows} - {None})
            self.n["batches"] += 1
            self.n["rows"] += len(rows)
            self.n["adapters"] += adapters
            info = {"batch_size": len(rows), "batch_adapters": adapters, "batch_id": self.n["batches"],
                    "compute_s": compute_s}
            out = []
            for r in rows:
                item = dict(info, task="seq_cls", labels=["LABEL_0", "LABEL_1"])
                if r.get("need") == "embedding":
                    item["embedding"] = list(self.embedding)  # its own list, as each real row has
                else:
                    item["logits"] = [0.8123456789, -0.6123456789]
                out.append(item)
            return out

    model = StubModel.options(num_replicas=config["num_replicas"]).bind(config["max_batch_size"],
                                                                        config["batch_wait_timeout_s"])
    return Ingress.options(ray_actor_options={"num_cpus": config["ingress_num_cpus"]},
                           max_ongoing_requests=1000).bind(model, config)


# batch statistics per app --------------------------------------------------------------------

BATCH_SERIES = r"polyhead_(?:(?:batch_size|batch_adapters|batch_compute_seconds)_(?:sum|count)|adapter_loads_total)"


def scrape(url: str, series: str = BATCH_SERIES) -> dict:
    """The samples of polyhead's /metrics whose names match `series` (a regex), each summed over its labels;
    by default its batch histograms' _sum and _count and its adapter loads (every replica's)."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        m = re.match(rf"^({series})(?:\{{[^}}]*\}})?\s+(\S+)", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def app_counts(app: str, url: str, replicas: int = 1) -> dict:
    """polyhead: its /metrics (every replica's); floor, multiplexed: the counters summed over `replicas`
    replicas (asked through the handle until each has answered)."""
    from ray import serve

    if app in SCRAPED:
        return scrape(url)
    deployment = "StubModel" if app == "floor" else "MultiplexedPeft"
    handle = serve.get_deployment_handle(deployment, app_name=app)
    seen: dict = {}
    deadline = time.monotonic() + 120  # Ray routes to the least busy replica: a loading one answers later
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{deployment}: {len(seen)} of {replicas} replicas answered counts()")
        c = handle.counts.remote().result()
        seen[c.pop("replica")] = c
        if len(seen) < replicas:
            time.sleep(0.05)
    return {k: sum(c[k] for c in seen.values()) for k in next(iter(seen.values()))}


def engine_batch(level: dict, replicas: int) -> int:
    """The in-process reference's batch for a level: the rows polyhead's replicas had in batches together,
    i.e. the mean batch times the mean number of replicas computing (their compute time over the wall time,
    at most `replicas`)."""
    busy = 1.0
    if level.get("batches") and level.get("mean_batch_compute_ms") and level.get("seconds"):
        busy = level["batches"] * level["mean_batch_compute_ms"] / 1000 / level["seconds"]
    return max(1, round(level["mean_batch_size"] * min(float(replicas), max(1.0, busy))))


def batch_stats(app: str, before: dict, after: dict, seconds: float) -> dict:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    if app in SCRAPED:
        n = d.get("polyhead_batch_size_count", 0)
        compute = d.get("polyhead_batch_compute_seconds_sum", 0)
        return {"batches": int(n), "mean_batch_size": d.get("polyhead_batch_size_sum", 0) / n if n else None,
                "mean_batch_adapters": d.get("polyhead_batch_adapters_sum", 0) / n if n else None,
                "mean_batch_compute_ms": 1000 * compute / n if n else None,
                "model_loads": d.get("polyhead_adapter_loads_total", 0),  # on demand, inside the level
                "model_loads_per_s": d.get("polyhead_adapter_loads_total", 0) / seconds if seconds else None}
    if app == "floor":
        n = d["batches"]
        return {"batches": n, "mean_batch_size": d["rows"] / n if n else None,
                "mean_batch_adapters": d["adapters"] / n if n else None}
    n = d["forwards"]  # multiplexed: one adapter per forward by construction
    return {"batches": n, "mean_batch_size": d["rows"] / n if n else None, "mean_batch_adapters": 1.0 if n else None,
            "model_loads": d["loads"], "model_loads_per_s": d["loads"] / seconds if seconds else None,
            "mean_model_load_ms": 1000 * d["load_s"] / d["loads"] if d["loads"] else None}


def wait_idle(app: str, push_s: float, replicas: int = 1) -> None:
    """Let requests the client dropped drain, and the app's metrics reach its /metrics."""
    if app == "multiplexed":
        deadline = time.monotonic() + 60
        while app_counts(app, "", replicas)["ongoing"] and time.monotonic() < deadline:
            time.sleep(0.5)
    time.sleep(max(1.0, push_s + 0.3))


# in-process engine ----------------------------------------------------------------------------

def engine_rows(engine, texts, adapters, batch: int, seconds: float, seed: int) -> dict:
    from serving import Request

    rng = random.Random(seed)

    def make():
        return [Request(adapter=rng.choice(adapters), text=rng.choice(texts)) for _ in range(batch)]

    for _ in range(3):  # warm
        engine.infer(make())
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        reqs = make()
        t = time.perf_counter()
        res = engine.infer(reqs)
        times.append(time.perf_counter() - t)
        bad = [r.error for r in res if r.error]
        if bad:
            raise RuntimeError(f"engine row error: {bad[0]}")
    times.sort()
    med = times[len(times) // 2]
    return {"batch": batch, "calls": len(times), "median_call_ms": med * 1000, "rows_per_s": batch / med}


def engine_at(engine, level: dict, texts, names, args) -> dict | None:
    """The in-process reference for a polyhead level, measured right after it: Engine.infer at the rows its
    replicas had in batches together (engine_batch)."""
    if not good(level) or not level.get("mean_batch_size"):
        return None
    b = engine_batch(level, args.replicas)
    try:
        e = engine_rows(engine, texts, names, b, min(3.0, args.duration), seed=b)
    except Exception as exc:  # noqa: BLE001
        e = {"batch": b, "error": f"{type(exc).__name__}: {exc}"}
    print(f"      engine @batch {b}: " + (f"{e['rows_per_s']:.0f} rows/s, {e['median_call_ms']:.1f} ms per call"
                                          if good(e) else e["error"]), flush=True)
    return e


# saturation, targets --------------------------------------------------------------------------

def saturation(levels: list[dict], app: str) -> dict | None:
    pts = sorted((lv["concurrency"], lv[app]) for lv in levels if good(lv.get(app)))
    if not pts:
        return None
    sat = pts[-1]
    for here, nxt in zip(pts, pts[1:]):
        if nxt[1]["ok_per_s"] < GROWTH * here[1]["ok_per_s"]:
            sat = here
            break
    return {"concurrency": sat[0], "ok_per_s": sat[1]["ok_per_s"], "p99_ms": sat[1]["p99_ms"],
            "peak_ok_per_s": max(r["ok_per_s"] for _, r in pts)}


def overload_summary(sat: dict, ref: dict, over: dict) -> dict:
    peak = max(sat["peak_ok_per_s"], ref["ok_per_s"])
    return {"saturation": sat, "at_saturation": ref, "overload": over, "peak_ok_per_s": peak,
            "goodput_over_peak": over["ok_per_s"] / peak if peak else None,
            "accepted_p99_over_saturation_p99": (over["ok_p99_ms"] / ref["ok_p99_ms"]
                                                 if over["ok_p99_ms"] and ref["ok_p99_ms"] else None)}


def evaluate_targets(runs: list[dict], factor: int) -> list[dict]:
    out = []

    def add(tokens, target, value, unit, bound, met):
        out.append({"tokens": tokens, "target": target, "measured": value, "unit": unit, "bound": bound,
                    "met": met})

    for run in runs:
        tok, lv = run["tokens"], {x["concurrency"]: x for x in run["levels"]}
        one = lv.get(1, {})
        if good(one.get("polyhead")) and good(one.get("floor")) and good(one.get("engine")):
            bound = one["floor"]["p50_ms"] + one["engine"]["median_call_ms"] + 3
            add(tok, "p50 at concurrency 1 <= floor p50 + engine (1 row) + 3 ms", one["polyhead"]["p50_ms"], "ms",
                bound, one["polyhead"]["p50_ms"] <= bound)
        sat = run["saturation"].get("polyhead")
        if sat and good(lv[sat["concurrency"]]["polyhead"]):
            e = lv[sat["concurrency"]].get("engine")
            if good(e):
                ratio = sat["ok_per_s"] / e["rows_per_s"]
                add(tok, f"req/s at saturation >= 0.7x Engine.infer at batch {e['batch']} (128-token target)",
                    ratio, "x", 0.7, (ratio >= 0.7) if tok == 128 else None)
        mux = run["saturation"].get("multiplexed")
        if sat and mux and mux["peak_ok_per_s"]:
            ratio = sat["peak_ok_per_s"] / mux["peak_ok_per_s"]
            add(tok, "peak req/s >= 5x @serve.multiplexed PEFT", ratio, "x", 5.0, ratio >= 5)
        ov = run["overload"].get("polyhead")
        if good(ov):
            o = ov["overload"]
            add(tok, f"goodput at {factor}x saturation >= 0.9x peak", ov["goodput_over_peak"], "x", 0.9,
                ov["goodput_over_peak"] >= 0.9)
            shed = o["shed_p99_ms"]
            add(tok, "shed (429/503) p99 < 50 ms", shed, "ms", 50.0, None if shed is None else shed < 50)
            later = o.get("shed_p99_later_ms")
            add(tok, "  the same, requests sent after the clients' simultaneous start (first second)", later, "ms",
                50.0, None if later is None else later < 50)
            r = ov["accepted_p99_over_saturation_p99"]
            add(tok, "accepted p99 <= 2x p99 at saturation", r, "x", 2.0, None if r is None else r <= 2)
    return out


# report ---------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per level, app and input length")
    ap.add_argument("--levels", default="1,8,32,128,512", help="concurrency levels (default 1,8,32,128,512)")
    ap.add_argument("--tokens", default="32,128", help="input lengths in tokens, specials included (default 32,128)")
    ap.add_argument("--client", choices=["auto", "wrk", "py"], default="auto", help="level sweep's load generator")
    ap.add_argument("--apps", default=",".join(APPS), help=f"apps to load (default {','.join(APPS)})")
    ap.add_argument("--overload-apps", default="polyhead", help="apps given the overload run ('' for none)")
    ap.add_argument("--overload-factor", type=int, default=4)
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process Engine.infer rows")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-s", type=float, default=0.0)
    ap.add_argument("--max-pending-rows", type=int, default=None,
                    help="ServeConfig.max_pending_rows (default: its default, as deploy/serve_config.yaml)")
    ap.add_argument("--max-queue-wait-s", type=float, default=None,
                    help="ServeConfig.max_queue_wait_s (default: its default, as deploy/serve_config.yaml; "
                         "0: a fixed limit of max_pending_rows, as before admission by expected wait)")
    ap.add_argument("--max-models", type=int, default=8, help="multiplexed: max_num_models_per_replica")
    ap.add_argument("--replicas", type=int, default=os.cpu_count() or 1,
                    help="model replicas of polyhead and of the multiplexed app (default: one per core)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model replica (default 1)")
    ap.add_argument("--engine-nice", type=int, default=None, help="ServeConfig.engine_nice (default: its default)")
    ap.add_argument("--max-model-calls", type=int, default=None,
                    help="ServeConfig.max_model_calls (default: its default, 0: one call per request)")
    ap.add_argument("--coalesce-window-ms", type=float, default=None,
                    help="ServeConfig.coalesce_window_ms (default: its default)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="every model's dtype: polyhead's, the multiplexed PEFT models' and the in-process engine's "
                         "(default auto, as deploy/serve_config.yaml: bfloat16 on CPUs with AMX/AVX512-BF16)")
    ap.add_argument("--proxy", action="store_true",
                    help="every app through Serve's proxy (no direct ingress, as before it was the default)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (smoke runs: a temp dir)")
    args = ap.parse_args(argv)
    levels = sorted({int(x) for x in args.levels.split(",") if x})
    token_lengths = [int(x) for x in args.tokens.split(",") if x]
    apps = [a for a in APPS if a in args.apps.split(",") and not (a == "proxied" and args.proxy)]
    overload_apps = [a for a in args.overload_apps.split(",") if a in apps]
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "py")
    load = run_wrk if client == "wrk" else run_py

    import torch
    from transformers import AutoTokenizer

    from serving import Engine
    from serving.app import build_app, direct_ingress_url, free_port, free_ports, load_config, start_local_ray
    from serving.app.tokens import probe_encodings
    from tests.adapter_factory import make_lora

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="polyhead-serve-load-"))
    try:
        base = str(load_config(None).resolved_base_dir())
        tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
        texts = {n: make_texts(tok, 256, n, seed=n) for n in token_lengths}
        torch.set_num_threads(os.cpu_count() or 1)
        engine = Engine.from_pretrained(base, dtype=args.dtype, max_slots=N_ADAPTERS, max_rank=16)
        dtype = str(engine.dtype).removeprefix("torch.")  # what auto resolved to: every app gets the same
        names = [f"lora-{i:02d}" for i in range(N_ADAPTERS)]
        dirs = {name: str(make_lora(tmp / "adapters" / name, engine.schema, seed=100 + i, r=16, alpha=32,
                                    targets=TARGETS, head="SEQ_CLS", num_labels=2))
                for i, name in enumerate(names)}
        print(f"made {N_ADAPTERS} adapters in {time.perf_counter() - t0:.1f} s; client: {client}", flush=True)
        if args.no_engine:
            engine = None
        else:
            for name in names:
                engine.load_adapter(name, dirs[name])

        cfg = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
               "max_ongoing_requests": max(64, args.max_batch_size), "max_queued_requests": 256,
               "num_replicas": args.replicas, "num_threads": args.threads, "max_slots": N_ADAPTERS, "max_rank": 16,
               "dtype": dtype,
               "adapters": dirs}
        if args.max_pending_rows is not None:
            cfg["max_pending_rows"] = args.max_pending_rows
        if args.max_queue_wait_s is not None:
            cfg["max_queue_wait_s"] = args.max_queue_wait_s
        if args.engine_nice is not None:
            cfg["engine_nice"] = args.engine_nice
        if args.max_model_calls is not None:
            cfg["max_model_calls"] = args.max_model_calls
        if args.coalesce_window_ms is not None:
            cfg["coalesce_window_ms"] = args.coalesce_window_ms
        full = load_config(None, **cfg)
        push_s = getattr(full, "metrics_push_s", 0.0)
        ports = None if args.proxy else free_ports(8)  # the ingress replicas' own ports (direct ingress)
        start_local_ray(2 * args.replicas * args.threads + 2, direct_ingress_ports=ports, log_to_driver=False)
        import ray
        from ray import serve

        port = free_port()
        url = f"http://127.0.0.1:{port}"  # Serve's proxy
        urls = {app: url for app in APPS}
        report = {"benchmark": "serve_load", "date": dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version(), "torch": torch.__version__,
                              "ray": ray.__version__},
                  "settings": {"duration_s": args.duration, "levels": levels, "tokens": token_lengths,
                               "adapters": N_ADAPTERS, "rank": 16, "targets": list(TARGETS), "client": client,
                               "overload_client": "py", "overload_factor": args.overload_factor,
                               "entry": ("Serve's proxy for every app" if args.proxy else "direct ingress (floor, "
                                         "polyhead: their ingress replicas' own ports); Serve's proxy for "
                                         "proxied and multiplexed"),
                               "saturation_growth": GROWTH, "max_models_per_replica": args.max_models,
                               "routes": "half /v1/embeddings, half /v1/classify",
                               "app_config": {k: v for k, v in cfg.items() if k != "adapters"}},
                  "app_errors": {}, "runs": []}
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            builders = {
                "polyhead": lambda: build_app(cfg),
                "floor": lambda: floor_app(full.model_dump(), probe_encodings(tok)),
                "multiplexed": lambda: multiplexed_app(
                    base, dirs, max_models=args.max_models, max_batch_size=args.max_batch_size,
                    batch_wait_timeout_s=args.batch_wait_s, num_threads=args.threads, num_cpus=args.threads,
                    max_ongoing_requests=cfg["max_ongoing_requests"],
                    max_queued_requests=cfg["max_queued_requests"], num_replicas=args.replicas, dtype=dtype),
            }
            for app in list(apps):
                try:
                    if app != "proxied":  # the polyhead app, reached through the proxy
                        serve.run(builders[app](), name=app, route_prefix=PREFIX[app] or "/")
                    if ports is not None and app in ("floor", "polyhead"):
                        urls[app] = direct_ingress_url(app, ports)
                    warm(urls[app], app, names if app == "polyhead" else names[:4], texts[token_lengths[0]],
                         replicas=args.replicas if app == "polyhead" else 0)
                except Exception as exc:  # noqa: BLE001 - measure the other apps
                    report["app_errors"][app] = f"{type(exc).__name__}: {exc}"[:2000]
                    print(f"  {app}: not served: {report['app_errors'][app][:300]}", flush=True)
                    apps.remove(app)
            print(f"apps {apps} ready and warm after {time.perf_counter() - t0:.1f} s", flush=True)
            for n in token_lengths:
                report["runs"].append(sweep(urls, apps, overload_apps, levels, texts[n], names, n, args, load,
                                            push_s, tmp, engine))
        finally:
            serve.shutdown()
            ray.shutdown()

        report["targets"] = evaluate_targets(report["runs"], args.overload_factor)
        report["total_seconds"] = time.perf_counter() - t0
        for run in report["runs"]:
            print(f"\n{run['tokens']}-token inputs\n{level_table(run)}")
        print(f"\noverload\n{overload_table(report['runs'], args.overload_factor)}")
        print(f"\ntargets\n{targets_table(report['targets'])}")
        write_report(report, args.out, client)
        print(f"\nwrote {args.out}/serve_load.json, .md, .png in {report['total_seconds']:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def warm(url: str, app: str, names: list[str], texts: list[str], replicas: int = 0, prefix: str | None = None) -> None:
    """Wait for /ready, then one request per adapter, both routes in turn. replicas > 0 (polyhead): each
    adapter's request is sent `replicas` times at once, so Ray's router, which sends a request to the replica
    with fewer in flight, loads it in every model replica; passes repeat until its /metrics count an on-demand
    load of every adapter in each replica (a load in a measured level would count in its latencies), at most
    WARM_PASSES. prefix: the app's route prefix (default: serve_load's for `app`)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    prefix = PREFIX[app] if prefix is None else prefix
    with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(max(1, replicas)) as pool:
        deadline = time.monotonic() + 180
        while app != "multiplexed" and c.get(prefix + "/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{app} not ready")
            time.sleep(0.5)
        for n in range(WARM_PASSES if replicas else 1):
            for i, name in enumerate(names):
                route = ("/v1/embeddings", "/v1/classify")[(i + n) % 2]
                body = {"model": name, "input": texts[i % len(texts)]}
                headers = {"serve_multiplexed_model_id": name} if app == "multiplexed" else None
                for r in pool.map(lambda _: c.post(prefix + route, json=body, headers=headers), range(max(1, replicas))):
                    if r.status_code != 200:
                        raise RuntimeError(f"warm-up {app} {route} {name}: {r.status_code} {r.text[:300]}")
            if replicas:
                time.sleep(1.5)  # the replicas' counters reach the ingress's /metrics (metrics_push_s: 1 s)
                loads = scrape(url + prefix).get("polyhead_adapter_loads_total", 0.0)
                if loads >= len(names) * replicas:
                    print(f"  {app}: {loads:.0f} adapter loads after {n + 1} warm-up pass{'es' if n else ''}", flush=True)
                    return
        if replicas:
            print(f"  {app}: {loads:.0f} of {len(names) * replicas} adapter loads after {WARM_PASSES} warm-up passes: "
                  f"the rest load in the first level", flush=True)


def sweep(urls, apps, overload_apps, levels, texts, names, tokens, args, load, push_s, tmp, engine=None) -> dict:
    """Every level for every app at one input length, then the overload runs; urls: app -> where it is loaded.
    With an engine, each level also gets the in-process reference at polyhead's rows (engine_at)."""
    run = {"tokens": tokens, "replicas": args.replicas, "levels": [], "saturation": {}, "overload": {}}
    for app in apps:
        warm(urls[app], app, names[:4], texts)
    time.sleep(push_s + 0.3)  # the warm-up's metrics reach /metrics before the first level's reading
    for conc in levels:
        lv = {"concurrency": conc}
        for app in apps:
            lv[app] = measure(urls[app], app, conc, texts, names, tokens, args.duration, load, push_s, tmp, args.replicas)
            if app == "polyhead" and engine is not None:
                lv["engine"] = engine_at(engine, lv[app], texts, names, args)
        run["levels"].append(lv)
    for app in apps:
        run["saturation"][app] = saturation(run["levels"], app)
    for app in overload_apps:
        sat = run["saturation"].get(app)
        if sat is None:
            continue
        ref = measure(urls[app], app, sat["concurrency"], texts, names, tokens, args.duration, run_py, push_s, tmp,
                      args.replicas)
        over_conc = args.overload_factor * sat["concurrency"]
        over = measure(urls[app], app, over_conc, texts, names, tokens, args.duration,
                       functools.partial(run_py, honour_retry_after=True), push_s, tmp, args.replicas)
        eager = measure(urls[app], app, over_conc, texts, names, tokens, args.duration, run_py, push_s, tmp, args.replicas)
        flood = functools.partial(run_py, honour_retry_after=True, reconnecting=over_conc // RECONNECTING_SHARE)
        beside = measure(urls[app], app, over_conc, texts, names, tokens, args.duration, flood, push_s, tmp,
                         args.replicas)
        run["overload"][app] = overload_summary(sat, ref, over) if good(ref) and good(over) else \
            {"error": (ref.get("error") or over.get("error") or "?")}
        if good(run["overload"][app]) and good(eager):
            run["overload"][app]["immediate_retry"] = overload_summary(sat, ref, eager)
        if good(run["overload"][app]) and good(beside):
            run["overload"][app]["beside_reconnecting"] = overload_summary(sat, ref, beside)
        if good(run["overload"][app]):
            o = over
            print(f"  overload {app} {tokens} tok c={o['concurrency']}: goodput {o['ok_per_s']:.1f}/s "
                  f"({fmt(run['overload'][app]['goodput_over_peak'], 2)} of peak), 429 {100 * o['share_429']:.1f}% "
                  f"503 {100 * o['share_503']:.1f}%, shed p99 {fmt(o['shed_p99_ms'])} ms (after the first second "
                  f"{fmt(o.get('shed_p99_later_ms'))} ms), accepted p99 "
                  f"{fmt(o['ok_p99_ms'])} ms (at saturation {fmt(ref['ok_p99_ms'])} ms); Retry-After given "
                  f"{o.get('retry_after_s')}, mean batch {fmt(o.get('mean_batch_size'))}", flush=True)
    return run


def measure(url, app, conc, texts, names, tokens, duration, load, push_s, tmp, replicas=1) -> dict:
    prefix = PREFIX[app]
    try:
        before = app_counts(app, url + prefix, replicas)
        res = load(url, prefix, texts, names, conc, duration, seed=conc * 1000 + tokens, tmp=tmp,
                   model_header=app == "multiplexed")
        wait_idle(app, push_s, replicas)
        res.update(batch_stats(app, before, app_counts(app, url + prefix, replicas), res["seconds"]))
    except Exception as exc:  # noqa: BLE001 - keep the other levels
        print(f"  c={conc} {app}: {type(exc).__name__}: {exc}", flush=True)
        return {"error": re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")}
    print(f"  {tokens:3d} tok c={conc:4d} {app:11s} {res['req_per_s']:7.1f} req/s ok {res['ok_per_s']:7.1f}  "
          f"p50 {fmt(res['p50_ms']):>7}  p99 {fmt(res['p99_ms']):>7} ms  shed {100 * res['shed_share']:.1f}%  "
          f"batch {fmt(res.get('mean_batch_size'))}  adapters/batch {fmt(res.get('mean_batch_adapters'))}  "
          f"client CPU {100 * res['client_cpu_share_of_one_core']:.0f}%", flush=True)
    return res


if __name__ == "__main__":
    main()
