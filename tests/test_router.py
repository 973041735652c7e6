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


def test_router_metrics_count_outcomes_and_homes_per_adapter_version():
    """The ingress's collector: routed outcomes as counters (deltas across pushes), adapter versions by the
    number of replicas holding them (static names and bare names are not versions), a vanished count set to 0."""
    from serving.app.metrics import INGRESS_SERIES, Recorder

    r = object.__new__(router.AffinityRouter)  # Serve builds it with its own arguments; the state is ours
    r.initialize_state(homes=2)
    rec, collect = Recorder(INGRESS_SERIES, ray_export=False), router.RouterMetrics()
    a, b = ReplicaState("r1", frozenset({"a", "a@1", "b@3", "static"}), 0, 16), ReplicaState("r2", frozenset({"a@1"}), 0, 16)
    r._last = {"r1": a, "r2": b}
    for key, chosen, homes in [("a@1", a, ["r1"]), ("a@1", b, ["r1"]), ("c@1", b, ["r2"]), ("c@1", a, ["r2"]),
                               (None, a, [])]:
        r.stats.record(key, chosen, homes)
    collect(rec)

    def value(name, **labels):
        return rec.registry.get_sample_value(name, labels)

    assert [value("polyhead_affinity_routed_total", outcome=o) for o in router.OUTCOMES] == [2, 1, 1, 1]
    assert (value("polyhead_adapter_homes", homes="2"), value("polyhead_adapter_homes", homes="1")) == (1, 1)
    r._last = {"r1": a}  # r2 gone: a@1 and b@3 on one replica each
    r.stats.record("a@1", a, ["r1"])
    collect(rec)
    assert value("polyhead_affinity_routed_total", outcome="hit") == 3
    assert (value("polyhead_adapter_homes", homes="2"), value("polyhead_adapter_homes", homes="1")) == (0, 2)
