"""serving/app/admission.py without Ray: the admission limit (fixed, or by expected wait) and the Retry-After it
advises, on a fake clock."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from serving.app.admission import MAX_WAITING_PER_HOST, Admission
from serving.app.config import ServeConfig


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def served(adm: Admission, clock: Clock, rows_per_s: int, seconds: int) -> None:
    """The model completes `rows_per_s` one-row calls per second for `seconds` seconds, loaded (min_rows rows
    at it: the rate is measured only then); then the rows behind are taken back unanswered, leaving nothing
    pending and the rate as measured."""
    behind = adm.min_rows - 1
    adm.admit(behind)
    for _ in range(seconds * rows_per_s):
        adm.admit(1)
        clock.t += 1 / rows_per_s
        adm.done(1)
    adm.done(behind, answered=False)


def test_full_at_the_limit_and_a_large_request_is_admitted_whole():
    adm = Admission(max_pending_rows=64, min_retry_s=1, max_retry_s=60, clock=Clock())
    assert not adm.full
    adm.admit(63)
    assert not adm.full
    adm.admit(256)  # admitted whole: the limit is checked before, not split
    assert adm.full and adm.pending_rows == 319
    adm.done(256)
    adm.done(63)
    assert adm.pending_rows == 0 and not adm.full


def test_advice_is_the_minimum_before_any_row_completed():
    adm = Admission(64, min_retry_s=2, max_retry_s=60, clock=Clock())
    adm.admit(64)
    assert [adm.refuse() for _ in range(50)] == [2] * 50


def test_advice_covers_the_backlog_and_the_refused_clients_at_the_completion_rate():
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=60, clock=clock)
    served(adm, clock, rows_per_s=20, seconds=10)
    assert adm.rows_per_s() == pytest.approx(20, rel=0.02)
    adm.admit(64)
    # 64 rows admitted at 20 rows/s: 3.2 s of work before a refused client finds room -> 4 s
    assert adm.refuse() == 4
    # 96 clients refused within that advice: (64 + 96) / 20 = 8 s for the last of them
    advice = [adm.refuse() for _ in range(95)]
    assert advice == sorted(advice) and advice[-1] == 8
    # while the model keeps serving, the clients refused more than one advice ago are back (or not waiting):
    # they no longer count, and the advice falls back to the backlog alone
    served(adm, clock, rows_per_s=20, seconds=9)
    assert adm.refuse() == 4


def test_a_client_refused_again_within_its_advice_counts_once():
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=60, clock=clock)
    served(adm, clock, rows_per_s=20, seconds=10)
    adm.admit(64)
    clients = [("127.0.0.1", 40000 + i) for i in range(128)]
    for _ in range(50):  # every client retries at once, 50 times
        advice = [adm.refuse(c) for c in clients]
    assert advice[-1] == 10  # (64 + 128 clients) / 20 rows/s; as refusals, 6464 / 20 s: the 60 s cap
    assert adm.refuse() == 10  # a refusal without a key is a client of its own: (64 + 129) / 20 = 9.65


def test_a_flood_of_immediate_retries_leaves_no_long_advice_behind():
    """Clients that never wait (retrying every 10 ms for 30 s) while the model serves: the advice stays what their
    number needs, and a client that honours it afterwards is told the same, not the cap."""
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=60, clock=clock)
    served(adm, clock, rows_per_s=50, seconds=10)
    adm.admit(64)
    clients = [("10.0.0.2", 50000 + i) for i in range(32)]
    seen = set()
    for step in range(3000):
        for c in clients:
            seen.add(adm.refuse(c))
        clock.t += 0.01
        if step % 2:  # a row completes every 20 ms and an admitted one takes its place: 64 stay pending
            adm.done(1)
            adm.admit(1)
    assert max(seen) == 2  # (64 + 32 clients) / 50 rows/s
    assert adm.refuse(("10.0.0.3", 1234)) == 2


def test_a_host_that_reconnects_for_every_retry_counts_at_most_its_bound():
    """Clients that open a new connection for every retry and never wait (1000 refusals a second from one host,
    each from a new port, for 30 s) count at most MAX_WAITING_PER_HOST: the advice stays bounded, and clients of
    other hosts still count each."""
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=60, clock=clock)
    served(adm, clock, rows_per_s=50, seconds=10)
    adm.admit(64)
    ports = itertools.count(1024)
    seen = set()
    for step in range(3000):
        for _ in range(10):
            seen.add(adm.refuse(("10.0.0.9", next(ports))))
        clock.t += 0.01
        if step % 2:
            adm.done(1)
            adm.admit(1)
    bound = math.ceil((64 + MAX_WAITING_PER_HOST) / 50)  # 7 s, where counting connections reached the 60 s cap
    assert max(seen) == bound
    assert adm.refused_clients == MAX_WAITING_PER_HOST
    for i in range(50):  # 50 clients of 50 other hosts: each counts
        adm.refuse((f"10.0.1.{i}", 40000))
    assert adm.refused_clients == MAX_WAITING_PER_HOST + 50
    assert adm.refuse() == math.ceil((64 + MAX_WAITING_PER_HOST + 51) / 50)


def test_a_host_counts_again_as_its_clients_age_out():
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=60, clock=clock)
    served(adm, clock, rows_per_s=100, seconds=5)
    adm.admit(64)
    for port in range(MAX_WAITING_PER_HOST + 100):
        adm.refuse(("10.0.0.9", port))
    assert adm.refused_clients == MAX_WAITING_PER_HOST
    advice = adm.refuse(("10.0.0.9", 1))  # refused again: counted once, still the bound
    assert advice == math.ceil((64 + MAX_WAITING_PER_HOST) / 100)
    served(adm, clock, rows_per_s=100, seconds=advice + 1)  # every refusal older than the advice: none counts
    assert adm.refuse(("10.0.0.9", 99999)) == 1  # (64 + 1) / 100 rows/s
    assert adm.refused_clients == 1


def test_advice_stays_within_its_bounds():
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=5, clock=clock)
    served(adm, clock, rows_per_s=2, seconds=10)
    adm.admit(64)
    assert adm.refuse() == 5  # (64 + 1) / 2 = 33 s, capped
    fast = Admission(64, min_retry_s=3, max_retry_s=60, clock=clock)
    served(fast, clock, rows_per_s=1000, seconds=2)
    fast.admit(64)
    assert fast.refuse() == 3  # 0.07 s of work, raised to the minimum


def test_idle_time_does_not_make_the_model_look_slow():
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=60, clock=clock)
    for _ in range(24):  # one row every 0.4 s, each answered in 50 ms: 20 rows per busy second
        adm.admit(1)
        clock.t += 0.05
        adm.done(1)
        clock.t += 0.35
    assert adm.rows_per_s() == pytest.approx(20)
    adm.admit(64)
    clock.t += 0.01
    assert adm.refuse() == 4  # (64 + 1) / 20 rows/s, not 65 rows / 9.6 s


def test_a_rate_is_not_trusted_before_a_second_of_work():
    """A burst right after a start: the first row comes back after 0.14 s of work (7 rows/s) while the model
    is about to complete hundreds a second; until the window holds min_busy_s of busy time the advice is the
    minimum, then it follows the measured rate."""
    clock = Clock()
    adm = Admission(48, min_retry_s=1, max_retry_s=60, min_busy_s=1.0, clock=clock)
    adm.admit(48)
    clients = [("10.0.0.2", port) for port in range(256)]
    clock.t += 0.14
    adm.done(1)
    adm.admit(1)
    assert [adm.refuse(c) for c in clients] == [1] * 256  # (48 + 256) / 7 rows/s would be 44 s
    for _ in range(42):  # an 8-row batch every 0.02 s: 337 rows in 0.98 s of busy time
        clock.t += 0.02
        adm.done(8)
        adm.admit(8)
    assert adm.rows_per_s() is None
    for _ in range(2):
        clock.t += 0.02
        adm.done(8)
        adm.admit(8)
    assert adm.rows_per_s() == pytest.approx(353 / 1.02)
    adm.admit(1000)  # now the advice follows the rate: (1048 + 256) / 346 rows/s
    assert [adm.refuse(c) for c in clients][-1] == 4


def test_rows_the_model_did_not_answer_leave_the_rate_alone():
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=60, clock=clock)
    served(adm, clock, rows_per_s=10, seconds=5)
    for _ in range(100):  # refused by the model's queue at once: no evidence that it got faster
        adm.admit(1)
        adm.done(1, answered=False)
    assert adm.pending_rows == 0
    assert adm.rows_per_s() == pytest.approx(10, rel=0.02)


def test_a_quiet_window_forgets_the_rate():
    clock = Clock()
    adm = Admission(64, min_retry_s=1, max_retry_s=60, window_s=10, clock=clock)
    served(adm, clock, rows_per_s=5, seconds=3)
    clock.t += 11
    assert adm.rows_per_s() is None
    adm.admit(64)
    assert adm.refuse() == 1


def test_config_bounds_are_checked():
    with pytest.raises(ValueError, match="max_retry_after_s"):
        ServeConfig(retry_after_s=10, max_retry_after_s=5)
    with pytest.raises(ValueError, match="max_retry_s"):
        Admission(64, min_retry_s=10, max_retry_s=5)
    cfg = ServeConfig(retry_after_s=2, max_retry_after_s=2)
    assert (cfg.retry_after_s, cfg.max_retry_after_s) == (2, 2)


# admission by expected wait (max_wait_s) --------------------------------------------------------------------

def test_with_no_rate_measured_a_burst_is_admitted_up_to_the_hard_limit():
    """An idle server (no completion yet): 256 one-row requests at once are all admitted, the 257th is not
    (a fixed 48 rows refused 208 of them on `make serve`)."""
    adm = Admission(256, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, min_rows=32, clock=Clock())
    for _ in range(256):
        assert not adm.full
        adm.admit(1)
    assert adm.full and adm.limit() == 256


def test_with_a_rate_a_request_is_admitted_while_the_backlog_is_worked_off_within_max_wait():
    clock = Clock()
    adm = Admission(256, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, min_rows=8, clock=clock)
    served(adm, clock, rows_per_s=100, seconds=5)
    adm.admit(50)  # 50 rows at 100 rows/s: 0.5 s, within max_wait_s
    assert not adm.full and adm.limit() == 51
    adm.admit(1)  # 0.51 s
    assert adm.full
    assert adm.refuse() == 1  # Retry-After: the same rule, (51 + 1) / 100 rows/s
    adm.done(1)
    assert not adm.full


def test_the_limit_follows_the_models_speed_between_min_rows_and_the_hard_limit():
    clock = Clock()
    slow = Admission(256, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, min_rows=32, clock=clock)
    served(slow, clock, rows_per_s=10, seconds=5)  # 5 rows in 0.5 s, but one batch is always admitted
    slow.admit(31)
    assert not slow.full and slow.limit() == 32
    slow.admit(1)
    assert slow.full
    fast = Admission(256, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, min_rows=32, clock=clock)
    served(fast, clock, rows_per_s=2000, seconds=2)  # 1000 rows in 0.5 s: the hard limit binds
    fast.admit(255)
    assert not fast.full
    fast.admit(1)
    assert fast.full and fast.limit() == 256


def test_a_sustained_overload_is_shed_once_the_rate_is_known_and_its_backlog_stays_within_max_wait():
    """A cold start under 4x overload: the first burst is admitted (no rate yet), then the backlog drains to
    what the model works off in max_wait_s and stays there; the admitted rows wait at most that long."""
    clock = Clock()
    adm = Admission(256, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, min_rows=16, clock=clock)
    queue: list[float] = []  # admission times of pending rows, oldest first
    waits, refused_from = [], None
    for tick in range(1000):  # 10 s: 400 one-row requests a second arrive, the model completes 100
        for _ in range(4):
            if adm.full:
                refused_from = tick if refused_from is None else refused_from
                adm.refuse(("10.0.0.2", tick))
            else:
                adm.admit(1)
                queue.append(clock.t)
        clock.t += 0.01
        adm.done(1)
        waits.append(clock.t - queue.pop(0))
    assert refused_from is not None and refused_from * 0.01 < 1.1  # shed within min_busy_s (+ a tick)
    assert adm.rows_per_s() == pytest.approx(100, rel=0.01)
    assert 45 <= adm.pending_rows <= 52  # 0.5 s at 100 rows/s
    assert max(waits[-500:]) <= 0.53  # the last 5 s: every admitted row waited at most max_wait_s (+ a tick)


def test_a_quiet_window_makes_the_next_burst_a_cold_one_again():
    clock = Clock()
    adm = Admission(256, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, min_rows=16, window_s=10, clock=clock)
    served(adm, clock, rows_per_s=50, seconds=3)
    adm.admit(30)
    assert adm.full  # 30 rows at 50 rows/s: 0.6 s
    adm.done(30)
    clock.t += 11  # idle for longer than the window
    adm.admit(255)
    assert not adm.full


def test_a_slow_first_call_measures_no_rate_and_the_burst_after_it_is_admitted():
    """CI: the first request after a start loaded its adapter and warmed the model for 1.5 s, the rate came out
    at 1 row/s, and a burst of 256 right after it met 111 refusals with Retry-After 60. A call made below
    min_rows rows measures latency, not how fast a backlog drains: it leaves the rate unknown."""
    clock = Clock()
    adm = Admission(256, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, min_rows=48, clock=clock)
    adm.admit(1)
    clock.t += 1.5
    adm.done(1)
    for _ in range(20):  # a trickle afterwards, one row at a time, each slow: still no rate
        adm.admit(1)
        clock.t += 0.5
        adm.done(1)
    assert adm.rows_per_s() is None
    for _ in range(256):
        assert not adm.full
        adm.admit(1)
    assert adm.full and adm.refuse() == 1


def test_the_rate_counts_loaded_time_only():
    """Rows answered while fewer than min_rows were at the model, and the time they took, are left out: the
    loaded spells alone give the rate (100 rows/s here), however slow the calls between them."""
    clock = Clock()
    adm = Admission(256, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, min_rows=16, clock=clock)
    for _ in range(3):
        adm.admit(40)  # loaded: 40 rows answered 8 at a time, one batch every 0.08 s, down to 8 pending
        for _ in range(4):
            clock.t += 0.08
            adm.done(8)
        clock.t += 2.0  # the last 8 rows take 2 s (below min_rows: not counted)
        adm.done(8)
    assert adm.rows_per_s() is None  # 0.96 s of loaded time so far
    adm.admit(40)
    clock.t += 0.08
    adm.done(8)
    assert adm.rows_per_s() == pytest.approx(104 / 1.04)


def test_max_wait_0_is_a_fixed_limit_whatever_the_rate():
    clock = Clock()
    adm = Admission(48, min_retry_s=1, max_retry_s=60, max_wait_s=0, min_rows=32, clock=clock)
    served(adm, clock, rows_per_s=10, seconds=5)
    adm.admit(47)
    assert not adm.full
    adm.admit(1)
    assert adm.full and adm.limit() == 48
    with pytest.raises(ValueError, match="max_wait_s"):
        Admission(48, 1, 60, max_wait_s=float("nan"))


def test_the_ingress_admission_comes_from_its_config():
    adm = Admission.of(ServeConfig(num_replicas=2, max_batch_size=32, max_queue_wait_s=0.25, retry_after_s=2))
    assert (adm.max_pending_rows, adm.max_wait_s, adm.min_rows, adm.min_retry_s) == (256, 0.25, 48, 2)
    assert Admission.of(ServeConfig(num_replicas=1, max_batch_size=32)).min_rows == 32  # at least one batch


def test_the_running_rate_equals_the_rate_recomputed_from_every_call():
    """rows_per_s keeps running sums (constant time per request): it equals the sum over the window of the
    answered rows, divided by the busy time (spells cut at the window's start), after a random history."""
    rng = random.Random(7)
    clock = Clock()
    adm = Admission(10_000, min_retry_s=1, max_retry_s=60, max_wait_s=0.5, window_s=3, min_busy_s=0.01,
                    clock=clock)
    completed, spells, since, pending = [], [], None, 0
    for _ in range(5000):
        clock.t += rng.choice([0.001, 0.01, 0.1, 0.7, 4.0])
        if pending and rng.random() < 0.5:
            rows, answered = rng.randint(1, pending), rng.random() < 0.9
            adm.done(rows, answered)
            pending -= rows
            completed += [(clock.t, rows)] if answered else []
            if not pending:
                spells.append((since, clock.t))
        else:
            since = clock.t if not pending else since
            rows = rng.randint(1, 8)
            adm.admit(rows)
            pending += rows
        start = clock.t - 3
        rows_in = sum(r for t, r in completed if t >= start)
        busy = sum(end - max(begin, start) for begin, end in spells + ([(since, clock.t)] if pending else [])
                   if end >= start)
        expected = rows_in / busy if rows_in and busy >= 0.01 else None
        got = adm.rows_per_s()
        assert (got is None) == (expected is None) and (got is None or got == pytest.approx(expected, rel=1e-6))
