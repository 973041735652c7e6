"""One generation step: ONE forward of the frozen base over every scheduled token, whatever its adapter.

The step's tokens are one flat row [1, N]. Every token is a BatchPlan row (tokens-per-row 1),
with its sequence's slot: the patched layers route each token to its own adapter exactly as an
encoder batch routes rows (a decode step is N one-token segments: BGMV-style). The plan orders
tokens by slot; a sequence's tokens stay contiguous and in order (the sort is stable). Virtual
tokens of prompt-tuned sequences get their embeddings from the prompt slots; positions are the
cache positions, so prefix- and prompt-tuned rows are shifted as PEFT shifts them. Attention
reads and writes the paged cache (paged.py). The LM head runs on each sampling sequence's last
token only.
"""
from __future__ import annotations

import torch

from ..batch import BatchPlan
from . import paged
from .scheduler import Work


def forward(engine, cache, works: list[Work]) -> torch.Tensor:
    """Run the step; returns float32 logits [M, vocab] of the works that sample, in `works` order.
    The caller holds the engine lock and has pinned every sequence's slot."""
    dev = engine.device
    slots: list[int] = []
    for w in works:
        slots.extend([w.seq.slot] * (w.stop - w.start))
    groups = {w.seq.slot: engine._group(w.seq.spec) for w in works if w.seq.slot >= 0}
    plan = BatchPlan.build(slots, dev, engine._workspace, groups)
    first = [0] * len(works)  # each work's first token in plan order
    where = {}
    t = 0
    for i, w in enumerate(works):
        where[t] = i
        t += w.stop - w.start
    for pos, orig in enumerate(plan.order):
        if orig in where:
            first[where[orig]] = pos
    N = len(slots)
    ids = [engine.pad_id] * N
    positions = [0] * N
    virtual = []  # (flat index, slot, virtual index)
    chunks = []
    for w, t0 in zip(works, first):
        seq = w.seq
        for k, p in enumerate(range(w.start, w.stop)):
            tok = seq.token_at(p)
            if tok is None:
                virtual.append((t0 + k, seq.slot, p - seq.prefix))
            else:
                ids[t0 + k] = tok
            positions[t0 + k] = p
        chunks.append(paged.Chunk(t0, t0 + w.stop - w.start, w.start, tuple(seq.blocks)))
    step = paged.PagedStep.build(cache, sorted(chunks, key=lambda c: c.t0), dev)
    ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
    inputs = {"position_ids": torch.tensor(positions, dtype=torch.long, device=dev).unsqueeze(0),
              "use_cache": False}
    if virtual:
        embeds = engine.model.get_input_embeddings()(ids_t)  # [N, H]
        flat = torch.tensor([v[0] for v in virtual], device=dev)
        vecs = engine.pool.prompt.data[torch.tensor([v[1] for v in virtual], device=dev),
                                       torch.tensor([v[2] for v in virtual], device=dev)]
        embeds[flat] = vecs.to(embeds.dtype)
        inputs["inputs_embeds"] = embeds.unsqueeze(0)
    else:
        inputs["input_ids"] = ids_t.unsqueeze(0)
    state = engine._state
    backbone = getattr(engine.model, engine.model.base_model_prefix)
    engine.forwards += 1
    state.begin(plan)
    try:  # state.end() outside inference mode: the shrink groups it may fuse are tensors adapters write later
        with torch.inference_mode(), paged.active(step):
            hidden = backbone(**inputs).last_hidden_state[0]  # [N, H]
    finally:
        state.end()
    last = [t0 + w.stop - w.start - 1 for w, t0 in zip(works, first) if w.samples]
    if not last:
        return torch.empty(0, engine.schema.vocab_size)
    h = hidden.index_select(0, torch.tensor(last, device=dev))  # [M, H]
    with torch.inference_mode():
        return _lm_head(engine, h, [w.seq.slot for w in works if w.samples], groups).float().cpu()


def _lm_head(engine, h: torch.Tensor, slots: list[int], groups: dict[int, int]) -> torch.Tensor:
    """The LM head on h [M, H]; where an adapter adapts the head itself, per row through its own plan."""
    head = engine.model.get_output_embeddings()
    state = engine._state
    name = next((n for n, m in engine._linears.items() if m is head), None)
    if name is None or (name not in state.modules and name not in state.ia3):
        return head(h)
    plan = BatchPlan.build(slots, engine.device, engine._workspace, groups)
    order = torch.tensor(plan.order, device=engine.device)
    state.begin(plan)
    try:
        out = head(h.index_select(0, order))
    finally:
        state.end()
    return torch.empty_like(out).index_copy_(0, order, out)
