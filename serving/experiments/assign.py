"""Assignment: which arm of an experiment serves a unit (a user), sticky, and moved only where weights move.

The spec (pinned by golden vectors in tests/test_experiment_assign.py; every replica and every future version of
polyhead assigns the same way):

- **Bucket.** `bucket(salt, key) = int.from_bytes(SHA-256(utf8(salt + "." + key))[:8], "big") % 10_000`, the unit
  key being OpenAI's `user` body field or the `X-Polyhead-User` header. A request without a key gets a random bucket.
- **Counts.** An arm with weight w_i of W = sum(w) owns round(10,000 * w_i / W) buckets, rounded by largest
  remainder (ties: the earlier arm), so the shares are exact to 0.01 %.
- **Table.** A new allocation (a new experiment, or a new salt) gives the arms contiguous bucket ranges in their
  order: arm 0 owns [0, c_0), arm 1 [c_0, c_0 + c_1), ... A change of weights (a ramp, a rollback, an arm added or
  removed) starts from the previous table: every arm whose count falls releases its highest-numbered buckets, and
  the arms whose count rises take the released buckets in ascending order, in arm order. So a unit moves only from
  an arm that lost share to one that gained it: ramping one arm from 10 % to 50 % moves units into it and moves
  none between the other arms. Arms are matched by name across versions.

The table is stored with each experiment version as runs [[arm index, first bucket, end bucket), ...].
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

BUCKETS = 10_000


def bucket(salt: str, key: str) -> int:
    """The unit's bucket in [0, BUCKETS)."""
    return unit(salt, key)[0]


def unit(salt: str, key: str) -> tuple[int, int]:
    """(the unit's bucket, a 64-bit hash identifying the unit in the statistics) from one SHA-256."""
    digest = hashlib.sha256(f"{salt}.{key}".encode("utf-8", "surrogatepass")).digest()
    value = int.from_bytes(digest[:8], "big")
    return value % BUCKETS, value


def random_bucket() -> int:
    """A request without a unit key: a bucket at random (such requests are counted apart)."""
    return secrets.randbelow(BUCKETS)


def bucket_counts(weights: list[float]) -> list[int]:
    """Buckets per arm: round(BUCKETS * w / sum(w)) by largest remainder (ties: the earlier arm); sum = BUCKETS."""
    total = float(sum(weights))
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative with a positive sum")
    exact = [BUCKETS * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:BUCKETS - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class Allocation:
    """bucket -> arm index, for arms in a fixed order."""

    table: tuple[int, ...]  # [BUCKETS]: the arm index owning each bucket

    @classmethod
    def initial(cls, weights: list[float]) -> "Allocation":
        table: list[int] = []
        for arm, count in enumerate(bucket_counts(weights)):
            table += [arm] * count
        return cls(tuple(table))

    def rebalanced(self, old_names: list[str], new_names: list[str], weights: list[float]) -> "Allocation":
        """The table for arms `new_names` with `weights`, moving as few buckets as the spec allows from this table
        (whose arm indexes refer to `old_names`)."""
        want = bucket_counts(weights)
        index = {name: i for i, name in enumerate(new_names)}
        owner = [index.get(old_names[a], -1) for a in self.table]  # -1: an arm that is gone
        owned: list[list[int]] = [[] for _ in new_names]
        free: list[int] = []
        for b, a in enumerate(owner):
            (free if a < 0 else owned[a]).append(b)
        for a, buckets in enumerate(owned):  # falling arms release their highest buckets
            while len(buckets) > want[a]:
                free.append(buckets.pop())
        free.sort()
        table = list(owner)
        for b in free:
            table[b] = -1
        pos = 0
        for a, buckets in enumerate(owned):  # rising arms take released buckets in ascending order
            need = want[a] - len(buckets)
            for b in free[pos:pos + need]:
                table[b] = a
            pos += need
        return Allocation(tuple(table))

    def arm_of(self, b: int) -> int:
        return self.table[b]

    def counts(self, arms: int) -> list[int]:
        out = [0] * arms
        for a in self.table:
            out[a] += 1
        return out

    def runs(self) -> list[list[int]]:
        """[[arm, start, end), ...]: the table as stored."""
        out: list[list[int]] = []
        for b, a in enumerate(self.table):
            if out and out[-1][0] == a and out[-1][2] == b:
                out[-1][2] = b + 1
            else:
                out.append([a, b, b + 1])
        return out

    @classmethod
    def from_runs(cls, runs: list[list[int]], arms: int) -> "Allocation":
        """The stored runs back; ValueError unless they cover every bucket once with valid arm indexes."""
        table = [-1] * BUCKETS
        for run in runs:
            if (not isinstance(run, list) or len(run) != 3 or not all(isinstance(x, int) for x in run)
                    or not 0 <= run[0] < arms or not 0 <= run[1] < run[2] <= BUCKETS):
                raise ValueError(f"invalid allocation run {run!r}")
            for b in range(run[1], run[2]):
                if table[b] != -1:
                    raise ValueError(f"bucket {b} allocated twice")
                table[b] = run[0]
        if -1 in table:
            raise ValueError(f"bucket {table.index(-1)} is not allocated")
        return cls(tuple(table))
