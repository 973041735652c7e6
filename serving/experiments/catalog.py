"""ExperimentCatalog: the experiments an ingress replica knows, kept in step with the ExperimentStore.

Every `interval_s` (0.25 s by default) the catalog reads the store's change mark (one small file); when it changed,
or at least every FULL_CHECK_S, it reads every experiment's current version again. A change made through any
ingress replica, the CLI or a guardrail's rollback is therefore applied by every replica within about interval_s
plus one read. A change made through this replica is applied here at once (`put`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .assign import random_bucket, unit
from .persist import ExperimentStore
from .spec import Arm, Experiment

FULL_CHECK_S = 30.0
WARN_EVERY_S = 60.0
log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Assignment:
    """What an experiment's alias resolved to for one request."""

    experiment: Experiment
    arm: Arm
    keyed: bool  # a unit key was given (else a random bucket: counted apart)
    forced: bool  # X-Polyhead-Arm chose the arm: excluded from the statistics
    unit: int | None  # the unit's 64-bit hash (keyed only)


class UnknownArm(LookupError):
    pass


class ExperimentCatalog:
    def __init__(self, store: ExperimentStore, interval_s: float = 0.25, lookup=asyncio.to_thread):
        self.store, self.interval_s, self.lookup = store, interval_s, lookup
        self.experiments: dict[str, Experiment] = {}
        self.broken: dict[str, str] = {}
        self.loaded = False  # read from the store at least once
        self._task: asyncio.Task | None = None
        self._seen = None
        self._listeners = []  # fn(old: dict, new: dict) after each reload
        self._puts = 0  # changes this replica applied (put): a store read begun before one must not undo it

    def on_change(self, fn) -> None:
        self._listeners.append(fn)

    def get(self, name: str) -> Experiment | None:
        return self.experiments.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.experiments

    def assign(self, experiment: Experiment, key: str | None, forced_arm: str | None) -> Assignment:
        """The arm that serves this request: forced by name, else by the unit key's bucket, else a random bucket."""
        if forced_arm is not None:
            arm = experiment.arm(forced_arm)
            if arm is None:
                raise UnknownArm(f"X-Polyhead-Arm {forced_arm[:80]!r} is not an arm of experiment {experiment.name!r} "
                                 f"(arms: {', '.join(a.name for a in experiment.arms)})")
            return Assignment(experiment, arm, key is not None, True, None)
        if key is not None:
            b, unit_hash = unit(experiment.salt, key)
        else:
            b, unit_hash = random_bucket(), None
        return Assignment(experiment, experiment.arms[experiment.allocation.arm_of(b)], key is not None, False, unit_hash)

    def put(self, experiment: Experiment | None, name: str) -> None:
        """A change this replica just wrote: applied here at once (None: deleted)."""
        self._puts += 1
        new = dict(self.experiments)
        if experiment is None:
            new.pop(name, None)
        elif name not in new or new[name].version <= experiment.version:
            new[name] = experiment
        self._apply(new)

    async def refresh(self) -> None:
        """Read every experiment from the store. A read during which this replica put a change may have missed it
        (the poll read the store, the admin route wrote and applied the change, the poll applied its older read:
        an experiment PUT a moment before was gone, and an adapter was then registered under its name): such a
        read is dropped and made again."""
        for _ in range(3):
            puts = self._puts
            token = await self.lookup(self.store.change_token)
            found, broken = await self.lookup(self.store.all)
            if self._puts == puts:
                self._seen, self.broken, self.loaded = token, broken, True
                self._apply(found)
                return
        self._seen = None  # still changing here: the next poll reads again

    def _apply(self, new: dict[str, Experiment]) -> None:
        old, self.experiments = self.experiments, new
        for fn in self._listeners:
            fn(old, new)

    def ensure_started(self) -> None:
        if self._task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        last_full, warned = 0.0, -WARN_EVERY_S
        while True:
            try:
                token = await self.lookup(self.store.change_token)
                now = time.monotonic()
                if not self.loaded or token != self._seen or now - last_full >= FULL_CHECK_S:
                    await self.refresh()
                    last_full = now
            except Exception as exc:  # noqa: BLE001 - an unreadable store never takes the replica down
                if time.monotonic() - warned >= WARN_EVERY_S:
                    warned = time.monotonic()
                    log.warning("polyhead: reading experiments from %s failed (retrying): %s: %s",
                                self.store.url, type(exc).__name__, exc)
            await asyncio.sleep(self.interval_s)
