"""The continuous-batching scheduler alone (no model): step budget, chunked prefill beside decodes, first come first
served admission, preemption of the newest sequence, blocks freed on removal."""
from __future__ import annotations

import torch

from serving.generation.detok import TextStream
from serving.generation.kvcache import KVCache
from serving.generation.sampling import Sampler, SamplingParams
from serving.generation.scheduler import Scheduler
from serving.generation.sequence import RUNNING, WAITING, Sequence

_ids = iter(range(10 ** 6))


def seq(prompt_len: int, new: int = 8) -> Sequence:
    params = SamplingParams()
    return Sequence(next(_ids), None, None, list(range(3, 3 + prompt_len)), new, params, Sampler(params, 512),
                    TextStream(None), frozenset())


def scheduler(tokens: int, block: int = 4, step_tokens: int = 16, max_running: int = 8, refuse=()) -> Scheduler:
    cache = KVCache(1, 1, 2, tokens, block, torch.float32, "cpu")
    return Scheduler(cache, max_step_tokens=step_tokens, max_running=max_running,
                     admit=lambda s: s.id not in refuse, release=lambda s: None)


def run(sched: Scheduler):
    """One step as the generator does it: computed advances, sampling sequences get a token."""
    works = sched.schedule()
    for w in works:
        w.seq.computed = w.stop
    for w in works:
        if w.samples:
            w.seq.output.append(7)
    return works


def test_a_long_prompt_is_prefilled_in_chunks_beside_decodes():
    sched = scheduler(256, step_tokens=16)
    a = seq(5)
    sched.add(a)
    assert [(w.start, w.stop, w.samples) for w in run(sched)] == [(0, 5, True)]
    b = seq(40)
    sched.add(b)
    works = run(sched)
    assert [(w.seq, w.start, w.stop) for w in works] == [(a, 5, 6), (b, 0, 15)]  # decode first, then 15 of b
    assert not works[1].samples
    assert [(w.seq, w.start, w.stop) for w in run(sched)] == [(a, 6, 7), (b, 15, 30)]
    works = run(sched)
    assert [(w.seq, w.start, w.stop) for w in works] == [(a, 7, 8), (b, 30, 40)] and works[1].samples
    assert [(w.seq, w.stop - w.start) for w in run(sched)] == [(a, 1), (b, 1)]


def test_admission_is_first_come_first_served_and_waits_for_blocks():
    sched = scheduler(32, block=4)  # 8 blocks
    big, small = seq(20), seq(2)  # 5 blocks + 1 block
    first = seq(10)  # 3 blocks
    for s in (first, big, small):
        sched.add(s)
    run(sched)
    # first (3 blocks) fits; big (5 blocks) fits too (8 in all); small must wait behind them: no blocks left
    assert first.status == RUNNING and big.status == RUNNING and small.status == WAITING
    sched.remove(first)
    assert sched.cache.free_blocks == 3
    run(sched)
    assert small.status == RUNNING


def test_refused_admission_keeps_order_and_frees_the_blocks_it_took():
    sched = scheduler(64, refuse={0})
    s = seq(4)
    s.id = 0
    sched.add(s)
    assert run(sched) == [] and s.status == WAITING and sched.cache.free_blocks == sched.cache.num_blocks


def test_out_of_blocks_preempts_the_newest_which_recomputes_later():
    sched = scheduler(16, block=4, step_tokens=64)  # 4 blocks
    old, new = seq(7, new=20), seq(7, new=20)  # 2 blocks each at first
    sched.add(old)
    sched.add(new)
    run(sched)
    assert sched.cache.free_blocks == 0
    run(sched)  # 9 positions each, 8 computed: the blocks still do
    assert sched.preemptions == 0
    run(sched)  # old needs a third block for its ninth position: it takes the newest's
    assert sched.preemptions == 1 and new.status == WAITING and new.computed == 0 and new.blocks == []
    assert new.preemptions == 1 and sched.waiting[0] is new and len(old.blocks) == 3
    produced = len(new.output)
    while old.status == RUNNING and len(old.output) < 9:  # old grows to 16 positions: all four blocks
        run(sched)
    sched.remove(old)
    works = run(sched)  # the preempted one comes back: its prompt AND what it produced are computed again
    assert [(w.seq, w.start, w.stop) for w in works] == [(new, 0, 7 + produced)] and works[0].samples


def test_a_sequence_preempts_itself_when_it_is_the_newest():
    sched = scheduler(12, block=4, step_tokens=64)  # 3 blocks
    a, b = seq(4), seq(3)
    sched.add(a)
    sched.add(b)
    run(sched)
    assert sched.cache.free_blocks == 1
    run(sched)  # a (5 positions) takes the last block; b (4 positions) fits in its block
    works = run(sched)  # b needs a second block: b is the newest, so b itself goes back to waiting
    assert [w.seq for w in works] == [a] and b.status == WAITING and sched.preemptions == 1


def test_max_running_and_the_step_budget_cap_admission():
    sched = scheduler(1024, step_tokens=10, max_running=2)
    seqs = [seq(4) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    works = run(sched)
    assert [w.seq for w in works] == seqs[:2]
    assert [s.status for s in seqs] == [RUNNING, RUNNING, WAITING, WAITING]
    sched = scheduler(1024, step_tokens=10)
    for s in (seq(6), seq(6), seq(6)):
        sched.add(s)
    works = run(sched)
    assert [w.stop - w.start for w in works] == [6, 4]  # the second is cut to the budget, the third waits
