"""ModelServer: the Ray Serve deployment holding one Engine.

Each call carries one request's rows, each {"adapter", "input_ids", "need"}; @serve.batch gathers
rows for MANY adapters into one Engine.infer (never split by adapter), run off the event loop on one
engine thread. Continuous batching: rows arriving while a batch computes wait for it, then form the
next batch together; a row reaching an idle replica runs at once.
"adapter" is a reference, `name` or `name@N`, resolved through the Registry (config
`adapters` + an AdapterStore shared by every replica that opens the same `store_root`) to one
version; that version loads on demand on its first row, once (an asyncio lock per version),
under its own engine key, so `name@1` and `name@2` can be resident together.
Errors stay per row: a row result carries "error" and "code" instead of raising. The codes come from
what the replica knows (the registry's exception types, which adapter versions it has loaded), never
from the wording of an engine or store message.
Batch, adapter-load and slot metrics are recorded here, where they happen (serving/app/metrics.py).
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from ray import serve

from adapters_store import AdapterError, AdapterStore, parse_ref
from adapters_store.sources import SourceRefused, SourceTimeout

from ..engine import Engine, Request, non_finite_message
from .config import ServeConfig
from .convergence import StoreWatch
from .heaptrim import HeapTrim
from .hub import MetricsPusher
from .keylocks import KeyLocks
from .metrics import MODEL_SERIES, Recorder
from .registrations import Registrations, source_policy
from .routing import Registry, Resolved, Source, engine_key
from .tokens import probe_encodings
from .truncate import SENTENCE_LIMIT, fit_row

log = logging.getLogger("polyhead")
NEED_TASKS = {"seq": ("seq_cls", "multilabel"), "token": ("token_cls",), "embedding": None}


SHADOW_SPINS = 8  # event-loop turns infer_rows waits for shadow rows after the others are done (no clock time)


def row_error(code: str, message: str) -> dict:
    return {"error": message, "code": code}


def _drop_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: never "exception was never retrieved"


def _shadow_result(task: asyncio.Future) -> dict:
    """A shadow row's answer: its result, its failure as a row error, or shadow_late (left to finish)."""
    if not task.done():
        task.add_done_callback(_drop_result)
        return row_error("shadow_late", "the shadow row was not done when its primary rows were")
    if task.cancelled() or task.exception() is not None:
        exc = None if task.cancelled() else task.exception()
        return row_error("shadow_failed", f"{type(exc).__name__}: {exc}" if exc else "cancelled")
    return task.result()


@dataclass(frozen=True)
class Loaded:
    """An adapter version loaded in this replica's engine (under its engine key)."""

    task: str | None  # its head's task (seq_cls | multilabel | token_cls), None without a head
    labels: tuple[str, ...] | None
    virtual_tokens: int  # prompt/prefix positions its rows gain: its inputs may be that much shorter
    generation: int  # a new number per load: a row admitted under another one finds its adapter gone


@serve.deployment
class ModelServer:
    def __init__(self, config: dict):
        cfg = ServeConfig(**config)
        self.cfg = cfg
        # Every torch op of the replica, the engine's construction included, runs on this one thread, off the
        # event loop: each thread that runs torch ops gets its own OpenMP thread team, and a second team
        # (spinning, or merely there) slowed the forward by 20-80 % in a Serve replica.
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyhead-engine")
        self.engine = self._engine_thread.submit(self._build_engine, cfg).result()
        # how the engine's (transformers) tokenizer encodes PROBES: the ingress checks its own against them
        self.probes = probe_encodings(self.engine.tokenizer) if self.engine.tokenizer is not None else None
        store = AdapterStore(cfg.store_root)  # the same root in every replica (ServeConfig resolves the default)
        static = {name: Source(name, s.path, tuple(s.labels) if s.labels else None) for name, s in cfg.adapters.items()}
        self.registry = Registry(store, static, ttl_s=cfg.store_ttl_s)
        # registrations (fetches included) and store lookups on threads of their own: a slow source never
        # delays a row's lookup (serving/app/registrations.py)
        self.registrations = Registrations(cfg.max_concurrent_registrations)
        self.source_policy = source_policy(cfg)
        self._heads: dict[str, Loaded] = {}  # engine key -> what is loaded under it
        self._described: dict[str, dict] = {}  # static adapters' task and labels, read once (list_adapters)
        self._generations = itertools.count(1)
        self._loaded: dict[str, Resolved] = {}  # engine key -> what it was loaded from
        self._locks = KeyLocks()  # per engine key, while held or awaited (a dict of locks grew per version)
        self._inflight: dict[str | None, int] = {}  # admitted rows per engine key, drained before an unload
        self._batches = 0
        self.loads = 0
        self.rows = 0  # rows run here
        self.adapter_rows = 0  # rows naming an adapter run here (the hit rate: 1 - loads / adapter_rows)
        self.draining = False  # set by Serve's graceful shutdown (__del__): /ready answers 503
        self._run_batch.set_max_batch_size(cfg.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # Serve's batcher cuts its queue into batches by time, eagerly, even while the engine is busy: rows
        # arriving during a forward would become several small batches queued behind it. Rows wait here
        # instead while a batch computes, and enter the queue together when it ends: one batch of them.
        self._computing = False
        self._engine_free = asyncio.Event()
        self.metrics = Recorder(MODEL_SERIES)
        self._engine_counts: dict[str, int] = {}  # engine counters already added to the metrics
        self._record_engine(self._engine_thread.submit(self.engine.stats).result())
        self.metrics.collectors.append(self._record_counts)  # per push, not per row
        self._record_counts(self.metrics)
        self.pusher = MetricsPusher.in_replica(self.metrics, cfg.metrics_push_s)
        # versions removed through another replica or the CLI leave this engine too (serving/app/convergence.py)
        self.watch = StoreWatch(store, cfg.store_ttl_s, self.converge, self.registrations.lookup)
        self.watch.ensure_started()
        # freed heap memory back to the OS now and then, on the engine thread (serving/app/heaptrim.py)
        self.heap_trim = HeapTrim(self._on_engine)
        self.heap_trim.ensure_started()

    @staticmethod
    def _build_engine(cfg: ServeConfig) -> Engine:
        lower_thread_priority(cfg.engine_nice)  # before torch starts its threads: they inherit it
        torch.set_num_threads(cfg.num_threads)  # Ray sets OMP_NUM_THREADS to the replica's CPUs
        return Engine.from_pretrained(cfg.resolved_base_dir(), device=cfg.device, dtype=cfg.dtype,
                                      max_slots=cfg.max_slots, max_rank=cfg.max_rank,
                                      max_virtual_tokens=cfg.max_virtual_tokens, max_bottleneck=cfg.max_bottleneck)

    def __del__(self):  # Serve calls it when it stops this replica, after its ongoing requests
        self.draining = True

    async def _on_engine(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread,
                                                                functools.partial(fn, *args, **kwargs))

    # rows ---------------------------------------------------------------------------------

    async def infer_rows(self, rows: list[dict]) -> list[dict]:
        """One request's rows (one call from the ingress), each admitted and answered as `infer` does; they
        arrive together, so they join the same batch.

        Shadow rows (an experiment's, {"shadow": true}) ride along best-effort: the call answers as soon as the other
        rows are done; a shadow row not done by then (its adapter still loading, or cut into a later batch) answers
        {"code": "shadow_late"} and finishes in the background, its result dropped. A shadow row never raises."""
        tasks = [asyncio.ensure_future(self.infer(row)) for row in rows]
        primaries = [t for t, row in zip(tasks, rows) if not row.get("shadow")]
        if len(primaries) == len(tasks):
            return list(await asyncio.gather(*tasks))
        try:
            await asyncio.gather(*primaries)
        except BaseException:
            for t, row in zip(tasks, rows):
                if row.get("shadow"):
                    t.add_done_callback(_drop_result)
            raise
        for _ in range(SHADOW_SPINS):  # a shadow of the same batch finishes within a few turns of the loop
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0)
        return [_shadow_result(t) if row.get("shadow") else t.result() for t, row in zip(tasks, rows)]

    async def infer(self, row: dict) -> dict:
        if self.pusher is not None:
            self.pusher.ensure_started()
        self.watch.ensure_started()
        self.heap_trim.ensure_started()
        ref, need = row.get("adapter"), row.get("need", "embedding")
        load_s, key, loaded, resolved = None, None, None, None
        if ref is not None:
            try:
                found = self.registry.cached(ref) or await self.registrations.lookup(self.registry.resolve, ref)
                key, resolved = found.key, found.full_ref
                load_s = await self._ensure_loaded(found)
            except LookupError:
                self._drop_gone(ref)
                return row_error("model_not_found", await self.registrations.lookup(self.registry.unknown_message, ref))
            except AdapterError as exc:
                return row_error("adapter_invalid", f"adapter {ref!r} cannot be loaded: {exc}")
            loaded = self._heads[key]  # no await since _ensure_loaded: still loaded
        wrong = self._wrong_task(loaded, ref, need)
        if wrong:
            return row_error("wrong_task", wrong)
        virtual = loaded.virtual_tokens if loaded is not None else 0
        limit, why = self._limit(need, ref, virtual)
        ids = fit_row(row["input_ids"], limit, row.get("truncate"), why)  # cut where the request asked
        if isinstance(ids, str):
            return row_error("too_many_tokens", ids)
        if len(ids) < len(row["input_ids"]):
            row = dict(row, input_ids=ids, truncated_to=len(ids))
        generation = loaded.generation if loaded is not None else 0
        self._inflight[key] = self._inflight.get(key, 0) + 1  # no await since the checks above: atomic
        self.rows += 1
        self.adapter_rows += key is not None
        try:
            if self._computing:  # continuous batching: wait for the running batch, then join the next one
                await self._engine_free.wait()
            out = await self._run_batch(dict(row, key=key, generation=generation))
        finally:
            self._inflight[key] -= 1
            if not self._inflight[key]:
                del self._inflight[key]
        out["load_s"] = load_s
        if "truncated_to" in row:
            out["truncated_to"] = row["truncated_to"]  # the ingress cuts the input's offsets alike
        out["resolved"] = resolved  # the version this row ran ("name@N"; a static entry: "name"), for the log
        return out

    def _limit(self, need: str, ref: str | None, virtual: int) -> tuple[int, str]:
        """The longest input of a row (its virtual tokens take positions too) and where that limit comes from."""
        limit = self.engine.max_tokens - virtual
        why = f" (adapter {ref!r} adds {virtual} virtual tokens)" if virtual else ""
        if need == "embedding" and self.engine.embedding_max_tokens < limit:
            limit, why = self.engine.embedding_max_tokens, SENTENCE_LIMIT
        return limit, why

    @staticmethod
    def _wrong_task(loaded: Loaded | None, ref: str | None, need: str) -> str | None:
        tasks = NEED_TASKS[need]
        task = loaded.task if loaded is not None else None
        if tasks is None or task in tasks:
            return None
        what = "the base model" if ref is None else f"adapter {ref!r}"
        has = f"a {task} head" if task else "no task head"
        return f"{what} has {has}; this route needs {' or '.join(tasks)}"

    def _gone(self, row: dict) -> bool:
        """The row's adapter version was unloaded (or replaced) since the row was admitted."""
        key = row.get("key")
        if key is None:
            return False
        loaded = self._heads.get(key)
        return loaded is None or loaded.generation != row["generation"]

    def _infer(self, requests: list[Request]):
        results = self.engine.infer(requests)
        return results, self.engine.stats()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # set from the config in __init__
    async def _run_batch(self, rows: list[dict]) -> list[dict]:
        requests = [Request(adapter=r.get("key"), input_ids=r["input_ids"]) for r in rows]
        self._computing = True
        self._engine_free.clear()
        start = time.perf_counter()
        try:
            results, stats = await self._on_engine(self._infer, requests)
        finally:
            self._computing = False
            self._engine_free.set()
        compute_s = time.perf_counter() - start
        self._batches += 1
        info = {"batch_size": len(rows), "batch_adapters": len({r.get("key") for r in rows} - {None}),
                "batch_id": self._batches, "compute_s": compute_s}
        self.metrics.batch_size.observe(info["batch_size"])
        self.metrics.batch_adapters.observe(info["batch_adapters"])
        self.metrics.batch_compute.observe(compute_s)
        self._record_engine(stats)
        out = []
        for row, res in zip(rows, results):
            item = dict(info, task=res.task, labels=list(res.labels) if res.labels else None)
            if res.error is not None:
                if self._gone(row):  # removed while the row waited: name what the client asked for, not the key
                    item.update(row_error("model_not_found", f"unknown model {row.get('adapter')!r} (removed)"))
                elif res.error_code == "non_finite":  # the adapter is broken for this input, not the request
                    message = non_finite_message(row.get("adapter"), self.engine.dtype)  # the client's name
                    item.update(row_error("non_finite_output", message))
                else:
                    item.update(row_error("invalid_input", res.error))
            elif row.get("need") == "embedding":
                item["embedding"] = res.embedding.tolist()
            else:
                item["logits"] = res.logits.tolist() if res.logits is not None else None
            out.append(item)
        return out

    def _record_engine(self, stats: dict) -> None:
        """The engine's slot gauges, and its counters' growth since the last call."""
        m = self.metrics
        for instrument, field in ((m.slot_loads, "loads"), (m.slot_evictions, "evictions"), (m.forwards, "forwards")):
            instrument.inc(stats[field] - self._engine_counts.get(field, 0))
            self._engine_counts[field] = stats[field]
        m.replica_slot_evictions.set(stats["evictions"])
        m.resident_slots.set(stats["resident"])
        m.max_slots.set(stats["max_slots"])
        m.registered_adapters.set(stats["registered"])
        m.slot_bytes.set(stats["slot_bytes"])

    def _record_counts(self, metrics) -> None:
        """This replica's row and load counts into its per-replica gauges (a Recorder collector: run before
        each metrics push)."""
        metrics.replica_rows.set(self.rows)
        metrics.replica_adapter_rows.set(self.adapter_rows)
        metrics.replica_adapter_loads.set(self.loads)

    # adapters -----------------------------------------------------------------------------

    def _lock(self, key: str):
        """`async with self._lock(key)`: loads and unloads of one engine key, one at a time."""
        return self._locks.hold(key)

    async def _ensure_loaded(self, found: Resolved) -> float | None:
        """Load the resolved version if it is not loaded yet; the load time, or None if it was loaded already."""
        if found.key in self._heads:
            return None
        async with self._lock(found.key):
            if found.key in self._heads:  # another first request loaded it meanwhile
                return None
            try:
                return await self._load(found)
            except AdapterError:
                if found.version is not None:  # removed by another replica since the (cached) lookup: a 404
                    fresh = await self.registrations.lookup(self.registry.resolve, found.ref, fresh=True)  # 404
                    if fresh.key != found.key:
                        return await self._load(fresh)
                raise

    async def _load(self, found: Resolved) -> float:
        start = time.perf_counter()
        labels = list(found.labels) if found.labels is not None else None
        spec = await self._on_engine(self.engine.load_adapter, found.key, found.path, labels)
        load_s = time.perf_counter() - start
        head = spec.head
        self._heads[found.key] = Loaded(head.task if head else None, tuple(head.labels) if head else None,
                                        spec.num_virtual_tokens, next(self._generations))
        self._loaded[found.key] = found
        self.loads += 1
        self.metrics.adapter_loads.inc()
        self.metrics.adapter_load_seconds.observe(load_s)
        self._record_engine(await self._on_engine(self.engine.stats))
        return load_s

    async def add_adapter(self, name: str, path: str, labels: list[str] | None = None) -> dict:
        """Validate and publish `path` as the next version of `name` in the store, and load it here now
        (a version the engine refuses is removed from the store again). At most max_concurrent_registrations
        at once, on threads of their own; beyond, {"code": "registrations_busy"} at once (429)."""
        if not self.registrations.try_start():
            return row_error("registrations_busy", self.registrations.busy_message())
        try:
            return await self._add_adapter(name, path, labels)
        finally:
            self.registrations.finish()

    async def _add_adapter(self, name: str, path: str, labels: list[str] | None) -> dict:
        try:
            found = await self.registrations.run(self.registry.add, name, path, schema=self.engine.schema,
                                                 labels=labels, max_rank=self.cfg.max_rank, policy=self.source_policy)
        except SourceRefused as exc:
            return row_error("source_not_allowed", str(exc))
        except SourceTimeout as exc:
            return row_error("source_timeout", str(exc))
        except AdapterError as exc:
            return row_error("adapter_invalid", str(exc))
        async with self._lock(found.key):
            try:
                load_s = await self._load(found)
            except AdapterError as exc:
                await self.registrations.run(self.registry.remove, name, found.version)
                return row_error("adapter_invalid", str(exc))
        loaded = self._heads[found.key]
        for warning in found.warnings:
            log.warning("adapter %s: %s", found.full_ref, warning)
        return {"name": name, "version": found.version, "ref": found.full_ref, "source": found.path,
                "task": loaded.task, "labels": list(loaded.labels) if loaded.labels else None, "load_s": load_s,
                "warnings": list(found.warnings)}

    async def remove_adapter(self, ref: str, drain_timeout_s: float = 30.0) -> bool:
        """Remove `name` (every version, and a static entry) or `name@N` from the registry at once (later
        rows get model_not_found), let the rows already admitted finish (up to drain_timeout_s), then
        unload what was removed from the engine. False if nothing was registered under `ref`."""
        try:
            name, version = parse_ref(ref)
        except AdapterError:
            return False
        try:
            removed = await asyncio.to_thread(self.registry.remove, name, version)
        except AdapterError:
            return False
        for found in removed:
            await self._unload(found.key, drain_timeout_s)
        return bool(removed)

    def _drop_gone(self, ref: str) -> None:
        """`ref` is no longer registered (removed through another replica or the store itself): unload the
        versions it covers that are still loaded here, in the background."""
        name, _, version = ref.partition("@")
        for key, found in list(self._loaded.items()):
            if found.name == name and found.version is not None and (not version or str(found.version) == version):
                del self._loaded[key]
                asyncio.get_running_loop().create_task(self._unload(key, 30.0))

    async def converge(self) -> list[str]:
        """Unload the store versions loaded here that the store no longer publishes (removed through another
        replica, `polyhead adapters rm`, by hand), each once its admitted rows finished (up to 30 s): their
        registrations and slots are freed. Returns their engine keys. Config adapters are never unloaded."""
        # what is loaded BEFORE the store is read: each was published when it was resolved, and a removed
        # number is never published again, so one missing from the listing below is gone for good
        loaded = [(key, found) for key, found in self._loaded.items() if found.version is not None]
        published: dict[str, set[int]] = {}
        for name in {found.name for _, found in loaded}:
            published[name] = set(await self.registrations.lookup(self.registry.store.published_versions, name))
        gone = [key for key, found in loaded if found.version not in published[found.name]]
        for key in gone:
            found = self._loaded.pop(key, None)
            if found is not None:
                self.registry.forget(found.name)
                asyncio.get_running_loop().create_task(self._unload(key, 30.0))
        return gone

    async def _unload(self, key: str, drain_timeout_s: float) -> None:
        async with self._lock(key):
            self._loaded.pop(key, None)
            if self._heads.pop(key, None) is not None:
                deadline = time.monotonic() + drain_timeout_s
                while self._inflight.get(key) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                await self._on_engine(self.engine.unload_adapter, key)
                self.metrics.adapter_unloads.inc()
                self._record_engine(await self._on_engine(self.engine.stats))

    async def describe_adapter(self, ref: str) -> dict:
        """`ref` (`name` or `name@N`) as its entry in list_adapters, a pinned version with its own task and labels
        (its loaded head, else as the store recorded them); {"error", "code"} when nothing answers to it."""
        name, version = parse_ref(ref)
        entry = await self.registrations.lookup(self.registry.listing_entry, name)
        if entry is not None:
            entry = await self._finish_entry(entry)
        if entry is None or (version is not None and version not in entry["versions"]):
            return row_error("model_not_found", await self.registrations.lookup(self.registry.unknown_message, ref))
        if version is None or version == entry["version"]:
            return entry
        try:
            found = await self.registrations.lookup(self.registry.store.resolve, ref)
        except AdapterError:  # removed meanwhile
            return row_error("model_not_found", await self.registrations.lookup(self.registry.unknown_message, ref))
        loaded = self._heads.get(engine_key(name, version))
        labels = (loaded.labels if loaded is not None else None) or found.labels or found.head_labels
        return dict(entry, version=version, source=str(found.path), created=found.created,
                    task=loaded.task if loaded is not None else found.task,
                    labels=list(labels) if labels else None, loaded=loaded is not None)

    async def list_adapters(self) -> list[dict]:
        """Per name: its latest version (None for a static entry), every version, where its files are, whether
        that latest version is loaded here, and its head's task and labels: from the loaded head, else as the
        store recorded them, else (a static entry) from validating its folder once."""
        return (await self.adapter_listing())["data"]

    async def adapter_listing(self) -> dict:
        """{"data": list_adapters' entries, "broken": [{"id": "name@N", "name", "version", "error"}]}: the
        store's versions that cannot be read are skipped and reported (also polyhead_broken_adapter_versions)."""
        entries, broken = await asyncio.to_thread(self.registry.listing)
        self.metrics.broken_versions.set(len(broken))
        out = [await self._finish_entry(entry) for entry in entries]
        return {"data": out, "broken": [{"id": b.ref, "name": b.name, "version": b.version, "error": b.error}
                                        for b in broken]}

    async def _finish_entry(self, entry: dict) -> dict:
        """A Registry listing entry as list_adapters answers it: the task and labels of its loaded head, else
        (a static entry) of its folder, and whether it is loaded here."""
        key = entry.pop("key")
        loaded = self._heads.get(key)
        if loaded is not None:
            entry.update(task=loaded.task, labels=list(loaded.labels) if loaded.labels else entry["labels"])
        elif entry["version"] is None:
            entry.update(await self._describe_static(key, entry))
        return dict(entry, loaded=loaded is not None)

    async def _describe_static(self, key: str, entry: dict) -> dict:
        """{"task", "labels"} of a static adapter that is not loaded, read once from its folder (validated as a
        load would, on the engine thread: torch reads it); task None where the folder is not a valid adapter
        (a request for it gets the reason)."""
        if key not in self._described:
            labels = entry["labels"]
            try:
                spec = await self._on_engine(self.engine.validate_adapter, key, entry["source"], labels)
            except AdapterError:
                self._described[key] = {"task": None, "labels": labels}
            else:
                head = spec.head
                self._described[key] = {"task": head.task if head else None,
                                        "labels": list(head.labels) if head and head.labels else labels}
        return self._described[key]

    # introspection ------------------------------------------------------------------------

    def record_routing_stats(self) -> dict:
        """What the affinity router (serving/app/router.py) ranks this replica by; polled by Serve's controller.
        Cheap: no engine call. "resident": the adapter versions loaded here, a store version as `name@N` and `name`."""
        resident = set()
        for found in self._loaded.values():
            resident.add(found.full_ref)
            resident.add(found.name)
        return {"resident": sorted(resident), "queued_rows": sum(self._inflight.values()),
                "capacity_rows": 2 * self.cfg.max_batch_size}

    def record_autoscaling_stats(self) -> dict:
        """What Serve's autoscaling policy (serving/app/autoscale.py) scales on, recorded by Serve a few times per
        look-back window when ServeConfig.autoscaling is set. Rows, not requests: one call may carry 1 or 256."""
        return {"queued_rows": sum(self._inflight.values())}

    def info(self) -> dict:
        """What the ingress needs to know (and its /ready asks): limits, and whether this replica drains."""
        if self.pusher is not None:
            self.pusher.ensure_started()
        self.watch.ensure_started()
        self.heap_trim.ensure_started()
        eng = self.engine
        return {"model_name": self.cfg.resolved_model_name(), "max_tokens": eng.max_tokens,
                "hidden_size": eng.schema.hidden_size, "vocab_size": eng.schema.vocab_size, "causal": eng.causal,
                "embedding_normalize": eng.sentence.normalize, "embedding_unsupported": eng.sentence.unsupported,
                "embedding_max_tokens": eng.embedding_max_tokens,
                "truncation_side": getattr(eng.tokenizer, "truncation_side", None) or "right",
                "dtype": str(eng.dtype).removeprefix("torch."),
                "draining": self.draining, "probes": self.probes}

    async def stats(self) -> dict:
        stats = await self._on_engine(self.engine.stats)  # takes the engine lock: off the event loop
        return dict(stats, adapter_loads=self.loads, batches=self._batches)


def lower_thread_priority(steps: int) -> int:
    """Raise the calling thread's nice value by `steps` (at most 19; lowering one's own priority needs no
    privilege). Threads it starts later inherit it. Returns the new value; a no-op where the OS has no
    per-thread nice value."""
    if steps <= 0 or not hasattr(os, "setpriority"):
        return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
    tid = threading.get_native_id()  # Linux: PRIO_PROCESS with a thread id sets that thread only
    value = min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps)
    os.setpriority(os.PRIO_PROCESS, tid, value)
    return value
