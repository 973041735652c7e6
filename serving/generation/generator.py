"""Generator: the step loop of one engine's causal base (continuous batching over a paged KV cache).

    gen = engine.generator()            # made on first use, with the engine's KV budget
    seq = gen.add(Request(...))         # any time, from any thread (RequestError for a bad request)
    for update in gen.step(): ...       # one forward; each sequence's new tokens and text
    gen.abort(seq.id)                   # its cache is freed at once
    gen.generate([Request, ...])        # all of it, to the end: one GenerationResult per request

add and abort never wait for a forward: a new sequence joins at the next step; an abort frees the sequence's
cache at once between steps, or at the end of the step in flight.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from adapters_store import AdapterError

from ..errors import RequestError
from . import step as step_forward
from .detok import TextStream
from .kvcache import KVCache
from .sampling import Pick, Sampler, SamplingParams, sample
from .scheduler import Scheduler
from .sequence import FINISHED, Sequence


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated ids only (a stop id included), not the prompt
    text: str = ""  # their text (special tokens skipped, cut before a stop string)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[Pick] | None = None  # per generated token, when sampling.logprobs is set
    prompt_tokens: int = 0
    error: str | None = None
    error_code: str | None = None  # "invalid_input" | "unloaded"


@dataclass
class Update:
    """What one step produced for one sequence."""

    seq: Sequence
    tokens: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    picks: list[Pick] = field(default_factory=list)


class Generator:
    def __init__(self, engine, *, kv_tokens: int, block_size: int = 16, max_step_tokens: int = 512,
                 max_running: int = 256):
        if not engine.causal:
            raise RequestError("this base model is not a causal language model: it cannot generate")
        if max_step_tokens < 1 or max_running < 1:
            raise ValueError(f"max_step_tokens and max_running must be >= 1, got {max_step_tokens}, {max_running}")
        s = engine.schema
        self.engine = engine
        self.cache = KVCache(s.num_layers, s.num_key_value_heads, s.head_dim, kv_tokens, block_size, engine.dtype,
                             engine.device)
        self.scheduler = Scheduler(self.cache, max_step_tokens=max_step_tokens, max_running=max_running,
                                   admit=self._admit, release=self._release)
        self.context = min(engine.max_tokens, s.max_positions)
        self.eos = _eos_ids(engine)
        self._ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}  # not finished, by id
        self._lock = threading.RLock()  # the scheduler and the step
        self._queue_lock = threading.Lock()  # _seqs, _incoming, _aborts
        self._incoming: list[Sequence] = []  # added, not yet given to the scheduler
        self._aborts: list[Sequence] = []
        self.steps = 0
        self.aborted = 0
        from .. import attention

        with engine._lock:
            attention.install(engine.model, engine._state)

    # requests -------------------------------------------------------------------------

    def add(self, request) -> Sequence:
        """Validate a Request and queue its sequence; RequestError/AdapterError for a bad one."""
        eng = self.engine
        params = (request.sampling or SamplingParams())
        if not isinstance(params, SamplingParams):
            raise RequestError("sampling must be a SamplingParams")
        params = params.validated(eng.schema.vocab_size)
        prompt = eng._input_ids(request)
        name = eng._check_adapter(request.adapter)
        spec = eng._specs.get(name) if name is not None else None  # the version it runs on
        if spec is not None and spec.head is not None:
            raise RequestError(f"adapter {name!r} is a {spec.head.task} adapter (a task head on the base): "
                               "it cannot generate text")
        n = request.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        virtual = spec.prompt.shape[0] if spec is not None and spec.prompt is not None else 0
        prefix = spec.prefix.shape[3] if spec is not None and spec.prefix is not None else 0
        used = prefix + virtual + len(prompt)
        if used + n > self.context:
            extra = f" (with the adapter's {prefix + virtual} virtual tokens)" if prefix + virtual else ""
            raise RequestError(f"prompt of {len(prompt)} tokens{extra} plus max_new_tokens {n} is over the context "
                               f"length of {self.context} tokens")
        if used + n > self.cache.num_tokens:
            raise RequestError(f"the sequence needs up to {used + n} tokens of KV cache; this engine's budget is "
                               f"{self.cache.num_tokens}")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos)
        seq = Sequence(next(self._ids), name, spec, prompt, n, params, Sampler(params, eng.schema.vocab_size),
                       TextStream(eng.tokenizer, params.stop), stop_ids, virtual=virtual, prefix=prefix)
        with self._queue_lock:
            self._seqs[seq.id] = seq
            self._incoming.append(seq)
        return seq

    def abort(self, seq_id: int) -> bool:
        """Stop a sequence: its cache is freed now, or at the end of the step in flight. False when it is unknown
        or already finished."""
        with self._queue_lock:
            seq = self._seqs.pop(seq_id, None)
            if seq is None:
                return False
            self._aborts.append(seq)
        if self._lock.acquire(blocking=False):
            try:
                self._take_queue()
            finally:
                self._lock.release()
        return True

    def _take_queue(self) -> None:
        """New sequences to the scheduler, aborted ones out of it (under self._lock)."""
        with self._queue_lock:
            incoming, aborts = self._incoming, self._aborts
            self._incoming, self._aborts = [], []
        gone = set(aborts)
        for seq in incoming:
            if seq not in gone:
                self.scheduler.add(seq)
        for seq in aborts:
            if seq.finished:  # it finished in the step that was in flight
                continue
            with self.engine._lock:
                self.scheduler.remove(seq)
            seq.status, seq.finish_reason = FINISHED, "abort"
            self.aborted += 1

    def has_work(self) -> bool:
        with self._queue_lock:
            return bool(self._seqs)

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self.scheduler.running),
                    "waiting": len(self.scheduler.waiting) + len(self._incoming),
                    "kv_blocks_used": self.cache.used_blocks, "kv_blocks_total": self.cache.num_blocks,
                    "kv_block_size": self.cache.block_size, "kv_bytes": self.cache.nbytes(),
                    "preemptions": self.scheduler.preemptions, "aborted": self.aborted, "steps": self.steps}

    # the loop -------------------------------------------------------------------------

    def step(self) -> list[Update]:
        """One forward over every running sequence's new tokens; returns what each sampling sequence got."""
        with self._lock:
            self._take_queue()
            updates = self._drop_stale()
            with self.engine._lock:
                works = self.scheduler.schedule()
                if not works:
                    self._take_queue()
                    return updates
                logits = step_forward.forward(self.engine, self.cache, works)
            self.steps += 1
            for w in works:
                w.seq.computed = w.stop
            sampling = [w.seq for w in works if w.samples]
            bad = set()  # rows with NaN/Inf logits (an adapter whose weights overflow): errors, never sampled
            if sampling and not bool(torch.isfinite(logits.sum(dim=1)).all()):
                bad = set(torch.nonzero(~torch.isfinite(logits).all(dim=1)).flatten().tolist())
                logits = torch.nan_to_num(logits)
            picks = sample(logits, [s.sampler for s in sampling]) if sampling else []
            for i, (seq, pick) in enumerate(zip(sampling, picks)):
                if i in bad:
                    updates.append(self._fail(seq))
                    continue
                updates.append(self._advance(seq, pick))
            self._take_queue()  # aborts that came during the step
            return updates

    def _advance(self, seq: Sequence, pick: Pick) -> Update:
        seq.output.append(pick.token)
        seq.picks.append(pick)
        text, stopped = seq.text.push(pick.token)
        reason = None
        if stopped or pick.token in seq.stop_ids:
            reason = "stop"
        elif len(seq.output) >= seq.max_new_tokens:
            reason = "length"
        if reason is not None:
            if not stopped:
                text += seq.text.finish()
            self._finish(seq, reason)
        return Update(seq, [pick.token], text, reason is not None, reason, [pick])

    def _drop_stale(self) -> list[Update]:
        """Waiting sequences whose adapter was unloaded or replaced since they were added end with an error:
        a sequence runs on one version of its adapter (a running one keeps its pinned slot to the end)."""
        specs = self.engine._specs
        gone = [s for s in self.scheduler.waiting if s.spec is not None and specs.get(s.adapter) is not s.spec]
        for seq in gone:
            seq.error = f"adapter {seq.adapter!r} was unloaded or replaced before this sequence finished"
            seq.error_code = "unloaded"
            self._finish(seq, None)
        return [Update(seq, [], "", True, None) for seq in gone]

    def _fail(self, seq: Sequence) -> Update:
        from ..engine import non_finite_message

        seq.error, seq.error_code = non_finite_message(seq.adapter, self.engine.dtype), "non_finite"
        self._finish(seq, None)
        return Update(seq, [], "", True, None)

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        with self.engine._lock:
            self.scheduler.remove(seq)
        seq.status, seq.finish_reason = FINISHED, reason
        with self._queue_lock:
            self._seqs.pop(seq.id, None)

    def generate(self, requests) -> list[GenerationResult]:
        """Every request to the end; a bad request is its row's error, the others run."""
        results = [GenerationResult() for _ in requests]
        seqs: dict[int, tuple[int, Sequence]] = {}
        for i, req in enumerate(requests):
            try:
                seq = self.add(req)
            except (RequestError, AdapterError) as exc:
                results[i].error, results[i].error_code = str(exc), "invalid_input"
                continue
            seqs[seq.id] = (i, seq)
        try:
            while any(not s.finished for _, s in seqs.values()):
                if not self.step() and not self.scheduler.running:
                    time.sleep(0.001)  # nothing could be admitted this instant (slots pinned by another thread)
        finally:
            for _, seq in seqs.values():
                if not seq.finished:
                    self.abort(seq.id)
        for i, seq in seqs.values():
            res = results[i]
            res.token_ids, res.text, res.finish_reason = list(seq.output), seq.text.text, seq.finish_reason
            res.prompt_tokens = len(seq.prompt)
            res.error, res.error_code = seq.error, seq.error_code
            if seq.params.logprobs is not None:
                res.logprobs = list(seq.picks)
        return results

    # slots and prefixes (scheduler callbacks; the engine lock is held) -----------------

    def _admit(self, seq: Sequence) -> bool:
        if seq.spec is None:
            seq.slot = -1
            return True
        try:
            seq.slot = self.engine.pool.acquire([seq.spec])[seq.spec.name]
        except RuntimeError:  # every slot is pinned by running sequences of other adapters: wait
            return False
        if seq.prefix and seq.computed < seq.prefix:
            self._write_prefix(seq)
            seq.computed = seq.prefix
        return True

    def _release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.engine.pool.release([seq.slot])
            seq.slot = -1

    def _write_prefix(self, seq: Sequence) -> None:
        """The adapter's prefix keys/values into the sequence's first cache positions, every layer."""
        prefix = self.engine.pool.prefix.data[seq.slot, :, :, :, :seq.prefix]  # [layers, 2, kv, P, d]
        rows = torch.tensor(self.cache.rows(seq.blocks, 0, seq.prefix), device=self.engine.device)
        self.cache.keys[:, rows] = prefix[:, 0].transpose(1, 2).to(self.cache.keys.dtype)
        self.cache.values[:, rows] = prefix[:, 1].transpose(1, 2).to(self.cache.values.dtype)


def _eos_ids(engine) -> frozenset[int]:
    ids = set()
    for source in (getattr(engine.model, "generation_config", None), engine.model.config, engine.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
