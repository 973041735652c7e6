"""AffinityRouter's pure part (serving/app/router.py): routing stats and infer_rows's rows -> the adapter key and the
ReplicaStates that affinity.choose ranks. No Ray cluster."""
from __future__ import annotations

import pytest

from serving.app.affinity import ReplicaState, choose

router = pytest.importorskip("serving.app.router")


@pytest.mark.parametrize("rows, key", [
    ([{"adapter": "a", "input_ids": [1]}], "a"),
    ([{"adapter": "a"}, {"adapter": "a"}, {"adapter": None}], "a"),  # base rows beside one adapter: pinned to it
    ([{"adapter": None}], None),  # base rows only: spread
    ([{"adapter": "a"}, {"adapter": "b"}], None),  # several adapters: no one home
    ([], None),
    (None, None),  # not an infer_rows call
    ("not rows", None),
])
def test_key_from_rows(rows, key):
    assert router.routing_inputs((), rows, 16) == (key, [])


def test_states_from_stats_missing_ones_are_empty_with_the_configured_capacity():
    stats = [("r1", {"resident": ["b", "a@2", "a"], "queued_rows": 5, "capacity_rows": 64}),
             ("r2", {}), ("r3", None), ("r4", {"resident": [], "queued_rows": 0})]
    _, states = router.routing_inputs(stats, [{"adapter": "a"}], 16)
    assert states == [ReplicaState("r1", frozenset({"a", "a@2", "b"}), 5, 64),
                      ReplicaState("r2", frozenset(), 0, 16), ReplicaState("r3", frozenset(), 0, 16),
                      ReplicaState("r4", frozenset(), 0, 16)]


def test_resident_replica_ranks_first():
    stats = [("r1", {"resident": [], "queued_rows": 0, "capacity_rows": 16}),
             ("r2", {"resident": ["a"], "queued_rows": 3, "capacity_rows": 16})]
    key, states = router.routing_inputs(stats, [{"adapter": "a"}], 16)
    assert choose(key, states)[0] == ["r2"]
