"""serving/generation/sampling.py: parameter checks, greedy and filtered sampling, seeded rows independent of their
batch, the sampled distribution (scipy.stats), OpenAI's penalties, logprobs of the raw logits."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from serving.errors import RequestError
from serving.generation.sampling import Pick, Sampler, SamplingParams, penalized, sample

V = 1000


def run(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    return [p.token for p in sample(logits, samplers)]


def sampler(vocab: int = V, **kw) -> Sampler:
    return Sampler(SamplingParams(**kw), vocab)


# --- validation ----------------------------------------------------------------------------------------------------

BAD = [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "1"), ("temperature", True),
    ("top_p", 0), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", -1), ("top_k", 1.5), ("top_k", True),
    ("presence_penalty", 2.5), ("presence_penalty", -3), ("frequency_penalty", 2.5), ("frequency_penalty", -3),
    ("frequency_penalty", -math.inf),
    ("seed", -1), ("seed", "x"), ("seed", 2**63), ("seed", 1.0),
    ("stop", tuple(f"s{i}" for i in range(17))), ("stop", ""), ("stop", ("ok", "")), ("stop", "x" * 300),
    ("stop", [1]), ("stop", 5),
    ("stop_token_ids", (V,)), ("stop_token_ids", (-1,)), ("stop_token_ids", (True,)), ("stop_token_ids", 3),
    ("ignore_eos", "yes"),
    ("logprobs", 21), ("logprobs", -1), ("logprobs", 2.0),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_a_bad_value_is_a_request_error_naming_its_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value}).validated(V)
    with pytest.raises(RequestError, match=field):
        Sampler(SamplingParams(**{field: value}), V)


def test_validated_normalizes_and_keeps_the_edges_of_each_range():
    p = SamplingParams(temperature=2, top_p=1, top_k=5, presence_penalty=-2, frequency_penalty=2, seed=2**63 - 1,
                       stop="###", stop_token_ids=[0, V - 1], logprobs=20).validated(V)
    assert p == SamplingParams(temperature=2.0, top_p=1.0, top_k=5, presence_penalty=-2.0, frequency_penalty=2.0,
                               seed=2**63 - 1, stop=("###",), stop_token_ids=(0, V - 1), logprobs=20)
    assert isinstance(p.temperature, float) and isinstance(p.stop_token_ids, tuple)
    assert SamplingParams(stop=["a", "b"] * 8).validated(V).stop == ("a", "b") * 8
    assert SamplingParams(stop=("x" * 256,), logprobs=0, seed=0).validated(V).logprobs == 0
    assert SamplingParams().validated(V) == SamplingParams()


# --- greedy and filters ----------------------------------------------------------------------------------------------

def test_greedy_is_the_argmax_of_each_row_and_ties_go_to_the_lowest_id():
    torch.manual_seed(0)
    logits = torch.randn(64, V)
    logits[5, [7, 300, 900]] = 50.0  # a three-way tie
    picks = sample(logits, [sampler() for _ in range(64)])
    assert [p.token for p in picks] == logits.argmax(-1).tolist()
    assert picks[5].token == 7
    assert all(p.logprob is None and p.top is None for p in picks)


def test_greedy_rows_beside_sampled_rows_are_still_their_argmax():
    torch.manual_seed(1)
    logits = torch.randn(8, V)
    samplers = [sampler() if i % 2 == 0 else sampler(temperature=1.5, seed=i) for i in range(8)]
    tokens = run(logits, samplers)
    assert tokens[0::2] == logits[0::2].argmax(-1).tolist()
    assert tokens[1::2] != logits[1::2].argmax(-1).tolist()  # flat rows at temperature 1.5: not all argmax


def test_top_k_1_and_a_tiny_top_p_are_greedy_at_temperature_1():
    torch.manual_seed(2)
    logits = torch.randn(16, V)
    want = logits.argmax(-1).tolist()
    for _ in range(5):
        assert run(logits, [sampler(temperature=1.0, top_k=1, seed=i) for i in range(16)]) == want
        assert run(logits, [sampler(temperature=1.0, top_p=1e-6, seed=i) for i in range(16)]) == want
    assert run(logits, [sampler(temperature=1.0, seed=i) for i in range(16)]) != want  # the control samples


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.3, 0.2, 0.05]]))
    seen_k, seen_p = set(), set()
    for seed in range(300):
        seen_k |= set(run(logits, [sampler(5, temperature=1.0, top_k=2, seed=seed)]))
        seen_p |= set(run(logits, [sampler(5, temperature=1.0, top_p=0.75, seed=seed)]))  # 0.4 + 0.3 < 0.75
    assert seen_k == {1, 2}
    assert seen_p == {1, 2, 3}


@pytest.mark.parametrize("u, want", [(0.0, 1), (1.0, 2)])  # 1.0: u * mass rounded up to the mass itself
def test_a_draw_at_either_end_of_the_unit_interval_picks_a_token_with_probability(monkeypatch, u, want):
    # tokens 0 and 3 have probability 0 in float32 (e^-205)
    logits = torch.tensor([[-200.0, 5.0, 4.0, -300.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(u))
    assert run(logits, [sampler(4, temperature=1.0, seed=0)]) == [want]
    assert run(logits, [sampler(4, temperature=1.0, top_k=3, seed=0)]) == [want]
    assert run(logits, [sampler(4, temperature=1.0, top_p=0.99, seed=0)]) == [want]  # 0.73 + 0.27 reach it


# --- seeds -----------------------------------------------------------------------------------------------------------

def steps(n: int, rows: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, V, generator=g) * 2 for _ in range(n)]


def test_a_seeded_row_draws_the_same_tokens_alone_and_as_row_3_of_a_mixed_batch():
    params = dict(temperature=0.9, top_p=0.95, top_k=200, presence_penalty=0.4, frequency_penalty=0.2, seed=1234)
    alone, batched = sampler(**params), sampler(**params)
    others = [sampler(), sampler(temperature=1.0, seed=1234), sampler(temperature=0.7, top_p=0.5),
              sampler(temperature=1.3, frequency_penalty=1.0, seed=9), sampler(logprobs=5),
              sampler(temperature=0.5, top_k=3, logprobs=2), sampler(presence_penalty=-1.0)]
    mine, batch = steps(50, 1, seed=0), steps(50, 8, seed=1)
    got_alone, got_batched = [], []
    for row, rows in zip(mine, batch):
        got_alone += run(row, [alone])
        rows[3] = row[0]
        got_batched.append(run(rows, others[:3] + [batched] + others[3:])[3])
    assert got_alone == got_batched
    assert len(set(got_alone)) > 20  # it sampled (and the other rows drew from their own generators meanwhile)
    assert alone.counts == batched.counts


def test_different_seeds_draw_different_tokens_and_the_same_seed_again_the_same():
    def tokens(seed):
        s = sampler(temperature=1.0, seed=seed)
        return [run(row, [s])[0] for row in steps(50, 1, seed=5)]

    assert tokens(1) != tokens(2)
    assert tokens(1) == tokens(1)
    unseeded = [sampler(temperature=1.0) for _ in range(2)]
    logits = torch.zeros(1, V)
    assert [run(logits, [unseeded[0]])[0] for _ in range(20)] != [run(logits, [unseeded[1]])[0] for _ in range(20)]


# --- the distribution ------------------------------------------------------------------------------------------------

LOGITS5 = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0])


def frequencies(temperature: float, rows: int = 200, n: int = 100) -> torch.Tensor:
    """Counts of each of 5 tokens over rows * n draws (rows samplers with seeds 0.., n steps each)."""
    samplers = [sampler(5, temperature=temperature, seed=s) for s in range(rows)]
    counts = torch.zeros(5)
    logits = LOGITS5.repeat(rows, 1)
    for _ in range(n):
        counts += torch.bincount(torch.tensor(run(logits, samplers)), minlength=5)
    return counts


@pytest.mark.parametrize("temperature, draws", [(1.0, 20_000), (0.5, 10_000)])
def test_the_draws_follow_softmax_of_logits_over_temperature(temperature, draws):
    counts = frequencies(temperature, n=draws // 200)
    want = torch.softmax(LOGITS5 / temperature, -1)
    n = counts.sum().item()
    assert n == draws
    result = stats.chisquare(counts.numpy(), (want * n).numpy())
    assert result.pvalue > 1e-3, (counts / n, want)
    assert (counts / n - want).abs().max() < 0.02
    if temperature == 0.5:  # sharper than at 1: the best token's share grows from 0.56 to 0.83
        assert counts[4] / n > torch.softmax(LOGITS5, -1)[4] + 0.2


# --- penalties -------------------------------------------------------------------------------------------------------

def test_penalties_subtract_presence_times_seen_plus_frequency_times_count():
    s = sampler(6, temperature=1.0, presence_penalty=0.7, frequency_penalty=0.3, seed=0)
    row = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert penalized(row, s) is row  # nothing generated yet
    for t in [3, 3, 1, 3]:
        s.observe(t)
    want = row - 0.7 * torch.tensor([0, 1, 0, 1, 0, 0.0]) - 0.3 * torch.tensor([0, 1, 0, 3, 0, 0.0])
    torch.testing.assert_close(penalized(row, s), want)
    s.observe(5)  # observe keeps the device copy up to date
    torch.testing.assert_close(penalized(row, s), want - torch.tensor([0, 0, 0, 0, 0, 1.0]))
    assert s.counts == {3: 3, 1: 1, 5: 1}


def test_a_presence_penalty_flips_the_argmax_after_the_first_use():
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0]])
    plain, penal = sampler(4), sampler(4, presence_penalty=1.0)
    assert [run(logits, [plain])[0] for _ in range(3)] == [0, 0, 0]
    # once used, 0 drops to 1.0 and 1 wins; then 1 drops to 0.5 and 0 (1.0, used once or more: no further drop) wins
    assert [run(logits, [penal])[0] for _ in range(4)] == [0, 1, 0, 0]


def test_a_frequency_penalty_grows_with_each_use():
    logits = torch.tensor([[2.0, 1.5, -5.0]])
    s = sampler(3, frequency_penalty=0.3)
    # token 0: 2.0, 1.7, 1.4 < 1.5 -> token 1 (1.5 vs 1.4), then 1.2 vs 1.4 -> 0 ...
    assert [run(logits, [s])[0] for _ in range(5)] == [0, 0, 1, 0, 1]
    plain, boosted = sampler(2), sampler(2, presence_penalty=-1.0)  # a negative penalty makes repeating likelier
    first, then = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.6, 0.0]])
    assert run(first, [plain]) == run(first, [boosted]) == [1]
    assert run(then, [plain]) == [0]
    assert run(then, [boosted]) == [1]  # 0.0 + 1 beats 0.6


def test_penalties_apply_to_sampled_rows_too():
    logits = torch.tensor([[5.0, 0.0]])
    plain = sampler(2, temperature=1.0, seed=3)
    penal = sampler(2, temperature=1.0, presence_penalty=2.0, frequency_penalty=2.0, seed=3)
    assert run(logits, [plain]) == run(logits, [penal]) == [0]  # p(0) = 0.993, nothing generated yet
    plain_tokens = [run(logits, [plain])[0] for _ in range(200)]
    penal_tokens = [run(logits, [penal])[0] for _ in range(200)]
    assert plain_tokens.count(1) < 10
    # once both were used, the logit gap is 5 - 2 * (count0 - count1): the counts stay about 2.5 apart
    assert abs(penal.counts[0] - penal.counts[1] - 2.5) < 6
    assert penal_tokens.count(1) > 80


# --- logprobs --------------------------------------------------------------------------------------------------------

def test_logprobs_are_log_softmax_of_the_raw_logits_and_the_top_list_is_sorted():
    torch.manual_seed(4)
    logits = torch.randn(6, V) * 3
    samplers = [sampler(logprobs=0), sampler(logprobs=5, temperature=1.0, seed=1),
                sampler(logprobs=20, presence_penalty=2.0, frequency_penalty=2.0), sampler(),
                sampler(logprobs=1, temperature=0.3, top_k=10, seed=2), sampler(logprobs=3)]
    for _ in range(3):  # later steps: penalties change the choice, never the reported logprobs
        picks = sample(logits, samplers)
        raw = torch.log_softmax(logits, -1)
        for i, (pick, s) in enumerate(zip(picks, samplers)):
            assert isinstance(pick, Pick)
            k = s.params.logprobs
            if k is None:
                assert pick.logprob is None and pick.top is None
                continue
            assert pick.logprob == pytest.approx(raw[i, pick.token].item(), abs=1e-5)
            if k == 0:
                assert pick.top is None
                continue
            assert len(pick.top) == k
            values, ids = torch.topk(raw[i], k)
            assert [t for t, _ in pick.top] == ids.tolist()
            torch.testing.assert_close(torch.tensor([lp for _, lp in pick.top]), values)
            assert [lp for _, lp in pick.top] == sorted((lp for _, lp in pick.top), reverse=True)
    assert len(samplers[2].counts) >= 2  # the penalized greedy row moved on


def test_logits_must_have_one_row_per_sampler():
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(3, V), [sampler(), sampler()])
    assert sample(torch.zeros(0, V), []) == []
