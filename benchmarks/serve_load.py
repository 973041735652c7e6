"""How fast does the served app answer under closed-loop HTTP load, against an empty app and the bare engine?

A local Ray Serve instance on 127.0.0.1 runs, side by side in one run:
  floor      the same Ingress (FastAPI, tokenization, JSON) bound to a stub model deployment whose
             @serve.batch method returns at once: the cost of Ray Serve + the ingress alone
  polyhead   build_app(): Ingress -> ModelServer (one Engine, batched over many adapters)
  engine     serving.Engine.infer in this process on the same texts (tokenization included), at the
             mean batch size the server formed at that level (rows/s = batch / time per call)

Load: `wrk` (C, a Lua script) when it is installed, else an asyncio httpx client in its own process;
either way the load generator's CPU time is measured and reported (it shares the 2 cores with the server).
Each request is POST /v1/embeddings or /v1/classify (half each) for a random adapter among 64 random
PEFT LoRA adapters (r=16, every encoder linear, a 2-label SEQ_CLS head), one input of ~32 tokens
(--tokens 128 for longer inputs), closed loop at each concurrency level (a level runs --duration s).
Mean batch size and distinct adapters per batch come from the app's /metrics histograms
(polyhead_batch_size, polyhead_batch_adapters), read before and after each level.
Timings are reported, never asserted.

    .venv/bin/python benchmarks/serve_load.py [--duration 10] [--levels 1,8,32,128] [--tokens 32] [--with-512]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS_DIR = Path(__file__).resolve().parent / "results"
N_ADAPTERS = 64
TARGETS = ("query", "key", "value", "dense")  # every encoder linear (make_lora skips the pooler)
WORDS = ("the quick brown fox jumps over lazy dog river mountain city house green blue red small large "
         "happy sad fast slow light dark water fire earth wind music book table chair window door road "
         "tree flower garden morning evening night summer winter people friend family school work time").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# the stub model behind the floor app ----------------------------------------------------------

def floor_app(config: dict):
    from ray import serve

    from serving.app.http import Ingress

    hidden = 384

    @serve.deployment(max_ongoing_requests=config["max_ongoing_requests"],
                      max_queued_requests=config["max_queued_requests"], ray_actor_options={"num_cpus": 0.1})
    class StubModel:
        def __init__(self, max_batch_size: int, wait_s: float):
            self._batch.set_max_batch_size(max_batch_size)
            self._batch.set_batch_wait_timeout_s(wait_s)
            self.n = 0

        def info(self) -> dict:
            return {"model_name": "stub", "max_tokens": 512, "hidden_size": hidden, "vocab_size": 30522,
                    "causal": False}

        async def stats(self) -> dict:
            return {}

        async def list_adapters(self) -> list:
            return []

        async def infer(self, row: dict) -> dict:
            out = await self._batch(row)
            out["load_s"] = None
            return out

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def _batch(self, rows: list[dict]) -> list[dict]:
            self.n += 1
            info = {"batch_size": len(rows), "batch_adapters": len({r.get("adapter") for r in rows} - {None}),
                    "batch_id": self.n, "compute_s": 0.0}
            out = []
            for i, r in enumerate(rows):
                item = dict(info, batch_first=i == 0, task="seq_cls", labels=["LABEL_0", "LABEL_1"])
                if r.get("need") == "embedding":
                    item["embedding"] = [0.0] * hidden
                else:
                    item["logits"] = [0.0, 0.0]
                out.append(item)
            return out

    model = StubModel.bind(config["max_batch_size"], config["batch_wait_timeout_s"])
    return Ingress.options(ray_actor_options={"num_cpus": config["ingress_num_cpus"]},
                           max_ongoing_requests=1000).bind(model, config)


# /metrics -------------------------------------------------------------------------------------

def scrape(url: str) -> dict:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(polyhead_(?:batch_size|batch_adapters|batch_compute_seconds)_(?:sum|count))\s+(\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def batch_stats(before: dict, after: dict) -> dict:
    def mean(name):
        n = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        s = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
        return (s / n if n else None), n

    size, batches = mean("polyhead_batch_size")
    adapters, _ = mean("polyhead_batch_adapters")
    compute, _ = mean("polyhead_batch_compute_seconds")
    return {"batches": int(batches), "mean_batch_size": size, "mean_batch_adapters": adapters,
            "mean_batch_compute_ms": compute * 1000 if compute is not None else None}


# load generators ------------------------------------------------------------------------------

WRK_LUA = r"""
local texts = {%(texts)s}
local adapters = {%(adapters)s}
local prefix = "%(prefix)s"
local threads = {}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end
function init(args)
  math.randomseed(%(seed)d + tid * 7919)
  n200 = 0; n429 = 0; n503 = 0; nother = 0
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  local text = texts[math.random(#texts)]
  local adapter = adapters[math.random(#adapters)]
  local body = '{"model":"' .. adapter .. '","input":"' .. text .. '"}'
  if math.random(2) == 1 then
    return wrk.format("POST", prefix .. "/v1/embeddings", nil, body)
  end
  return wrk.format("POST", prefix .. "/v1/classify", nil, body)
end
function response(status, headers, body)
  if status == 200 then n200 = n200 + 1
  elseif status == 429 then n429 = n429 + 1
  elseif status == 503 then n503 = n503 + 1
  else nother = nother + 1 end
end
function done(summary, latency, requests)
  local c = {n200 = 0, n429 = 0, n503 = 0, nother = 0}
  for _, t in ipairs(threads) do
    for k, _ in pairs(c) do c[k] = c[k] + t:get(k) end
  end
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p95_us": %%d, ' ..
    '"p99_us": %%d, "mean_us": %%f, "max_us": %%d, "n200": %%d, "n429": %%d, "n503": %%d, "nother": %%d, ' ..
    '"err_connect": %%d, "err_read": %%d, "err_write": %%d, "err_timeout": %%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, latency.max, c.n200, c.n429, c.n503, c.nother, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
"""


def run_wrk(base: str, prefix: str, texts, adapters, conc: int, duration: float, seed: int, tmp: Path) -> dict:
    script = tmp / f"load_{seed}.lua"
    script.write_text(WRK_LUA % {"texts": ", ".join(json.dumps(t) for t in texts),
                                 "adapters": ", ".join(json.dumps(a) for a in adapters),
                                 "prefix": prefix, "seed": seed})
    threads = min(2, conc)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(["wrk", "-t", str(threads), "-c", str(conc), "-d", f"{max(1, round(duration))}s", "--timeout", "30s",
                           "-s", str(script), base], capture_output=True, text=True, timeout=duration + 120)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: rc={proc.returncode} {proc.stdout[-500:]} {proc.stderr[-500:]}")
    r = json.loads(line[len("WRKJSON "):])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    total = r["requests"]
    secs = r["duration_us"] / 1e6
    return {"client": "wrk", "requests": total, "seconds": secs, "req_per_s": total / secs if secs else 0,
            "ok_per_s": r["n200"] / secs if secs else 0,
            "p50_ms": r["p50_us"] / 1000, "p95_ms": r["p95_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "max_ms": r["max_us"] / 1000, "n200": r["n200"], "n429": r["n429"], "n503": r["n503"],
            "nother": r["nother"], "socket_errors": r["err_connect"] + r["err_read"] + r["err_write"],
            "timeouts": r["err_timeout"],
            "shed_share": (r["n429"] + r["n503"]) / total if total else 0.0,
            "client_cpu_s": cpu, "client_cpu_share_of_one_core": cpu / wall}


def httpx_worker(args_json: str) -> None:
    """Child process: closed-loop asyncio httpx client; prints one JSON line with latencies and its own CPU."""
    import httpx

    a = json.loads(args_json)
    rng = random.Random(a["seed"])
    lat, codes = [], {}

    async def one(client, deadline):
        while time.perf_counter() < deadline:
            route = "/v1/embeddings" if rng.random() < 0.5 else "/v1/classify"
            body = {"model": rng.choice(a["adapters"]), "input": rng.choice(a["texts"])}
            t = time.perf_counter()
            try:
                resp = await client.post(a["prefix"] + route, json=body)
                code = resp.status_code
            except httpx.HTTPError:
                code = -1
            lat.append(time.perf_counter() - t)
            codes[code] = codes.get(code, 0) + 1

    async def main():
        limits = httpx.Limits(max_connections=a["conc"], max_keepalive_connections=a["conc"])
        async with httpx.AsyncClient(base_url=a["base"], timeout=30, limits=limits) as client:
            start = time.perf_counter()
            deadline = start + a["duration"]
            await asyncio.gather(*[one(client, deadline) for _ in range(a["conc"])])
            return time.perf_counter() - start

    secs = asyncio.run(main())
    t = os.times()
    print("HTTPXJSON " + json.dumps({"lat": lat, "codes": codes, "seconds": secs, "cpu_s": t.user + t.system}))


def run_httpx(base, prefix, texts, adapters, conc, duration, seed, tmp) -> dict:
    import numpy as np

    arg = json.dumps({"base": base, "prefix": prefix, "texts": texts, "adapters": adapters, "conc": conc,
                      "duration": duration, "seed": seed})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--httpx-worker", arg], capture_output=True, text=True,
                          timeout=duration + 180)
    wall = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("HTTPXJSON ")), None)
    if line is None:
        raise RuntimeError(f"httpx worker gave no result: {proc.stderr[-800:]}")
    r = json.loads(line[len("HTTPXJSON "):])
    lat = np.asarray(r["lat"]) * 1000
    codes = {int(k): v for k, v in r["codes"].items()}
    total = len(lat)
    shed = codes.get(429, 0) + codes.get(503, 0)
    return {"client": "httpx", "requests": total, "seconds": r["seconds"], "req_per_s": total / r["seconds"],
            "ok_per_s": codes.get(200, 0) / r["seconds"],
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "n200": codes.get(200, 0), "n429": codes.get(429, 0), "n503": codes.get(503, 0),
            "nother": total - codes.get(200, 0) - shed - codes.get(-1, 0), "socket_errors": codes.get(-1, 0),
            "timeouts": 0, "shed_share": shed / total if total else 0.0,
            "client_cpu_s": r["cpu_s"], "client_cpu_share_of_one_core": r["cpu_s"] / wall}


# in-process engine ----------------------------------------------------------------------------

def engine_rows(engine, texts, adapters, batch: int, seconds: float, seed: int) -> dict:
    from serving.engine import Request

    rng = random.Random(seed)

    def make():
        return [Request(adapter=rng.choice(adapters), text=rng.choice(texts)) for _ in range(batch)]

    engine.infer(make())  # warm
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


# main -----------------------------------------------------------------------------------------

def fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(levels: list[dict]) -> str:
    head = ("| conc | app | req/s | p50 ms | p95 ms | p99 ms | shed % | other err | mean batch | adapters/batch "
            "| batch compute ms | client CPU % | engine rows/s @batch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for lv in levels:
        for app in ("floor", "polyhead"):
            r = lv.get(app)
            if r is None:
                continue
            if "error" in r:
                msg = " ".join(r["error"].split())[:80].replace("|", "/")
                lines.append(f"| {lv['concurrency']} | {app} | error: {msg} |" + " |" * 10)
                continue
            eng = lv.get("engine") if app == "polyhead" else None
            eng_s = "-" if not eng else (f"{eng['rows_per_s']:.0f} @{eng['batch']}" if "rows_per_s" in eng
                                         else "error")
            lines.append(
                f"| {lv['concurrency']} | {app} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {100 * r['shed_share']:.1f} | {r['nother'] + r['socket_errors'] + r['timeouts']} | "
                f"{fmt(r.get('mean_batch_size'))} | {fmt(r.get('mean_batch_adapters'))} | "
                f"{fmt(r.get('mean_batch_compute_ms'))} | {100 * r['client_cpu_share_of_one_core']:.0f} | {eng_s} |")
    return "\n".join(lines)


def plot(levels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for app, color in (("floor", "tab:gray"), ("polyhead", "tab:blue")):
        pts = [(lv[app]["req_per_s"], lv[app]["p50_ms"], lv[app]["p99_ms"], lv["concurrency"])
               for lv in levels if app in lv and "error" not in lv[app]]
        if not pts:
            continue
        x, p50, p99, c = zip(*pts)
        ax.plot(x, p50, "o-", color=color, label=f"{app} p50")
        ax.plot(x, p99, "s--", color=color, label=f"{app} p99")
        for xi, yi, ci in zip(x, p99, c):
            ax.annotate(f"c={ci}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("serve_load: closed-loop latency vs throughput (127.0.0.1, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per level and app (default 10)")
    ap.add_argument("--levels", default="1,8,32,128", help="concurrency levels (default 1,8,32,128)")
    ap.add_argument("--with-512", action="store_true", help="add concurrency 512")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per input, specials included (32 or 128)")
    ap.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto")
    ap.add_argument("--apps", default="floor,polyhead", help="which apps to load (default floor,polyhead)")
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process Engine.infer rows")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-s", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in the model replica")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--httpx-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.httpx_worker:
        httpx_worker(args.httpx_worker)
        return
    levels = [int(x) for x in args.levels.split(",") if x]
    if args.with_512 and 512 not in levels:
        levels.append(512)
    apps = [a for a in args.apps.split(",") if a]
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    load = run_wrk if client == "wrk" else run_httpx

    import httpx
    import ray
    import torch
    from ray import serve
    from transformers import AutoTokenizer

    from adapters_store import BaseSchema  # noqa: F401 (make_lora's import, fail early)
    from serving import Engine
    from serving.app import build_app, load_config
    from tests.adapter_factory import make_lora

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="polyhead-serve-load-"))
    try:
        base = str(load_config(None).resolved_base_dir())
        tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
        texts = make_texts(tok, 256, args.tokens, seed=0)
        torch.set_num_threads(os.cpu_count() or 1)
        engine = Engine.from_pretrained(base, max_slots=N_ADAPTERS, max_rank=16)
        names = [f"lora-{i:02d}" for i in range(N_ADAPTERS)]
        dirs = {}
        for i, name in enumerate(names):
            dirs[name] = str(make_lora(tmp / "adapters" / name, engine.schema, seed=100 + i, r=16, alpha=32,
                                       targets=TARGETS, head="SEQ_CLS", num_labels=2))
        print(f"made {N_ADAPTERS} adapters in {time.perf_counter() - t0:.1f} s; client: {client}", flush=True)

        cfg = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
               "max_ongoing_requests": max(64, args.max_batch_size), "max_queued_requests": 256,
               "num_threads": args.threads, "max_slots": N_ADAPTERS, "max_rank": 16,
               "adapters": dirs}
        port = free_port()
        ray.init(num_cpus=max(4, (os.cpu_count() or 1) + 1), _node_ip_address="127.0.0.1",
                 include_dashboard=False, log_to_driver=False)
        url = f"http://127.0.0.1:{port}"
        report = {"benchmark": "serve_load", "date": dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                              "torch": torch.__version__, "ray": ray.__version__},
                  "settings": {"duration_s": args.duration, "levels": levels, "tokens": args.tokens,
                               "adapters": N_ADAPTERS, "rank": 16, "targets": list(TARGETS), "client": client,
                               "routes": "half /v1/embeddings, half /v1/classify",
                               "app_config": {k: v for k, v in cfg.items() if k != "adapters"}},
                  "levels": []}
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            full = load_config(None, **cfg).model_dump()
            prefixes = {}
            if "polyhead" in apps:
                serve.run(build_app(cfg), name="polyhead", route_prefix="/")
                prefixes["polyhead"] = ""
            if "floor" in apps:
                serve.run(floor_app(full), name="floor", route_prefix="/floor")
                prefixes["floor"] = "/floor"
            with httpx.Client(base_url=url, timeout=120) as c:
                for app, prefix in prefixes.items():
                    deadline = time.monotonic() + 120
                    while c.get(prefix + "/ready").status_code != 200:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{app} not ready")
                        time.sleep(0.5)
                # warm: load every adapter once on both routes (on-demand loads stay out of the levels)
                for prefix in prefixes.values():
                    for name in names:
                        for route in ("/v1/embeddings", "/v1/classify"):
                            r = c.post(prefix + route, json={"model": name, "input": texts[0]})
                            if r.status_code != 200:
                                raise RuntimeError(f"warm-up {prefix}{route} {name}: {r.status_code} {r.text[:300]}")
            print(f"apps ready and warm after {time.perf_counter() - t0:.1f} s", flush=True)

            for conc in levels:
                lv = {"concurrency": conc}
                for app, prefix in prefixes.items():
                    before = scrape(url + prefix)
                    try:
                        res = load(url, prefix, texts, names, conc, args.duration, seed=conc, tmp=tmp)
                    except Exception as exc:  # noqa: BLE001 - keep the other levels
                        lv[app] = {"error": f"{type(exc).__name__}: {exc}"}
                        print(f"  c={conc} {app}: {lv[app]['error']}", flush=True)
                        continue
                    time.sleep(0.5)
                    res.update(batch_stats(before, scrape(url + prefix)))
                    lv[app] = res
                    print(f"  c={conc:4d} {app:8s} {res['req_per_s']:7.1f} req/s  p50 {res['p50_ms']:7.1f}  "
                          f"p99 {res['p99_ms']:7.1f} ms  shed {100 * res['shed_share']:.1f}%  batch "
                          f"{fmt(res['mean_batch_size'])}  adapters/batch {fmt(res['mean_batch_adapters'])}  "
                          f"client CPU {100 * res['client_cpu_share_of_one_core']:.0f}%", flush=True)
                report["levels"].append(lv)
        finally:
            serve.shutdown()
            ray.shutdown()

        if not args.no_engine:
            for i, name in enumerate(names):
                engine.load_adapter(name, dirs[name])
            for lv in report["levels"]:
                mb = (lv.get("polyhead") or {}).get("mean_batch_size")
                if not mb:
                    continue
                batch = max(1, round(mb))
                try:
                    lv["engine"] = engine_rows(engine, texts, names, batch, min(3.0, args.duration), seed=batch)
                except Exception as exc:  # noqa: BLE001
                    lv["engine"] = {"batch": batch, "error": f"{type(exc).__name__}: {exc}"}
                print(f"  engine @batch {batch}: {lv['engine']}", flush=True)

        report["total_seconds"] = time.perf_counter() - t0
        tab = table(report["levels"])
        print()
        print(tab)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
        s = report["settings"]
        (args.out / "serve_load.md").write_text(
            f"# serve_load ({report['date']})\n\n"
            f"Closed loop on 127.0.0.1, {s['duration_s']} s per level and app, client `{client}`; "
            f"{s['adapters']} random LoRA r=16 adapters (all encoder linears, 2-label head), inputs of "
            f"{s['tokens']} tokens, {s['routes']}; {report['machine']['cpus']} CPUs shared by server and client.\n"
            f"floor = same Ingress, stub model that returns at once; engine = Engine.infer in-process at the "
            f"server's mean batch size (rows/s). App config: `{json.dumps(s['app_config'])}`.\n\n"
            + tab + "\n")
        try:
            plot(report["levels"], args.out / "serve_load.png")
        except Exception as exc:  # noqa: BLE001
            print(f"no plot: {exc}")
        print(f"\nwrote {args.out}/serve_load.json, .md, .png in {report['total_seconds']:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
