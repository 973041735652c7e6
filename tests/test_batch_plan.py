"""BatchPlan segment building, table-driven."""
import pytest

from serving.batch import BatchPlan


@pytest.mark.parametrize("slots, segments, buckets", [
    ([], [], []),
    ([-1], [], []),
    ([4], [(4, 0, 1)], [(0, 1, (4,))]),
    ([-1, 2, -1], [(2, 2, 3)], [(2, 1, (2,))]),
    # the same adapter in two separate runs becomes one segment
    ([3, 5, 3], [(5, 0, 1), (3, 1, 3)], [(0, 1, (5,)), (1, 2, (3,))]),
    ([3, -1, 5, 3, 7, -1, 5, 5, 2],
     [(2, 2, 3), (7, 3, 4), (3, 4, 6), (5, 6, 9)],
     [(2, 1, (2, 7)), (4, 2, (3,)), (6, 3, (5,))]),
    ([0, 1, 2, 3], [(0, 0, 1), (1, 1, 2), (2, 2, 3), (3, 3, 4)], [(0, 1, (0, 1, 2, 3))]),
])
def test_segments_and_buckets(slots, segments, buckets):
    plan = BatchPlan.build(slots)
    assert [(s.slot, s.row0, s.row1) for s in plan.segments] == segments
    assert [(b.row0, b.rows_per_seg, b.slots) for b in plan.buckets] == buckets
    assert sorted(plan.order) == list(range(len(slots)))
    assert list(plan.row_slots) == [slots[i] for i in plan.order]
    assert plan.token_slots.tolist() == list(plan.row_slots)
    for seg in plan.segments:
        assert all(s == seg.slot for s in plan.row_slots[seg.row0:seg.row1])
    assert plan.has_adapters == any(s >= 0 for s in slots)
