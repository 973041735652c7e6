"""Sampling one token per sequence from a step's logits: per-request parameters, penalties, seeded generators.

Semantics, for row i of logits [M, V] (the row of sequence samplers[i], which generated counts[t] of token t):
    x = logits[i] - presence_penalty * (counts > 0) - frequency_penalty * counts      # OpenAI's penalties
    temperature == 0:  token = argmax(x)                                              # ties: the lowest id
    otherwise:         p = softmax(x / temperature) over the top_k largest (0 = all), best first, cut to the
                       smallest prefix whose mass reaches top_p (at least one token);
                       u = torch.rand((), generator=samplers[i].generator)           # one number per step
                       token = the first kept token whose cumulative p exceeds u * sum(p)
    logprob = log_softmax(logits[i])[token]; top = the `logprobs` largest of log_softmax(logits[i]), best first
Logprobs are of the raw row (before penalties and temperature), as vLLM reports by default. A sampled row reads
one number from its own generator per step and nothing else touches it, so a seeded request gets the same tokens
alone or in any batch. Plain greedy rows (temperature 0, no penalties) are one argmax over all of them.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace

import torch

from ..errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1


def _real(name: str, value, low: float, high: float, *, open_low: bool = False) -> float:
    """`value` as a float inside [low, high] ((low, high] when open_low), else a RequestError naming `name`."""
    allowed = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(f"{name} must be a number in {allowed}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (open_low and value == low):
        raise RequestError(f"{name} must be a number in {allowed}, got {value!r}")
    return value


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int inside [low, high] (no upper bound when high is None), else a RequestError."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RequestError(f"{name} must be {allowed}, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise RequestError(f"{name} must be {allowed}, got {value!r}")
    return value


def _stop_strings(value) -> tuple[str, ...]:
    stop = (value,) if isinstance(value, str) else value
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"stop must be a string or a list of strings, got {value!r}")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got one of {len(s)}")
    return tuple(stop)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); [0, 2]
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    seed: int | None = None  # the sequence's own generator; None = seeded from os.urandom
    stop: tuple[str, ...] = ()  # stop strings (detok.TextStream finds them)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = none; 0 = the chosen token's; k in 1..20 = also the top k

    def validated(self, vocab_size: int) -> "SamplingParams":
        """A normalized copy (floats, ints, tuples); RequestError naming the field and its range for a bad value."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise RequestError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        return replace(
            self,
            temperature=_real("temperature", self.temperature, 0, 2),
            top_p=_real("top_p", self.top_p, 0, 1, open_low=True),
            top_k=_integer("top_k", self.top_k, 0),
            presence_penalty=_real("presence_penalty", self.presence_penalty, -2, 2),
            frequency_penalty=_real("frequency_penalty", self.frequency_penalty, -2, 2),
            seed=None if self.seed is None else _integer("seed", self.seed, 0, MAX_SEED),
            stop=_stop_strings(self.stop),
            stop_token_ids=tuple(_integer("stop_token_ids", t, 0, vocab_size - 1) for t in self.stop_token_ids),
            logprobs=None if self.logprobs is None else _integer("logprobs", self.logprobs, 0, MAX_LOGPROBS))


class Sampler:
    """One sequence's sampling state: its params, its own torch.Generator (seeded from `seed`, else from
    os.urandom), and the counts of the tokens it has generated (for the penalties)."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params.validated(vocab_size)
        self.vocab_size = vocab_size
        seed = self.params.seed if self.params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: one scalar per step, any logits device
        self.counts: dict[int, int] = {}  # token -> times this sequence generated it
        self.penalized = self.params.presence_penalty != 0 or self.params.frequency_penalty != 0
        self.plain_greedy = self.params.temperature == 0 and not self.penalized
        self._dense: torch.Tensor | None = None  # [V] counts on the logits' device, made by the first penalty

    def observe(self, token: int) -> None:
        """A generated token (counts for the penalties); sample() calls it itself."""
        self.counts[token] = self.counts.get(token, 0) + 1
        if self._dense is not None:
            self._dense[token] += 1

    def dense_counts(self, width: int, device) -> torch.Tensor:
        """counts as a float32 [width] tensor on `device`, kept there and updated by observe()."""
        d = self._dense
        if d is None or d.numel() != width or d.device != torch.device(device):
            d = torch.zeros(width, dtype=torch.float32)
            d[list(self.counts)] = torch.tensor(list(self.counts.values()), dtype=torch.float32)
            self._dense = d = d.to(device)
        return d


@dataclass
class Pick:
    token: int
    logprob: float | None = None  # of the chosen token, when params.logprobs is not None
    top: list[tuple[int, float]] | None = None  # the top-k (token, logprob), best first, when params.logprobs >= 1


def penalized(row: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """row [V] less the sampler's presence and frequency penalties (row itself when it has none)."""
    p = sampler.params
    if not sampler.penalized or not sampler.counts:
        return row
    n = sampler.dense_counts(row.numel(), row.device)  # [V]
    return row - p.presence_penalty * (n > 0) - p.frequency_penalty * n


def draw(row: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """One row's token as a [1] tensor on row's device (see the module's Semantics; no host sync); reads one
    number from the sampler's generator when it samples."""
    p = sampler.params
    x = penalized(row, sampler)  # [V]
    if p.temperature == 0:
        return x.argmax().reshape(1)
    u = torch.rand((), generator=sampler.generator).item()  # the row's one draw this step, whatever it keeps
    if p.top_k == 1:
        return x.argmax().reshape(1)
    x = x / p.temperature
    if 0 < p.top_k < x.numel():
        x, order = torch.topk(x, p.top_k)  # [k] best first
    elif p.top_p < 1:
        x, order = torch.sort(x, descending=True, stable=True)  # [V] best first, ties by the lowest id
    else:
        order = None
    probs = torch.softmax(x, dim=-1)  # [K]
    if p.top_p < 1:
        before = probs.cumsum(-1) - probs  # mass of the better tokens; the smallest prefix reaching top_p keeps
        before[0] = 0  # every token whose `before` is under top_p, the best always
        probs = probs.masked_fill(before >= p.top_p, 0)
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True)  # [1]: the first cdf over u * mass
    last = cdf.numel() - 1 - torch.argmax((probs.flip(0) > 0).to(torch.uint8))  # where u * mass rounds to the mass
    j = torch.minimum(j, last)  # the last kept token, never one with no probability
    return j if order is None else order[j]


def sample(logits: torch.Tensor, samplers: list[Sampler]) -> list[Pick]:
    """One token per row of logits [M, V] (row i is samplers[i]'s sequence), each observed by its sampler."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must be [{len(samplers)}, V] for {len(samplers)} samplers, got {list(logits.shape)}")
    logits = logits.float()
    m, device = len(samplers), logits.device
    greedy = [i for i, s in enumerate(samplers) if s.plain_greedy]
    if len(greedy) == m:
        tokens = logits.argmax(dim=-1)  # [M]
    else:
        tokens = torch.empty(m, dtype=torch.long, device=device)  # [M]
        if greedy:
            index = torch.tensor(greedy, device=device)
            tokens[index] = logits[index].argmax(dim=-1)
        rest = [i for i, s in enumerate(samplers) if not s.plain_greedy]
        tokens[torch.tensor(rest, device=device)] = torch.cat([draw(logits[i], samplers[i]) for i in rest])
    chosen = tokens.tolist()  # the step's one wait for the device
    picks = [Pick(t) for t in chosen]
    wanted = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    if wanted:
        index = torch.tensor(wanted, device=device)
        lp = torch.log_softmax(logits[index], dim=-1)  # [W, V] of the raw rows
        own = lp.gather(1, tokens[index][:, None])[:, 0].tolist()  # [W]
        k = min(max(samplers[i].params.logprobs for i in wanted), lp.shape[1])
        top_lp, top_ids = (t.tolist() for t in torch.topk(lp, k, dim=-1)) if k else ([], [])
        for j, i in enumerate(wanted):
            picks[i].logprob = own[j]
            n = samplers[i].params.logprobs
            if n:
                picks[i].top = list(zip(top_ids[j][:n], top_lp[j][:n]))
    for s, t in zip(samplers, chosen):
        s.observe(t)
    return picks
