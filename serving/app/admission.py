"""Admission control of one ingress replica: how many rows it has at the model, and the Retry-After of what it
refuses.

A request is admitted whole while the rows already at the model would be worked off within `max_wait_s`
(ServeConfig.max_queue_wait_s) at the rate this replica has seen the model complete them (rows_per_s, below):

    admitted  while  pending_rows < min_rows,  or  pending_rows / rows_per_s <= max_wait_s
                     (rows_per_s not known yet: while pending_rows < max_pending_rows)
    refused   always at pending_rows >= max_pending_rows (a bound on the memory a backlog holds)

and refused (429) beyond, before its body is read, so a refusal costs little of the CPU the model needs. A
fixed number of rows refused bursts on an idle server (`make serve`, 48 rows: 80 one-row requests at once got
18 x 429, 256 got 208) although the model worked them off in about 2 s; counting the wait instead admits what
the model can finish in time however fast it is, and a sustained overload is shed as soon as its backlog
outgrows max_wait_s (the rate is known after min_busy_s of work). Until then (a start, a burst after a quiet
spell of window_s) the limit is max_pending_rows; `min_rows` (the ingress: ServeConfig.admission_floor) is always
admitted, whatever the rate says, so one batch's worth never waits for an estimate that a trickle of traffic
made low. max_wait_s 0: a fixed limit of max_pending_rows rows. The front gate (serving/app/gate.py) applies
the same rule to requests.

The rate is measured only while the model is loaded: rows answered, per second, while at least `min_rows`
rows were at the model. Below that every request is admitted anyway, and a light load measures latency, not
throughput: idle time, a trickle of one-row calls and the first call after a start (which loads its adapter and
warms the model: over a second on a slow CI machine, so the rate came out at 1 row/s and a burst right after
it was refused with Retry-After 60) say nothing about how fast a backlog drains.

Retry-After is the time the model needs to work off the rows already admitted plus one row for each client
refused since the last advice went out, at that rate:

    retry_after = ceil((pending_rows + recent_refusals) / rows_per_busy_s), clamped to [min_s, max_s]

A client that honours it (the openai client does, up to 60 s) comes back when there is room for it, so refused
clients return spread over the time the model needs to serve them instead of all at once every second, and the
model keeps the CPU it needs for the rows it accepted. Where the window holds less than `min_busy_s` of busy
time (a start, a burst after a quiet spell, a stalled model) the rate is not known yet and the advice is `min_s`:
the first calls of a burst come back one batch at a time and, after a start, run cold, so a rate measured over
them is far too low (`make serve`, 120 clients at once: one row answered after 0.14 s of work, 7 rows/s, and
clients were advised 43 s; the model then completed a few hundred rows a second).

`recent_refusals` counts clients, not refusals: a connection (the caller's key, the ASGI scope's client address)
refused again within the advice counts once. Counting every refusal ran away: clients that retry at once
without waiting (thousands of refusals a second) made the advice grow, a larger advice kept more refusals
counted, and it reached `max_s` and stayed there for a minute after the flood, telling every well-behaved client
to wait 60 s (serve_load, 128 tokens, after its flood levels: every refusal of the overload run advised 60 s,
goodput at 4x overload 0.44x and 0.95x of peak; counting clients, 2 s and 1.17x).

A client that opens a new connection for every retry (a script calling `requests.post` in a loop) is a new
connection each time, so one host counts at most MAX_WAITING_PER_HOST connections: without that bound, 20 such
clients retrying at once got 100 clients that honour it advised up to 51-60 s (`make serve`, short texts; with
the bound and min_busy_s, 1-2 s throughout). The bound keeps the advice at most
(pending_rows + hosts x MAX_WAITING_PER_HOST) / rate. Refusals without a key (a Unix socket) each count as a
client, all of one host.
"""
from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict, deque
from contextvars import ContextVar
from typing import Callable, Hashable

MAX_TRACKED_CLIENTS = 100_000  # refused clients remembered at once (the oldest are forgotten first)
MAX_WAITING_PER_HOST = 256  # refused connections of one host the advice counts (see the module's docstring)


def client_key(scope: dict) -> tuple | None:
    """The key `Admission.refuse` counts a request's client under: its connection's (host, port), from an ASGI
    scope; None where the server gives none (a Unix socket)."""
    client = scope.get("client")
    return tuple(client) if client else None


_ANONYMOUS = object()  # first item of the key a refusal without a client key is counted under


def _host(key: Hashable) -> Hashable:
    """The host a refused client's key belongs to: a (host, port) key's host; a keyless refusal's, None."""
    if isinstance(key, tuple) and key:
        return None if key[0] is _ANONYMOUS else key[0]
    return key


_CLIENT: ContextVar[tuple | None] = ContextVar("polyhead_client", default=None)


def set_client(scope: dict) -> None:
    """Remember the request's connection (client_key) for the rest of the calling task: code that refuses it
    deeper down (current_client) need not be handed the request."""
    _CLIENT.set(client_key(scope))


def current_client() -> tuple | None:
    return _CLIENT.get()


class Admission:
    def __init__(self, max_pending_rows: int, min_retry_s: int, max_retry_s: int, max_wait_s: float = 0.0,
                 min_rows: int = 1, window_s: float = 10.0, min_busy_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_retry_s < min_retry_s:
            raise ValueError(f"max_retry_s ({max_retry_s}) is below min_retry_s ({min_retry_s})")
        if not max_wait_s >= 0:  # NaN too
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_pending_rows = max_pending_rows  # the hard limit, and the limit while no rate is known
        self.max_wait_s = max_wait_s  # 0: a fixed limit of max_pending_rows
        self.min_rows = min_rows  # admitted below this many pending rows whatever the rate
        self.min_retry_s, self.max_retry_s = min_retry_s, max_retry_s
        self.window_s, self.min_busy_s = window_s, min_busy_s
        self.clock = clock
        self.pending_rows = 0  # rows sent to the model and not answered yet
        self._completed: deque[tuple[float, int]] = deque()  # (time, rows) of calls answered loaded, last window_s
        self._completed_rows = 0  # their rows
        self._busy: deque[tuple[float, float]] = deque()  # (start, end) of loaded spells, last window_s
        self._busy_s = 0.0  # their length
        self._busy_since: float | None = None  # start of the current loaded spell, None while not loaded
        self._refused: OrderedDict[Hashable, float] = OrderedDict()  # client -> its last refusal, oldest first
        self._per_host: dict[Hashable, int] = {}  # host -> its clients in _refused
        self._counted = 0  # clients the advice counts: sum over hosts of min(its clients, MAX_WAITING_PER_HOST)
        self._anonymous = itertools.count()  # keys of refusals without a client key
        self._advice = min_retry_s  # the last Retry-After given

    @classmethod
    def of(cls, cfg) -> Admission:
        """An ingress replica's, from its ServeConfig (its front gate gets the same values: Ingress._gate_config)."""
        return cls(cfg.pending_rows_limit(), cfg.retry_after_s, cfg.max_retry_after_s, cfg.max_queue_wait_s,
                   cfg.admission_floor())

    @property
    def refused_clients(self) -> int:
        """Clients refused within the current advice (each counted once, at most MAX_WAITING_PER_HOST per
        host), as the next advice counts them."""
        return self._counted

    @property
    def full(self) -> bool:
        """A new request is refused now (the module's docstring)."""
        if self.pending_rows >= self.max_pending_rows:
            return True
        if self.pending_rows < self.min_rows or not self.max_wait_s:
            return False
        rate = self.rows_per_s()
        return rate is not None and self.pending_rows > rate * self.max_wait_s

    def limit(self) -> int:
        """The pending rows at which `full` turns true now."""
        rate = self.rows_per_s() if self.max_wait_s else None
        if rate is None:
            return self.max_pending_rows
        return min(self.max_pending_rows, max(self.min_rows, math.floor(rate * self.max_wait_s) + 1))

    def admit(self, rows: int) -> None:
        self.pending_rows += rows
        if self._busy_since is None and self.pending_rows >= self.min_rows:
            self._busy_since = self.clock()

    def done(self, rows: int, answered: bool = True) -> None:
        """`rows` admitted rows came back: answered by the model (they count towards its rate when they came
        back while it was loaded), or not (refused by its queue, unavailable, cancelled)."""
        now = self.clock()
        if answered and self._busy_since is not None:
            self._completed.append((now, rows))
            self._completed_rows += rows
        self.pending_rows -= rows
        if self._busy_since is not None and self.pending_rows < self.min_rows:
            self._busy.append((self._busy_since, now))
            self._busy_s += now - self._busy_since
            self._busy_since = None

    def rows_per_s(self) -> float | None:
        """Rows completed per second of loaded time (at least min_rows pending) over the last window_s; None
        while it holds no completed row or less than min_busy_s of loaded time. Constant time (running sums): `full` asks it for
        every request while the server is loaded."""
        now = self.clock()
        start = now - self.window_s
        completed, spells = self._completed, self._busy
        while completed and completed[0][0] < start:
            self._completed_rows -= completed.popleft()[1]
        while spells and spells[0][1] < start:
            begin, end = spells.popleft()
            self._busy_s = self._busy_s - (end - begin) if spells else 0.0  # (0 when empty: no rounding drift)
        if not completed:
            return None
        # spells never overlap, so only the oldest can have begun before the window
        busy = self._busy_s - (max(0.0, start - spells[0][0]) if spells else 0.0)
        if self._busy_since is not None:
            busy += now - max(self._busy_since, start)
        if busy < self.min_busy_s:
            return None
        return self._completed_rows / busy

    def refuse(self, client: Hashable | None = None) -> int:
        """Record a refused request of `client` (a connection's key; None: a client of its own); the
        Retry-After (whole seconds) to give it."""
        now = self.clock()
        refused = self._refused
        while refused and next(iter(refused.values())) < now - self._advice:
            self._forget(refused.popitem(last=False)[0])  # a client that honours the advice is back by now
        key = (_ANONYMOUS, next(self._anonymous)) if client is None else client
        if key not in refused:
            host = _host(key)
            self._per_host[host] = self._per_host.get(host, 0) + 1
            if self._per_host[host] <= MAX_WAITING_PER_HOST:
                self._counted += 1
        refused[key] = now
        refused.move_to_end(key)
        if len(refused) > MAX_TRACKED_CLIENTS:
            self._forget(refused.popitem(last=False)[0])
        rate = self.rows_per_s()
        if rate is None:
            self._advice = self.min_retry_s
        else:
            wanted = math.ceil((self.pending_rows + self._counted) / rate)
            self._advice = min(self.max_retry_s, max(self.min_retry_s, wanted))
        return self._advice

    def _forget(self, key: Hashable) -> None:
        host = _host(key)
        left = self._per_host[host] - 1
        if left < MAX_WAITING_PER_HOST:
            self._counted -= 1
        if left:
            self._per_host[host] = left
        else:
            del self._per_host[host]
