"""Engine: one frozen base model, many adapters in slots, one batched forward per group of rows.

Path of a batch: validate rows -> group them (at most max_slots adapters, a token budget,
lengths close enough that padding costs less than another forward)
-> per group: SlotPool.acquire -> rows with the same input and the same body (head-only
adapters, or one body under several heads) become one body row -> BatchPlan.build
-> base forward with hooked layers (LoRA/IA3 linears, bottleneck sub-layers, prefix
attention; prompt rows get their virtual tokens as input embeddings)
-> heads per request row and pooled embeddings -> results in the caller's order.
"""
from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from adapters_store import AdapterError, AdapterSpec, BaseSchema, FileLimits, load_adapter_dir
from adapters_store.base import is_causal_config

from . import attention, kernels
from .batch import BatchPlan
from .bottleneck import Configs, attach_bottleneck
from .errors import RequestError
from .generation.sampling import SamplingParams
from .heads import head_logits, pool
from .layers import GROUP_IA3, GROUP_PLAIN, GROUP_PREFIX, GROUP_PROMPT, ForwardState, attach_linear
from .sentence import SentencePipeline, read_sentence_pipeline
from .slots import SlotPool

# A forward costs about as much as this many padded tokens (MiniLM, CPU): rows are split into
# separate forwards by length only where that saves more padding than this.
FORWARD_OVERHEAD_TOKENS = 256

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def auto_dtype(device: str | torch.device) -> str:
    """The dtype `dtype="auto"` means on `device`: a 16-bit one where the hardware multiplies it natively,
    else float32. CUDA: bfloat16 where supported, else float16. CPU: bfloat16 where the cores have AMX or
    AVX512-BF16 (there a bfloat16 forward of MiniLM at 16 x 128 tokens is 3.4x faster than float32, with
    embeddings at cosine >= 0.9999 of float32's), else float32 (bfloat16 would be emulated, and slower)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu":
        native = any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                                "_is_avx512_bf16_supported"))
        return "bfloat16" if native else "float32"
    return "float32"


@dataclass(frozen=True)
class Request:
    adapter: str | None = None
    input_ids: Sequence[int] | None = None
    text: str | None = None
    max_new_tokens: int = 16  # generate() only
    sampling: SamplingParams | None = None  # generate() only: greedy when None


@dataclass
class Result:
    logits: torch.Tensor | None = None  # see DESIGN.md: [C], [len, C], [len, vocab] or None
    embedding: torch.Tensor | None = None  # [hidden]
    error: str | None = None
    # why the row has an error: "invalid_input" (the request), "unloaded" (its adapter went while it waited),
    # "non_finite" (its adapter's weights overflow on this input: NaN/Inf outputs are never returned)
    error_code: str | None = None
    task: str | None = None  # the adapter head's task: seq_cls | multilabel | token_cls | None
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _Row:
    index: int  # position in the caller's list
    ids: list[int]
    name: str | None
    virtual: int = 0  # prompt tokens prepended (prompt/P-tuning adapters)

    @property
    def length(self) -> int:
        return self.virtual + len(self.ids)


class Engine:
    def __init__(self, model: nn.Module, tokenizer, *, causal: bool, device: torch.device, dtype: torch.dtype,
                 max_slots: int = 64, max_rank: int = 64, max_tokens: int | None = None,
                 max_batch_tokens: int = 32768, max_virtual_tokens: int = 128, max_bottleneck: int = 256,
                 kernel: str | None = None, limits: FileLimits = FileLimits(), kv_tokens: int = 8192,
                 kv_block_size: int = 16, max_step_tokens: int = 512, max_running: int = 256):
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if max_virtual_tokens < 1 or max_bottleneck < 1:
            raise ValueError(f"max_virtual_tokens and max_bottleneck must be >= 1, "
                             f"got {max_virtual_tokens} and {max_bottleneck}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.model, self.tokenizer, self.causal = model, tokenizer, causal
        self.device, self.dtype = device, dtype
        self.schema = BaseSchema.from_model(model, causal)
        self.max_rank, self.limits = max_rank, limits
        self.max_virtual_tokens, self.max_bottleneck = max_virtual_tokens, max_bottleneck
        self.max_tokens = min(max_tokens or self.schema.max_positions, self.schema.max_positions)
        self.max_batch_tokens = max(max_batch_tokens, self.max_tokens)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = pad if pad is not None else (getattr(model.config, "pad_token_id", None) or 0)
        self._state = ForwardState(kernels=kernels.select(device.type, kernel))
        modules = dict(model.named_modules())
        linears = {name: modules[name] for name in self.schema.linears}
        self._modules = modules
        self._linears = linears
        self._hooked: set[str] = set()
        self._configs = Configs()  # bottleneck configurations -> BatchPlan groups
        prefix_shape = (self.schema.num_layers, self.schema.num_key_value_heads, self.schema.head_dim)
        self.pool = SlotPool(max_slots, max_rank, dtype, device, self.schema.hidden_size, linears,
                             self.schema.linears, self._on_new_slots, max_bottleneck=max_bottleneck,
                             prefix_shape=prefix_shape)
        self._specs: dict[str, AdapterSpec] = {}
        self._bodies: dict[str, str] = {}  # adapter -> fingerprint of its body, computed on first need
        self._lock = threading.RLock()
        self._workspace: dict = {}  # kernels' scratch buffers, reused by every forward (under the lock)
        self.forwards = 0
        self.body_rows = 0  # rows the body ran for (multi-task rows sharing a body count once)
        self.sentence = SentencePipeline()  # what /v1/embeddings serves on `embedding` (from_pretrained reads it)
        # generation (causal bases): the KV budget in tokens and the step loop's limits; made on first use
        self._generation = dict(kv_tokens=kv_tokens, block_size=kv_block_size, max_step_tokens=max_step_tokens,
                                max_running=max_running)
        self._generator = None

    @classmethod
    def from_pretrained(cls, base_dir: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                        max_slots: int = 64, **limits) -> "Engine":
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        if dtype == "auto":
            dtype = auto_dtype(device)
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
        causal = is_causal_config(config)
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(str(base_dir), dtype=torch_dtype, local_files_only=True)
        model.to(device).eval().requires_grad_(False)
        tokenizer = None  # without tokenizer files, requests must carry input_ids
        if any((Path(base_dir) / f).is_file() for f in TOKENIZER_FILES):
            # transformers builds an empty tokenizer (every word [UNK]) from a folder without these files
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
            except (OSError, ValueError):
                tokenizer = None
        engine = cls(model, tokenizer, causal=causal, device=torch.device(device), dtype=torch_dtype,
                     max_slots=max_slots, **limits)
        engine.sentence = read_sentence_pipeline(base_dir)
        return engine

    @property
    def embedding_max_tokens(self) -> int:
        """The longest input whose `embedding` is the base's sentence-transformers embedding: its max_seq_length
        (longer inputs it cuts; serving/sentence.py), at most max_tokens. /v1/embeddings keeps to it."""
        return min(self.sentence.max_tokens or self.max_tokens, self.max_tokens)

    # adapters -----------------------------------------------------------------------------

    def validate_adapter(self, name: str, path: str | Path, labels: list[str] | None = None) -> AdapterSpec:
        """Read and validate the adapter folder against this engine's base and limits, without loading it."""
        spec = load_adapter_dir(path, self.schema, name=name, max_rank=self.max_rank, labels=labels,
                                limits=self.limits)
        self._check_limits(spec, path)
        return spec

    def load_adapter(self, name: str, path: str | Path, labels: list[str] | None = None) -> AdapterSpec:
        """Validate the adapter folder and make it resident; a name loaded again is replaced."""
        spec = self.validate_adapter(name, path, labels)
        with self._lock:
            self._specs[name] = spec
            self._bodies.pop(name, None)
            self.pool.drop(name)
            try:
                self.pool.release(self.pool.acquire([spec]).values())
            except Exception as exc:  # not resident: not registered either (the rows of other adapters run on)
                del self._specs[name]
                if isinstance(exc, AdapterError):
                    raise
                raise AdapterError(f"adapter {name!r} could not be made resident: {type(exc).__name__}: "
                                   f"{str(exc)[:300]}") from exc
        return spec

    def unload_adapter(self, name: str) -> None:
        with self._lock:  # waits for a running batch
            if self._specs.pop(name, None) is None:
                raise AdapterError(f"unknown adapter {name!r}")
            self._bodies.pop(name, None)
            self.pool.drop(name)

    def adapters(self) -> dict[str, AdapterSpec]:
        with self._lock:
            return dict(self._specs)

    def stats(self) -> dict:
        generator = self._generator  # its stats outside the engine lock: a step takes its own lock, then this one
        generation = {"generation": generator.stats()} if generator is not None else {}
        with self._lock:
            slot_bytes = self.pool.nbytes()
            return {**generation,
                "max_slots": self.pool.max_slots, "registered": len(self._specs),
                "resident": len(self.pool.resident()), "adapted_modules": len(self.pool.lora),
                "slot_bytes": slot_bytes, "slot_bytes_per_slot": slot_bytes / self.pool.max_slots,
                "loads": self.pool.loads, "evictions": self.pool.evictions, "forwards": self.forwards,
                "body_rows": self.body_rows,
            }

    def _fingerprint(self, name: str) -> str:
        """The adapter's body fingerprint, computed once per load (callers hold the lock)."""
        if name not in self._bodies:
            self._bodies[name] = _body_fingerprint(self._specs[name])
        return self._bodies[name]

    def _check_limits(self, spec: AdapterSpec, path) -> None:
        n = spec.num_virtual_tokens
        if n > self.max_virtual_tokens:
            raise AdapterError(f"{path}: {n} virtual tokens, over this engine's max_virtual_tokens "
                               f"{self.max_virtual_tokens}")
        if n >= self.schema.max_positions:
            raise AdapterError(f"{path}: {n} virtual tokens leave no room for input in the base's "
                               f"{self.schema.max_positions} positions")
        for sub, bn in spec.bottleneck.items():
            if bn.size > self.max_bottleneck:
                raise AdapterError(f"{path}: bottleneck at '{sub}' has {bn.size} units, over this engine's "
                                   f"max_bottleneck {self.max_bottleneck}")
        for module, base in spec.base_copies.items():
            weight = self._linears[module].weight.detach()
            if not torch.equal(base.to(device=weight.device, dtype=weight.dtype), weight):
                raise AdapterError(f"{path}: the adapter carries a changed copy of base layer '{module}' "
                                   "(trained or resized base weights); polyhead serves one frozen base")

    def _on_new_slots(self, kind: str, name: str, slots) -> None:
        """A slot stack was created (SlotPool): hook the module that reads it."""
        if kind in ("lora", "ia3"):
            if kind == "lora":
                self._state.add_module(name, slots)
            else:
                self._state.ia3[name] = slots
            if name not in self._hooked:
                attach_linear(name, self._linears[name], self._state)
                self._hooked.add(name)
        elif kind == "bottleneck":
            attach_bottleneck(self._modules[name], slots, self._state, self._configs)
        elif kind == "prefix":
            self._state.prefix_slots = slots
            attention.install(self.model, self._state)

    def _group(self, spec: AdapterSpec) -> int:
        """The BatchPlan group of an adapter's rows: each kind (and bottleneck configuration) is one range."""
        if spec.prefix is not None:
            return GROUP_PREFIX
        if spec.prompt is not None:
            return GROUP_PROMPT
        if spec.bottleneck:
            return self._configs.group(next(iter(spec.bottleneck.values())))
        return GROUP_IA3 if spec.ia3 else GROUP_PLAIN

    # generation ---------------------------------------------------------------------------

    def generator(self):
        """This engine's generation loop (serving/generation/generator.py), made on first use."""
        from .generation.generator import Generator

        with self._lock:
            if self._generator is None:
                self._generator = Generator(self, **self._generation)
            return self._generator

    def generate(self, requests: Sequence[Request]):
        """Generate for every request (continuous batching); one GenerationResult per request, in order.
        A request that cannot run is its row's `error`; the others run."""
        if not self.causal:
            from .generation.generator import GenerationResult

            return [GenerationResult(error=self._cannot_generate(r.adapter), error_code="invalid_input")
                    for r in requests]
        return self.generator().generate(requests)

    def _cannot_generate(self, name) -> str:
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is not None and spec.head is not None:
            return (f"adapter {name!r} is a {spec.head.task} adapter on an encoder base (it classifies, tags or "
                    "embeds): it cannot generate text")
        return "this base model is not a causal language model: it cannot generate text"

    # inference ----------------------------------------------------------------------------

    def infer(self, requests: Sequence[Request]) -> list[Result]:
        results = [Result() for _ in requests]
        rows = []
        for i, req in enumerate(requests):
            try:
                rows.append(self._row(i, req))
            except (RequestError, AdapterError) as exc:
                results[i].error, results[i].error_code = str(exc), "invalid_input"
        for group in self._groups(rows):
            self._run(group, results)
        return results

    def _row(self, index: int, req: Request) -> _Row:
        ids = self._input_ids(req)
        name = self._check_adapter(req.adapter)
        spec = self._specs.get(name) if name is not None else None
        n = spec.num_virtual_tokens if spec is not None else 0
        if n and len(ids) + n > self.schema.max_positions:
            raise RequestError(f"input has {len(ids)} tokens; with the adapter's {n} virtual tokens that is over "
                               f"the base's {self.schema.max_positions} positions")
        return _Row(index, ids, name, spec.prompt.shape[0] if spec is not None and spec.prompt is not None else 0)

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
        """Rows grouped into forwards: at most max_slots distinct adapters and max_batch_tokens padded tokens,
        then split by length where the padding saved outweighs another forward."""
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
                too_long = (len(current) + 1) * max(longest, row.length) > self.max_batch_tokens
                if current and (too_many or too_long):
                    groups.append(current)
                    current, adapters, longest = [], set(), 0
                current.append(row)
                longest = max(longest, row.length)
                if name is not None:
                    adapters.add(name)
        if current:
            groups.append(current)
        return [part for group in groups for part in _split_by_length(group)]

    def _run(self, group: list[_Row], results: list[Result]) -> None:
        with self._lock:
            live = [r for r in group if r.name is None or r.name in self._specs]
            for r in group:
                if r not in live:
                    results[r.index].error = f"adapter {r.name!r} was unloaded"
                    results[r.index].error_code = "unloaded"
            if not live:
                return
            specs = {r.name: self._specs[r.name] for r in live if r.name is not None}
            slot_of = self.pool.acquire(list(specs.values()))
            try:
                # one body row per (input, body): head-only adapters run the base body, equal bodies run once
                bodies: dict[tuple, int] = {}
                body_rows: list[tuple[_Row, int]] = []  # (row whose input it is, body slot)
                body_of = []
                inputs = Counter(tuple(r.ids) for r in live)
                for r in live:
                    ids = tuple(r.ids)
                    # the body's identity: none for the base and head-only adapters; a fingerprint only where
                    # another row has the same input (hashing every adapter's weights at load would cost more)
                    if r.name is None or not specs[r.name].has_body:
                        fingerprint = None
                    elif inputs[ids] > 1:
                        fingerprint = self._fingerprint(r.name)
                    else:
                        fingerprint = ("adapter", r.name)
                    key = (ids, fingerprint)
                    if key not in bodies:
                        bodies[key] = len(body_rows)
                        body_rows.append((r, slot_of[r.name] if fingerprint is not None else -1))
                    body_of.append(bodies[key])
                groups = {slot_of[n]: self._group(spec) for n, spec in specs.items()}
                plan = BatchPlan.build([slot for _, slot in body_rows], self.device, self._workspace, groups)
                position = {b: pos for pos, b in enumerate(plan.order)}  # body row -> sorted position
                ordered = [body_rows[b] for b in plan.order]
                wanted = [(position[body_of[i]], slot_of[r.name] if r.name is not None else -1)
                          for i, r in enumerate(live)]
                self._state.begin(plan)
                try:
                    outputs = self._forward(ordered, plan, wanted)
                finally:
                    self._state.end()
            finally:
                self.pool.release(slot_of.values())
        for i, row in enumerate(live):
            res = results[row.index]
            logits, embedding = outputs[i]
            if not (bool(torch.isfinite(embedding).all()) and (logits is None or bool(torch.isfinite(logits).all()))):
                res.error, res.error_code = non_finite_message(row.name, self.dtype), "non_finite"
                continue
            res.logits, res.embedding = logits, embedding
            spec = specs.get(row.name)
            if spec is not None and spec.head is not None:
                res.task, res.labels = spec.head.task, spec.head.labels

    @torch.inference_mode()
    def _forward(self, rows: list[tuple[_Row, int]], plan: BatchPlan,
                 wanted: list[tuple[int, int]]) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """rows: body rows in plan order (input row, body slot); wanted: (body position, head slot) per result."""
        dev = self.device
        virtual = [r.virtual for r, _ in rows]  # prompt tokens before each row's input
        lengths = [r.length for r, _ in rows]
        B, T = len(rows), max(lengths)
        ids = torch.tensor([[self.pad_id] * r.virtual + r.ids + [self.pad_id] * (T - r.length) for r, _ in rows],
                           dtype=torch.long, device=dev)  # [B, T]
        pos = torch.arange(T, device=dev)
        start = torch.tensor(virtual, device=dev).unsqueeze(1)  # [B, 1]
        end = torch.tensor(lengths, device=dev).unsqueeze(1)
        mask = (pos < end).long()  # [B, T]: virtual and real tokens
        real = (pos >= start) & (pos < end)  # [B, T]: the input's own tokens
        inputs = {"attention_mask": None if min(lengths) == T else mask}
        embeds = self._prompt_embeddings(ids, plan, virtual)
        if embeds is None:
            inputs["input_ids"] = ids
        else:
            inputs["inputs_embeds"] = embeds
        prefix = plan.ranges.get(GROUP_PREFIX)
        if prefix is not None:
            row0 = prefix[0]
            slots = plan.token_slots[row0:]
            n_prefix = torch.tensor([self.pool.prefix.lengths[s] for s in plan.row_slots[row0:]], device=dev)
            self._state.prefix_rows = (row0, slots, n_prefix)
            shift = torch.zeros(B, dtype=torch.long, device=dev)
            shift[row0:] = n_prefix
            # real tokens follow the prefix; a prefix row's padding beside a longer row would pass the last
            # position (512 on BERT: an index error), and is masked: it takes the last one
            inputs["position_ids"] = (pos.unsqueeze(0) + shift.unsqueeze(1)).clamp(max=self.schema.max_positions - 1)
        self.forwards += 1
        self.body_rows += B
        if self.causal:
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(**inputs).last_hidden_state  # [B, T, H]
            pooled = None
        else:
            out = self.model(**inputs)
            hidden, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
        heads = {} if self.causal else head_logits(self.pool.heads, wanted, hidden, pooled)
        emb = pool(hidden, real.long(), self.sentence.pooling).cpu()
        lm_logits = self.model.get_output_embeddings()(hidden) if self.causal else None  # [B, T, V], hooked
        results = []
        for i, (body, _) in enumerate(wanted):
            v, n = virtual[body], lengths[body]
            if lm_logits is not None:
                logits = lm_logits[body, v:n]  # [len, vocab]
            else:
                logits = heads.get(i)
                if logits is not None and logits.dim() == 2:
                    logits = logits[v:n]  # token head: the input's own positions
            if logits is not None:
                logits = logits.to(torch.float32).cpu()
            results.append((logits, emb[body]))
        return results

    def _prompt_embeddings(self, ids: torch.Tensor, plan: BatchPlan, virtual: list[int]) -> torch.Tensor | None:
        """Word embeddings with each prompt row's virtual tokens written in front, or None without prompt rows."""
        rng = plan.ranges.get(GROUP_PROMPT)
        if rng is None:
            return None
        row0, row1 = rng
        embeds = self.model.get_input_embeddings()(ids)  # [B, T, H]
        P = max(virtual[row0:row1])
        n = torch.tensor(virtual[row0:row1], device=ids.device).unsqueeze(1)  # [k, 1]
        prompts = self.pool.prompt.data[:, :P].index_select(0, plan.token_slots[row0:row1])  # [k, P, H]
        keep = (torch.arange(P, device=ids.device) >= n).unsqueeze(2)  # [k, P, 1]: past the row's prompt
        embeds[row0:row1, :P] = torch.where(keep, embeds[row0:row1, :P], prompts.to(embeds.dtype))
        return embeds


def non_finite_message(adapter: str | None, dtype: torch.dtype) -> str:
    """The row error of a row whose outputs are NaN or Inf (error_code "non_finite")."""
    what = "the base model" if adapter is None else f"adapter {adapter!r}"
    return (f"{what} gave non-finite values (NaN or Inf) on this input: its weights overflow "
            f"{str(dtype).removeprefix('torch.')}")


def _split_by_length(rows: list[_Row]) -> list[list[_Row]]:
    """Split a forward's rows by length (longest first) where padding them together would cost more
    padded tokens than FORWARD_OVERHEAD_TOKENS: rows of very different lengths do not pay for each other."""
    rows = sorted(rows, key=lambda r: -r.length)
    parts, start = [], 0
    for i in range(1, len(rows)):
        saved = (len(rows) - i) * (rows[start].length - rows[i].length)
        if saved > FORWARD_OVERHEAD_TOKENS:
            parts.append(rows[start:i])
            start = i
    parts.append(rows[start:])
    return [p for p in parts if p]


def _body_fingerprint(spec: AdapterSpec) -> str:
    """Identity of what an adapter changes in the body (not its head).

    Rows with one input and equal fingerprints run the body once and fan out to their heads.
    """
    digest = hashlib.sha256()

    def add(*items) -> None:
        for item in items:
            if isinstance(item, torch.Tensor):
                digest.update(str(tuple(item.shape)).encode())
                digest.update(item.detach().to(torch.float32).contiguous().numpy().tobytes())
            elif isinstance(item, tuple):
                add(*item)
            else:
                digest.update(repr(item).encode())

    for module, d in sorted(spec.lora.items()):
        add("lora", module, d.A, d.B, d.scale, d.magnitude)
    for module, v in sorted(spec.ia3.items()):
        add("ia3", module, v.scale, v.on_input)
    for sub, bn in sorted(spec.bottleneck.items()):
        add("bottleneck", sub, bn.down, bn.down_bias, bn.up, bn.up_bias, bn.activation, bn.scaling,
            bn.original_ln_before, bn.original_ln_after, bn.residual_before_ln, bn.adapter_residual_before_ln,
            bn.ln_before, bn.ln_after)
    add("prompt", spec.prompt, "prefix", spec.prefix)
    return digest.hexdigest()
