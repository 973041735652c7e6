"""Engine: one frozen base model, many adapters in slots, one batched forward per group of rows.

Path of a batch: validate rows -> group them (at most max_slots adapters, a token budget)
-> per group: SlotPool.acquire -> BatchPlan.build -> base forward with hooked layers
-> heads and pooled embeddings -> results in the caller's order.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from adapters_store import AdapterError, AdapterSpec, BaseSchema, FileLimits, load_adapter_dir
from adapters_store.base import is_causal_config

from . import kernels
from .batch import BatchPlan
from .errors import RequestError
from .heads import head_logits, mean_pool
from .layers import ForwardState, attach_lora
from .slots import LoraSlots, SlotPool

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Request:
    adapter: str | None = None
    input_ids: Sequence[int] | None = None
    text: str | None = None
    max_new_tokens: int = 16


@dataclass
class Result:
    logits: torch.Tensor | None = None  # see DESIGN.md: [C], [len, C], [len, vocab] or None
    embedding: torch.Tensor | None = None  # [hidden]
    error: str | None = None
    task: str | None = None  # the adapter head's task: seq_cls | multilabel | token_cls | None
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _Row:
    index: int  # position in the caller's list
    ids: list[int]
    name: str | None


class Engine:
    def __init__(self, model: nn.Module, tokenizer, *, causal: bool, device: torch.device, dtype: torch.dtype,
                 max_slots: int = 64, max_rank: int = 64, max_tokens: int | None = None,
                 max_batch_tokens: int = 32768, kernel: str | None = None, limits: FileLimits = FileLimits()):
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.model, self.tokenizer, self.causal = model, tokenizer, causal
        self.device, self.dtype = device, dtype
        self.schema = BaseSchema.from_model(model, causal)
        self.max_rank, self.limits = max_rank, limits
        self.max_tokens = min(max_tokens or self.schema.max_positions, self.schema.max_positions)
        self.max_batch_tokens = max(max_batch_tokens, self.max_tokens)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = pad if pad is not None else (getattr(model.config, "pad_token_id", None) or 0)
        self._state = ForwardState(kernels=kernels.select(device.type, kernel))
        modules = dict(model.named_modules())
        linears = {name: modules[name] for name in self.schema.linears}
        self.pool = SlotPool(max_slots, max_rank, dtype, device, self.schema.hidden_size, linears,
                             self.schema.linears, self._on_new_module)
        self._linears = linears
        self._specs: dict[str, AdapterSpec] = {}
        self._lock = threading.RLock()
        self._workspace: dict = {}  # kernels' scratch buffers, reused by every forward (under the lock)
        self.forwards = 0

    @classmethod
    def from_pretrained(cls, base_dir: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        max_slots: int = 64, **limits) -> "Engine":
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
        causal = is_causal_config(config)
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(str(base_dir), dtype=torch_dtype, local_files_only=True)
        model.to(device).eval().requires_grad_(False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None  # requests must then carry input_ids
        return cls(model, tokenizer, causal=causal, device=torch.device(device), dtype=torch_dtype,
                   max_slots=max_slots, **limits)

    # adapters -----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path, labels: list[str] | None = None) -> AdapterSpec:
        """Validate the adapter folder and make it resident; a name loaded again is replaced."""
        spec = load_adapter_dir(path, self.schema, name=name, max_rank=self.max_rank, labels=labels,
                                limits=self.limits)
        for module, saved in spec.base_copies.items():
            weight = self._linears[module].weight.detach()
            if not torch.equal(saved.to(device=weight.device, dtype=weight.dtype), weight):
                raise AdapterError(f"{path}: the adapter carries a changed copy of base layer '{module}' "
                                   "(trained or resized base weights); polyhead serves one frozen base")
        with self._lock:
            self._specs[name] = spec
            self.pool.drop(name)
            self.pool.release(self.pool.acquire([spec]).values())
        return spec

    def unload_adapter(self, name: str) -> None:
        with self._lock:  # waits for a running batch
            if self._specs.pop(name, None) is None:
                raise AdapterError(f"unknown adapter {name!r}")
            self.pool.drop(name)

    def adapters(self) -> dict[str, AdapterSpec]:
        with self._lock:
            return dict(self._specs)

    def stats(self) -> dict:
        with self._lock:
            slot_bytes = self.pool.nbytes()
            return {
                "max_slots": self.pool.max_slots, "registered": len(self._specs),
                "resident": len(self.pool.resident()), "adapted_modules": len(self.pool.lora),
                "slot_bytes": slot_bytes, "slot_bytes_per_slot": slot_bytes / self.pool.max_slots,
                "loads": self.pool.loads, "evictions": self.pool.evictions, "forwards": self.forwards,
            }

    def _on_new_module(self, name: str, slots: LoraSlots) -> None:
        attach_lora(name, self._linears[name], slots, self._state)

    # inference ----------------------------------------------------------------------------

    def infer(self, requests: Sequence[Request]) -> list[Result]:
        results = [Result() for _ in requests]
        rows = []
        for i, req in enumerate(requests):
            try:
                rows.append(_Row(i, self._input_ids(req), self._check_adapter(req.adapter)))
            except (RequestError, AdapterError) as exc:
                results[i].error = str(exc)
        for group in self._groups(rows):
            self._run(group, results)
        return results

    def _check_adapter(self, name) -> str | None:
        if name is None:
            return None
        if not isinstance(name, str) or name not in self._specs:
            raise RequestError(f"unknown adapter {str(name)[:80]!r}")
        return name

    def _input_ids(self, req: Request) -> list[int]:
        if (req.input_ids is None) == (req.text is None):
            raise RequestError("give exactly one of input_ids or text")
        if req.text is not None:
            if self.tokenizer is None:
                raise RequestError("this base model has no tokenizer: send input_ids")
            if not isinstance(req.text, str):
                raise RequestError("text must be a string")
            ids = self.tokenizer(req.text, add_special_tokens=True, truncation=False)["input_ids"]
        else:
            ids = req.input_ids.tolist() if isinstance(req.input_ids, torch.Tensor) else list(req.input_ids)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise RequestError("input_ids must be integers")
            bad = [t for t in ids if not 0 <= t < self.schema.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.schema.vocab_size})")
        if not ids:
            raise RequestError("empty input")
        if len(ids) > self.max_tokens:
            raise RequestError(f"input has {len(ids)} tokens, over the limit of {self.max_tokens}")
        return ids

    def _groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows grouped into forwards: at most max_slots distinct adapters and max_batch_tokens padded tokens."""
        by_name: OrderedDict[str | None, list[_Row]] = OrderedDict()
        for row in rows:
            by_name.setdefault(row.name, []).append(row)
        with self._lock:  # another thread may be loading or evicting
            resident = set(self.pool.resident())
        names = sorted(by_name, key=lambda n: (n is not None, n not in resident))
        groups, current, adapters, longest = [], [], set(), 0
        for name in names:
            for row in by_name[name]:
                new_adapter = name is not None and name not in adapters
                too_many = new_adapter and len(adapters) == self.pool.max_slots
                too_long = (len(current) + 1) * max(longest, len(row.ids)) > self.max_batch_tokens
                if current and (too_many or too_long):
                    groups.append(current)
                    current, adapters, longest = [], set(), 0
                current.append(row)
                longest = max(longest, len(row.ids))
                if name is not None:
                    adapters.add(name)
        if current:
            groups.append(current)
        return groups

    def _run(self, group: list[_Row], results: list[Result]) -> None:
        with self._lock:
            live = [r for r in group if r.name is None or r.name in self._specs]
            for r in group:
                if r not in live:
                    results[r.index].error = f"adapter {r.name!r} was unloaded"
            if not live:
                return
            specs = {r.name: self._specs[r.name] for r in live if r.name is not None}
            slot_of = self.pool.acquire(list(specs.values()))
            try:
                plan = BatchPlan.build([slot_of[r.name] if r.name else -1 for r in live], self.device, self._workspace)
                rows = [live[i] for i in plan.order]
                self._state.begin(plan)
                try:
                    outputs = self._forward(rows, plan)
                finally:
                    self._state.end()
            finally:
                self.pool.release(slot_of.values())
        for pos, row in enumerate(rows):
            res = results[row.index]
            res.logits, res.embedding = outputs[pos]
            spec = specs.get(row.name)
            if spec is not None and spec.head is not None:
                res.task, res.labels = spec.head.task, spec.head.labels

    @torch.inference_mode()
    def _forward(self, rows: list[_Row], plan: BatchPlan) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        B, T = len(rows), max(len(r.ids) for r in rows)
        ids = torch.tensor([r.ids + [self.pad_id] * (T - len(r.ids)) for r in rows], dtype=torch.long)  # [B, T]
        mask = torch.tensor([[1] * len(r.ids) + [0] * (T - len(r.ids)) for r in rows], dtype=torch.long)  # [B, T]
        ids, mask = ids.to(self.device), mask.to(self.device)
        model_mask = None if all(len(r.ids) == T for r in rows) else mask  # no padding: attention needs no mask
        self.forwards += 1
        if self.causal:
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(input_ids=ids, attention_mask=model_mask).last_hidden_state  # [B, T, H]
            lm_logits = self.model.get_output_embeddings()(hidden)  # [B, T, V]
            heads = {i: lm_logits[i] for i in range(B)}
        else:
            out = self.model(input_ids=ids, attention_mask=model_mask)
            hidden, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
            heads = head_logits(self.pool.heads, plan, hidden, pooled)
        emb = mean_pool(hidden, mask).cpu()
        results = []
        for i, r in enumerate(rows):
            logits = heads.get(i)
            if logits is not None:
                logits = logits[: len(r.ids)] if logits.dim() == 2 else logits
                logits = logits.to(torch.float32).cpu()
            results.append((logits, emb[i]))
        return results
