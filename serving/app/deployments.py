"""ModelServer: the Ray Serve deployment holding one Engine.

Each call is one row {"adapter", "input_ids", "need"}; @serve.batch gathers rows for MANY
adapters into one Engine.infer (never split by adapter), run off the event loop.
Adapters load on demand on their first row, once per name (an asyncio lock per name),
from AdapterSources (config `adapters` + admin-registered names, kept in this replica).
Errors stay per row: a row result carries "error" and "code" instead of raising.
"""
from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from adapters_store import AdapterError

from ..engine import Engine, Request
from .config import ServeConfig
from .routing import AdapterSources, Source

NEED_TASKS = {"seq": ("seq_cls", "multilabel"), "token": ("token_cls",), "embedding": None}


def row_error(code: str, message: str) -> dict:
    return {"error": message, "code": code}


@serve.deployment
class ModelServer:
    def __init__(self, config: dict):
        cfg = ServeConfig(**config)
        self.cfg = cfg
        torch.set_num_threads(cfg.num_threads)  # Ray sets OMP_NUM_THREADS=1 in replicas
        self.engine = Engine.from_pretrained(cfg.resolved_base_dir(), device=cfg.device, dtype=cfg.dtype,
                                             max_slots=cfg.max_slots, max_rank=cfg.max_rank)
        self.sources = AdapterSources({name: Source(name, s.path, tuple(s.labels) if s.labels else None)
                                       for name, s in cfg.adapters.items()})
        self._heads: dict[str, tuple[str | None, tuple[str, ...] | None]] = {}  # loaded name -> (task, labels)
        self._locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[str | None, int] = {}  # admitted rows per adapter, drained before an unload
        self._batches = 0
        self.loads = 0
        self._run_batch.set_max_batch_size(cfg.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # rows ---------------------------------------------------------------------------------

    async def infer(self, row: dict) -> dict:
        name, need = row.get("adapter"), row.get("need", "embedding")
        load_s = None
        if name is not None:
            try:
                load_s = await self._ensure_loaded(name)
            except LookupError:
                return row_error("adapter_not_found", f"unknown model {name!r}")
            except AdapterError as exc:
                return row_error("adapter_invalid", f"adapter {name!r} cannot be loaded: {exc}")
        wrong = self._wrong_task(name, need)
        if wrong:
            return row_error("wrong_task", wrong)
        self._inflight[name] = self._inflight.get(name, 0) + 1  # no await since the check above: atomic
        try:
            out = await self._run_batch(row)
        finally:
            self._inflight[name] -= 1
            if not self._inflight[name]:
                del self._inflight[name]
        out["load_s"] = load_s
        return out

    def _wrong_task(self, name: str | None, need: str) -> str | None:
        tasks = NEED_TASKS[need]
        task = self._heads.get(name, (None, None))[0] if name is not None else None
        if tasks is None or task in tasks:
            return None
        what = "the base model" if name is None else f"adapter {name!r}"
        has = f"a {task} head" if task else "no task head"
        return f"{what} has {has}; this route needs {' or '.join(tasks)}"

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # set from the config in __init__
    async def _run_batch(self, rows: list[dict]) -> list[dict]:
        requests = [Request(adapter=r.get("adapter"), input_ids=r["input_ids"]) for r in rows]
        start = time.perf_counter()
        results = await asyncio.to_thread(self.engine.infer, requests)
        compute_s = time.perf_counter() - start
        self._batches += 1
        info = {"batch_size": len(rows), "batch_adapters": len({r.get("adapter") for r in rows} - {None}),
                "batch_id": self._batches, "compute_s": compute_s}
        out = []
        for i, (row, res) in enumerate(zip(rows, results)):
            item = dict(info, batch_first=i == 0, task=res.task, labels=list(res.labels) if res.labels else None)
            if res.error is not None:
                gone = "unknown adapter" in res.error or "was unloaded" in res.error
                item.update(row_error("adapter_not_found" if gone else "invalid_input", res.error))
            elif row.get("need") == "embedding":
                item["embedding"] = res.embedding.tolist()
            else:
                item["logits"] = res.logits.tolist() if res.logits is not None else None
            out.append(item)
        return out

    # adapters -----------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _ensure_loaded(self, name: str) -> float | None:
        """Load `name` if it is not loaded yet; the load time, or None if it was loaded already."""
        if name in self._heads:
            return None
        async with self._lock(name):
            if name in self._heads:  # another first request loaded it meanwhile
                return None
            source = self.sources.resolve(name)
            if source is None:
                raise LookupError(name)
            return await self._load(source)

    async def _load(self, source: Source) -> float:
        start = time.perf_counter()
        labels = list(source.labels) if source.labels is not None else None
        spec = await asyncio.to_thread(self.engine.load_adapter, source.name, source.path, labels)
        head = spec.head
        self._heads[source.name] = (head.task, head.labels) if head is not None else (None, None)
        self.loads += 1
        return time.perf_counter() - start

    async def add_adapter(self, name: str, path: str, labels: list[str] | None = None) -> dict:
        """Register (or replace) `name` and load it now, so that a bad adapter is refused at once."""
        async with self._lock(name):
            previous = self.sources.resolve(name)
            try:
                source = self.sources.add(name, path, labels)
                load_s = await self._load(source)
            except AdapterError as exc:
                if previous is None:
                    self.sources.remove(name)
                else:
                    self.sources.add(previous.name, previous.path, previous.labels)
                return row_error("adapter_invalid", str(exc))
        task, labels = self._heads[name]
        return {"name": name, "source": source.path, "task": task, "labels": list(labels) if labels else None,
                "load_s": load_s}

    async def remove_adapter(self, name: str, drain_timeout_s: float = 30.0) -> bool:
        """Unregister `name` at once (later rows get adapter_not_found), let the rows already admitted
        finish (up to drain_timeout_s), then unload it from the engine."""
        async with self._lock(name):
            known = self.sources.remove(name)
            if self._heads.pop(name, None) is not None:
                deadline = time.monotonic() + drain_timeout_s
                while self._inflight.get(name) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(self.engine.unload_adapter, name)
                known = True
        return known

    async def list_adapters(self) -> list[dict]:
        out = []
        for s in self.sources.list():
            task, labels = self._heads.get(s.name, (None, None))
            out.append({"name": s.name, "source": s.path, "loaded": s.name in self._heads, "task": task,
                        "labels": list(labels) if labels else None})
        return out

    # introspection ------------------------------------------------------------------------

    def info(self) -> dict:
        eng = self.engine
        return {"model_name": self.cfg.resolved_model_name(), "max_tokens": eng.max_tokens,
                "hidden_size": eng.schema.hidden_size, "vocab_size": eng.schema.vocab_size, "causal": eng.causal}

    async def stats(self) -> dict:
        stats = await asyncio.to_thread(self.engine.stats)  # takes the engine lock: off the event loop
        return dict(stats, adapter_loads=self.loads, batches=self._batches)
