"""scale_adapters: do registration, listing, lookup and on-demand loading stay fast at 10,000 registered adapters
with 1,024 resident slots per replica (issue 26 item 6)?

One AdapterStore in a temporary folder grows to each N of --levels (100, 1,000, 10,000) with PEFT LoRA adapters on
the bundled all-MiniLM-L6-v2 (rank 8, query and value of layers 0 and 1, a 2-label SEQ_CLS head, every weight random
and non-zero, each adapter its own seed; the source folders are made beside the store and are not timed). At each N:

  registration   AdapterStore.add of every adapter that takes the store to N (validate, copy, fsync, publish):
                 p50/p99 over that segment, and p50 of its last 100 adds; then 30 adds into the store of N and
                 into an empty store in turn (removed again): does an add grow with N, at the same machine speed?
  listing        adapters_store.listing.scan (AdapterStore.list) through a new AdapterStore object, which reads
                 every polyhead.json (what every listing did before it kept them), and again through the same
                 object (a version's polyhead.json is read again only where its stat changed); the model
                 replica's Registry.listing; the memory the kept scan holds per version (tracemalloc)
  GET /v1/models through a real local Ray Serve app (the polyhead app on this store, max_slots 1024, Serve's
                 direct ingress): the first listing after the store grew, a listing after a store change
                 (the change token rewritten: the ingress lists the adapters again), the default page (1,000
                 models) and a page of 100 (`after` halfway) from the entries the ingress keeps, a walk over
                 every page, GET /v1/models/{name}, a 404 (ModelServer.describe_adapter lists every adapter) and
                 GET /v1/adapters (every adapter on every request: the path GET /v1/models took before it paged
                 and kept its entries); the model replica's and the ingress's RSS
  lookup         `name` -> its latest version: AdapterStore.resolve (a store read, the cold path) and the model
                 replica's Registry.cached (a hit of its TTL cache), 500 random names
  loading        Engine(max_slots=1024, max_rank=8).load_adapter of every adapter not loaded yet (after 1,024
                 each one evicts the least recently used slot), p50/p99; this process's RSS per loaded adapter
                 (the engine keeps every loaded adapter's AdapterSpec; slots hold 1,024); forwards of 64 rows of
                 16 tokens, each row its own adapter: resident, loaded but evicted (written into slots in the
                 forward), and the base alone, 5 of each in turn; one forward with a row for every resident adapter

Ray runs in this process (`ray.init(num_cpus=2, include_dashboard=False)` on 127.0.0.1 through
serving.app.start_local_ray, RAY_AUTH_MODE=disabled). Timings are reported, never asserted.

    .venv/bin/python benchmarks/scale_adapters.py              # 100, 1,000, 10,000 adapters (about 5 minutes)
    .venv/bin/python benchmarks/scale_adapters.py --quick      # 100 and 1,000, results in a temporary folder
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before Ray is imported: one mode for every Ray process

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters_store import AdapterStore, listing  # noqa: E402
from serving import Engine, Request  # noqa: E402
from serving.app.routing import Registry, engine_key  # noqa: E402
from tests.adapter_factory import make_lora  # noqa: E402
from tests.conftest import minilm_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LEVELS = (100, 1_000, 10_000)
SLOTS, RANK, LAYERS, NUM_LABELS = 1024, 8, [0, 1], 2
BATCH, TOKENS, FORWARDS = 64, 16, 5
PAIRS = 30  # paired adds per level: into the store of N and into an empty one, in turn
LOOKUPS = 500
ADMIN = "scale-admin"


def ms(seconds: list[float] | float, q: float | None = None) -> float | None:
    if isinstance(seconds, list):
        if not seconds:
            return None
        return float(np.percentile(seconds, q)) * 1e3 if q is not None else statistics.median(seconds) * 1e3
    return seconds * 1e3


def timed(fn, reps: int = 1) -> tuple[list[float], object]:
    out, times = None, []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def rss_mib(proc: psutil.Process | None = None) -> float | None:
    try:
        return (proc or psutil.Process()).memory_info().rss / 2**20
    except (psutil.Error, AttributeError):
        return None


# registration ------------------------------------------------------------------------------------------

def grow(store: AdapterStore, schema, sources: Path, start: int, stop: int) -> list[float]:
    """Add adapters start..stop-1 (names scale-00000, ...); the time of each AdapterStore.add."""
    times = []
    for i in range(start, stop):
        folder = make_lora(sources / f"src-{i}", schema, seed=10_000 + i, r=RANK, head="SEQ_CLS",
                           num_labels=NUM_LABELS, layers=LAYERS)
        t = time.perf_counter()
        store.add(name(i), folder, schema=schema, max_rank=RANK)
        times.append(time.perf_counter() - t)
        shutil.rmtree(folder)
    return times


def paired_adds(store: AdapterStore, control: AdapterStore, schema, sources: Path) -> dict:
    """PAIRS adds into `store` and into `control` (a store kept empty) in turn, of one source folder, removed
    again after: an add at the store's size against an add into an empty store at the same moment."""
    folder = make_lora(sources / "probe", schema, seed=1, r=RANK, head="SEQ_CLS", num_labels=NUM_LABELS, layers=LAYERS)
    times: dict[str, list[float]] = {"at_n": [], "empty": []}
    for k in range(PAIRS):
        for target, key in ((store, "at_n"), (control, "empty")):
            t = time.perf_counter()
            target.add(f"probe-{k:03d}", folder, schema=schema, max_rank=RANK)
            times[key].append(time.perf_counter() - t)
    for k in range(PAIRS):
        store.remove(f"probe-{k:03d}")
        control.remove(f"probe-{k:03d}")
    shutil.rmtree(folder)
    return {"paired_p50_ms": ms(times["at_n"]), "paired_empty_p50_ms": ms(times["empty"])}


def name(i: int) -> str:
    return f"scale-{i:05d}"


# listing and lookup --------------------------------------------------------------------------------------

def measure_listing(root: Path, n: int, reps: int) -> dict:
    cold = [timed(lambda: listing.scan(AdapterStore(root)))[0][0] for _ in range(reps)]
    store = AdapterStore(root)
    listing.scan(store)
    kept, found = timed(lambda: listing.scan(store), reps)
    assert len(found.versions) == n and not found.broken, (len(found.versions), found.broken[:3])
    registry = Registry(AdapterStore(root), {}, ttl_s=3600)
    registry.listing()  # its scan keeps the versions, as the model replica's does
    reg, (entries, _) = timed(registry.listing, reps)
    names_t, _ = timed(store.names, reps)
    gc.collect()
    tracemalloc.start()
    fresh = AdapterStore(root)
    listing.scan(fresh)
    held, _ = tracemalloc.get_traced_memory()  # what the kept scan (and its Listing) holds
    tracemalloc.stop()
    return {"scan_cold_ms": ms(cold), "scan_kept_ms": ms(kept), "registry_listing_ms": ms(reg),
            "names_ms": ms(names_t), "entries": len(entries), "kept_bytes_per_version": held / n}


def measure_lookup(root: Path, n: int, rng: random.Random) -> dict:
    store = AdapterStore(root)
    registry = Registry(store, {}, ttl_s=3600)
    picks = [name(rng.randrange(n)) for _ in range(LOOKUPS)]
    cold, cached = [], []
    for ref in picks:
        t = time.perf_counter()
        found = store.resolve(ref)
        cold.append(time.perf_counter() - t)
        assert found.version == 1
    for ref in picks:
        registry.resolve(ref)
    for ref in picks:
        t = time.perf_counter()
        hit = registry.cached(ref)
        cached.append(time.perf_counter() - t)
        assert hit is not None
    return {"resolve_p50_us": ms(cold) * 1e3, "resolve_p99_us": ms(cold, 99) * 1e3,
            "cached_p50_us": ms(cached) * 1e3, "cached_p99_us": ms(cached, 99) * 1e3}


# the served app ------------------------------------------------------------------------------------------

class Server:
    """The polyhead app on `store_root` in a local Ray (one model replica, max_slots 1024), reached directly."""

    def __init__(self, store_root: Path, slots: int):
        from serving.app import build_app, direct_ingress_url, free_port, free_ports, start_local_ray

        ports = free_ports(4)
        start_local_ray(2, direct_ingress_ports=ports, log_to_driver=False)
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        cfg = {"max_slots": slots, "max_rank": RANK, "num_threads": 1, "num_cpus": 1, "store_root": str(store_root),
               "api_keys": [], "admin_api_key": ADMIN}
        serve.run(build_app(cfg), name="polyhead", route_prefix="/")
        import httpx

        self.url = direct_ingress_url("polyhead", ports)
        self.client = httpx.Client(base_url=self.url, timeout=600)

    def close(self) -> None:
        import ray
        from ray import serve

        self.client.close()
        serve.shutdown()
        ray.shutdown()

    def get(self, path: str, **kwargs):
        t = time.perf_counter()
        r = self.client.get(path, **kwargs)
        elapsed = time.perf_counter() - t
        if r.status_code not in (200, 404):
            raise RuntimeError(f"GET {path}: {r.status_code} {r.text[:300]}")
        return elapsed, r

    def replica_rss(self) -> dict:
        """RSS (MiB) of this Ray's model replica and ingress (the processes Ray started from this one)."""
        out = {}
        for proc in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            for role, mark in (("model_replica", "ModelServer"), ("ingress", "Ingress")):
                if f"ServeReplica:polyhead:{mark}" in cmd:
                    out[f"{role}_rss_mib"] = rss_mib(proc)
        return out

    def measure(self, store: AdapterStore, n: int, rng: random.Random, reps: int) -> dict:
        first, r = self.get("/v1/models")  # the store grew: the ingress lists again (its scan reads the new ones)
        assert r.json()["has_more"] == (n + 1 > 1000), r.json()["has_more"]
        relist = []
        for _ in range(3):
            listing.mark_changed(store)  # a change elsewhere (another replica, the CLI): the entries are listed again
            relist.append(self.get("/v1/models")[0])
        page = [self.get("/v1/models")[0] for _ in range(reps)]
        size = len(self.get("/v1/models")[1].content)
        middle = name(n // 2)
        small = [self.get("/v1/models", params={"limit": 100, "after": middle})[0] for _ in range(reps)]
        walk_t = time.perf_counter()
        after, models, pages = None, 0, 0
        while True:
            _, r = self.get("/v1/models", params={"after": after} if after else None)
            body = r.json()
            models, pages = models + len(body["data"]), pages + 1
            if not body["has_more"]:
                break
            after = body["last_id"]
        walk = time.perf_counter() - walk_t
        assert models == n + 1, (models, n)  # the base and every adapter, once
        retrieve = [self.get(f"/v1/models/{name(rng.randrange(n))}")[0] for _ in range(reps)]
        missing = [self.get("/v1/models/no-such-adapter")[0] for _ in range(2)]
        headers = {"Authorization": f"Bearer {ADMIN}"}
        adapters = [self.get("/v1/adapters", headers=headers) for _ in range(2)]
        return {"first_listing_ms": ms(first), "relist_ms": ms(relist), "page_1000_ms": ms(page),
                "page_1000_p99_ms": ms(page, 99), "page_1000_bytes": size, "page_100_ms": ms(small),
                "walk_ms": ms(walk), "walk_pages": pages, "retrieve_ms": ms(retrieve),
                "retrieve_404_ms": ms(missing), "adapters_ms": ms([t for t, _ in adapters]),
                "adapters_bytes": len(adapters[-1][1].content), **self.replica_rss()}


# on-demand loading -----------------------------------------------------------------------------------------

def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors an AdapterSpec (dataclasses, dicts, tuples of them) holds."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def measure_loading(engine: Engine, root: Path, start: int, stop: int, rng: random.Random) -> dict:
    store = AdapterStore(root)
    rss_before, slots_before = rss_mib(), engine.stats()["slot_bytes"] / 2**20
    loads = []
    for i in range(start, stop):
        found = store.resolve(name(i))
        t = time.perf_counter()
        engine.load_adapter(engine_key(found.name, found.version), found.path)
        loads.append(time.perf_counter() - t)
    gc.collect()
    rss_after = rss_mib()
    stats = engine.stats()
    specs = engine.adapters()
    spec_kib = sum(tensor_bytes(spec) for spec in specs.values()) / 1024 / max(1, len(specs))
    keys = [engine_key(name(i), 1) for i in range(stop)]
    resident = engine.pool.resident()
    evicted = [k for k in keys if engine.pool.slot_of(k) is None]
    vocab = engine.schema.vocab_size

    def rows(names: list[str | None]) -> list[Request]:
        return [Request(adapter=a, input_ids=[101] + [rng.randrange(1000, vocab) for _ in range(TOKENS - 2)] + [102])
                for a in names]

    def forward(names: list[str | None]) -> float:
        reqs = rows(names)
        t = time.perf_counter()
        out = engine.infer(reqs)
        elapsed = time.perf_counter() - t
        bad = [r.error for r in out if r.error]
        if bad:
            raise RuntimeError(f"{len(bad)} rows failed: {bad[0]}")
        return elapsed

    hot = resident[-BATCH:]  # the most recently used: an evicted batch takes the least recently used slots
    forward(hot)  # warm-up
    picks = rng.sample(evicted, FORWARDS * BATCH) if len(evicted) >= FORWARDS * BATCH else None
    times: dict[str, list[float]] = {"resident": [], "base": [], "evicted": []}
    for k in range(FORWARDS):  # in turn: the machine's noise hits each alike
        times["resident"].append(forward(hot))
        times["base"].append(forward([None] * len(hot)))
        if picks:
            times["evicted"].append(forward(picks[k * BATCH:(k + 1) * BATCH]))
    batch = {f"{kind}_ms": ms(t) for kind, t in times.items() if t}
    every = engine.pool.resident()
    batch["all_resident_rows"] = len(every)
    batch["all_resident_ms"] = ms(forward(every))
    return {"loads": len(loads), "load_p50_ms": ms(loads), "load_p99_ms": ms(loads, 99),
            "registered": stats["registered"], "resident": stats["resident"], "evictions": stats["evictions"],
            "slot_mib": stats["slot_bytes"] / 2**20, "rss_mib": rss_after,
            "rss_kib_per_loaded": (rss_after - rss_before - (stats["slot_bytes"] / 2**20 - slots_before)) * 1024
            / max(1, len(loads)),
            "spec_kib_per_loaded": spec_kib, "batch": batch}


# report ------------------------------------------------------------------------------------------------------

def fmt(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


def tables(levels: list[dict], slots: int) -> str:
    reg = ["| adapters | add p50 ms | add p99 ms | last 100 adds p50 ms | paired adds p50 ms: at N / into an empty "
           "store | scan, every file read ms | scan, kept ms | Registry.listing ms | kept bytes / version | resolve "
           "p50 us | resolve p99 us | cached p50 us |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    http = ["| adapters | first listing ms | listing after a change ms | page of 1,000 ms (p99) | page bytes | "
            "page of 100 ms | walk every page ms (pages) | GET /v1/models/{name} ms | 404 ms | GET /v1/adapters ms "
            "(bytes) | model replica RSS MiB | ingress RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    load = ["| adapters | loads | load p50 ms | load p99 ms | resident | evictions | slots MiB | RSS KiB / loaded "
            "adapter (beyond slots) | spec tensors KiB / loaded adapter | 64 rows resident ms | 64 rows evicted ms | "
            "64 rows base ms | every resident adapter: rows, ms |", "|" + "---|" * 13]
    for lv in levels:
        n, r, li, lk = lv["n"], lv["register"], lv["listing"], lv["lookup"]
        reg.append(f"| {n:,} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['last100_p50_ms'])} | "
                   f"{fmt(r['paired_p50_ms'])} / {fmt(r['paired_empty_p50_ms'])} | "
                   f"{fmt(li['scan_cold_ms'])} | {fmt(li['scan_kept_ms'])} | {fmt(li['registry_listing_ms'])} | "
                   f"{fmt(li['kept_bytes_per_version'], 0)} | {fmt(lk['resolve_p50_us'])} | "
                   f"{fmt(lk['resolve_p99_us'])} | {fmt(lk['cached_p50_us'], 2)} |")
        h = lv.get("http")
        if h:
            http.append(f"| {n:,} | {fmt(h['first_listing_ms'])} | {fmt(h['relist_ms'])} | {fmt(h['page_1000_ms'])} "
                        f"({fmt(h['page_1000_p99_ms'])}) | {fmt(h['page_1000_bytes'])} | {fmt(h['page_100_ms'])} | "
                        f"{fmt(h['walk_ms'])} ({h['walk_pages']}) | {fmt(h['retrieve_ms'])} | "
                        f"{fmt(h['retrieve_404_ms'])} | {fmt(h['adapters_ms'])} ({fmt(h['adapters_bytes'])}) | "
                        f"{fmt(h.get('model_replica_rss_mib'), 0)} | {fmt(h.get('ingress_rss_mib'), 0)} |")
        e, b = lv["loading"], lv["loading"]["batch"]
        load.append(f"| {n:,} | {e['loads']:,} | {fmt(e['load_p50_ms'])} | {fmt(e['load_p99_ms'])} | "
                    f"{e['resident']:,} | {e['evictions']:,} | {fmt(e['slot_mib'], 0)} | "
                    f"{fmt(e['rss_kib_per_loaded'], 0)} | {fmt(e['spec_kib_per_loaded'], 0)} | "
                    f"{fmt(b['resident_ms'])} | {fmt(b.get('evicted_ms'))} | {fmt(b['base_ms'])} | "
                    f"{b['all_resident_rows']:,}, {fmt(b['all_resident_ms'], 0)} |")
    parts = ["### Registration, listing, lookup (in process)\n", "\n".join(reg),
             "\n### GET /v1/models through the served app\n", "\n".join(http) if len(http) > 2 else "(no server run)",
             f"\n### On-demand loading into Engine(max_slots={slots}, max_rank={RANK})\n", "\n".join(load)]
    return "\n".join(parts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    ns = [lv["n"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for key, label in (("scan_cold_ms", "scan, every polyhead.json read"), ("scan_kept_ms", "scan, kept"),
                       ("registry_listing_ms", "Registry.listing (kept)")):
        ax.plot(ns, [lv["listing"][key] for lv in levels], "o-", label=label)
    if all(lv.get("http") for lv in levels):
        for key, label in (("relist_ms", "GET /v1/models after a store change"),
                           ("page_1000_ms", "GET /v1/models, kept (page of 1,000)"),
                           ("page_100_ms", "GET /v1/models?limit=100&after="),
                           ("adapters_ms", "GET /v1/adapters (every adapter)")):
            ax.plot(ns, [lv["http"][key] for lv in levels], "s--", label=label)
    ax.set_title("listing")
    ax = axes[1]
    ax.plot(ns, [lv["register"]["p50_ms"] for lv in levels], "o-", label="AdapterStore.add p50")
    ax.plot(ns, [lv["register"]["p99_ms"] for lv in levels], "o--", label="AdapterStore.add p99")
    ax.plot(ns, [lv["loading"]["load_p50_ms"] for lv in levels], "s-", label="Engine.load_adapter p50")
    ax.plot(ns, [lv["loading"]["load_p99_ms"] for lv in levels], "s--", label="Engine.load_adapter p99")
    ax.plot(ns, [lv["lookup"]["resolve_p50_us"] / 1e3 for lv in levels], "^-", label="AdapterStore.resolve p50")
    ax.set_title("registration, loading, lookup")
    ax = axes[2]
    ax.plot(ns, [lv["loading"]["rss_mib"] for lv in levels], "o-", label="benchmark process RSS (engine)")
    if all(lv.get("http") for lv in levels):
        ax.plot(ns, [lv["http"].get("model_replica_rss_mib") for lv in levels], "s-", label="model replica RSS")
        ax.plot(ns, [lv["http"].get("ingress_rss_mib") for lv in levels], "^-", label="ingress RSS")
    ax.set_title("memory (MiB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("registered adapters")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms")
    fig.suptitle(f"scale_adapters ({report['date']}): LoRA r={RANK}, max_slots {report['settings']['slots']}, "
                 f"{report['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = report["settings"]
    md = [f"# scale_adapters ({report['date']})\n",
          f"benchmarks/scale_adapters.py on {report['machine']['platform']}, {report['machine']['cpus']} CPUs "
          f"(shared), torch {report['machine']['torch']}: all-MiniLM-L6-v2, PEFT LoRA r={s['rank']} on query/value "
          f"of layers {s['layers']}, {s['num_labels']}-label SEQ_CLS head, each adapter its own random weights; "
          f"Engine max_slots {s['slots']}, fp32, {s['torch_threads']} torch threads; forwards of {s['batch']} rows "
          f"x {s['tokens']} tokens. Medians unless named; every number from one run "
          f"({report['total_seconds']:.0f} s).\n", tables(report["levels"], s["slots"]), "",
          "Scan, every file read: `listing.scan` through a new AdapterStore object (every polyhead.json read and "
          "parsed, what each listing did before); kept: through the same object again (one listdir per name and "
          "one stat per version). First listing: the first GET /v1/models after the store grew (the model "
          "replica reads the new versions); after a change: the store's change token rewritten, then GET "
          "/v1/models (the ingress lists every adapter again, the model replica's scan from its kept versions). "
          "Pages are cut from the entries the ingress keeps while the token is unchanged (at most 30 s). 404: "
          "GET /v1/models/{unknown} asks ModelServer.describe_adapter, which lists every adapter. GET /v1/adapters "
          "lists every adapter on every request: the path GET /v1/models took before (then also with every file "
          "read). Paired adds: an add into the store of N and one into an empty store, in turn, 30 each (removed "
          "after): whether an add grows with the store, with the machine's speed at that moment the same for "
          "both. RSS KiB / loaded adapter: this process's RSS growth over the loads of that level, less the slot "
          "tensors' growth (the engine keeps each loaded adapter's AdapterSpec: its tensors are the next column). "
          f"Forwards: {s['forwards']} of each kind in turn, the median.\n", report.get("note", "")]
    (out / "scale_adapters.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "scale_adapters.md").write_text("\n".join(md))
    try:
        plot(report, out / "scale_adapters.png")
    except Exception as exc:  # noqa: BLE001 - the tables matter more
        print(f"no plot: {exc}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default=None, help="registered adapters to measure at, e.g. 100,1000,10000")
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 adapters, results in a temporary folder")
    ap.add_argument("--slots", type=int, default=SLOTS, help="max_slots of the engine and the model replica")
    ap.add_argument("--no-server", action="store_true", help="skip the served app (no Ray)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else list(LEVELS[:2] if args.quick else LEVELS)
    out = args.out or (Path(tempfile.mkdtemp(prefix="scale-adapters-out-")) if args.quick else RESULTS)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="polyhead-scale-"))
    server = None
    try:
        root, sources = tmp / "store", tmp / "sources"
        engine = Engine.from_pretrained(str(minilm_path()), max_slots=args.slots, max_rank=RANK)
        store, control = AdapterStore(root), AdapterStore(tmp / "control")
        import ray

        report = {"benchmark": "scale_adapters", "date": dt.datetime.now().isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version(), "torch": torch.__version__,
                              "ray": ray.__version__},
                  "settings": {"levels": levels, "slots": args.slots, "rank": RANK, "layers": LAYERS,
                               "num_labels": NUM_LABELS, "batch": BATCH, "tokens": TOKENS, "lookups": LOOKUPS,
                               "forwards": FORWARDS, "paired_adds": PAIRS,
                               "torch_threads": threads, "seed": args.seed, "server": not args.no_server},
                  "engine_rss_mib": rss_mib(), "levels": []}
        if not args.no_server:
            t = time.perf_counter()
            server = Server(root, args.slots)
            report["server_start_s"] = time.perf_counter() - t
            print(f"served app ready in {report['server_start_s']:.0f} s at {server.url}", flush=True)
        have = 0
        for n in levels:
            adds = grow(store, engine.schema, sources, have, n)
            level = {"n": n, "register": {"adds": len(adds), "p50_ms": ms(adds), "p99_ms": ms(adds, 99),
                                          "last100_p50_ms": ms(adds[-100:]),
                                          **paired_adds(store, control, engine.schema, sources)}}
            print(f"[{time.perf_counter() - t0:5.0f} s] {n:,} registered: add p50 {level['register']['p50_ms']:.1f} ms",
                  flush=True)
            reps = 3 if n > 2000 else 5
            level["listing"] = measure_listing(root, n, reps)
            level["lookup"] = measure_lookup(root, n, rng)
            if server is not None:
                level["http"] = server.measure(store, n, rng, 20)
                print(f"[{time.perf_counter() - t0:5.0f} s] GET /v1/models at {n:,}: page "
                      f"{level['http']['page_1000_ms']:.1f} ms, after a change {level['http']['relist_ms']:.0f} ms",
                      flush=True)
            level["loading"] = measure_loading(engine, root, have, n, rng)
            print(f"[{time.perf_counter() - t0:5.0f} s] loaded {n:,}: load p50 "
                  f"{level['loading']['load_p50_ms']:.1f} ms", flush=True)
            report["levels"].append(level)
            have = n
        report["total_seconds"] = time.perf_counter() - t0
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(tables(report["levels"], args.slots))
    write(report, out)
    print(f"\nwrote {out}/scale_adapters.json, .md, .png in {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
