"""AcceptHold: admitted work waits while new connections queue in the kernel, so a burst is gated at once.

An event loop on libuv (uvloop: Ray's workers, uvicorn) accepts ONE connection per loop iteration
(libuv 1.45, "unix: don't accept() connections in a loop"), and a new request's bytes are read an
iteration after its connection is accepted. When 128 clients connect at once and the front gate admits
the first 64, each admitted request's first step (Serve's routing, tokenizing, the call to the model:
about 1 ms) runs in the same iteration as the others; the connections still waiting in the kernel's
accept queue are taken in one per such iteration, so the requests the gate would refuse at once reach
it 70-150 ms late (serve_load's first-second burst; a bare uvicorn app doing 1 ms per admitted request:
64 refusals answered after 70-88 ms).

The kernel says how many connections wait: TCP_INFO on a listening socket reports its accept-queue
length (tcpi_unacked). `AcceptHold.wait()` returns at once while that queue is empty (one getsockopt:
the steady state, where clients keep their connections); otherwise the admitted request waits until the
queue has stayed empty for two loop iterations (the accepted requests are read and gated meanwhile), or
at most `max_s` (the app's `accept_hold_ms`; MAX_HOLD_S by default). In the bare app the 64 refusals then
answered within 10-12 ms; in a Ray ingress replica (serve_load's app at 128 tokens, 5 bursts of 128 new
clients, 64 admitted), 19-39 ms at p99 (median 23; with a 30 ms cap 18-28) against a median of 80-91 ms
without the hold.

Linux only: elsewhere, or when the request's listening socket cannot be found among this process's file
descriptors (a Unix socket, a port served by another process), `for_server` gives None and nothing waits.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import time

_TCP_INFO_LEN = 104  # enough of struct tcp_info for tcpi_unacked
_UNACKED_AT = 24  # offset of tcpi_unacked (u32): a listening socket's accept-queue length
QUIET_ITERATIONS = 2  # accepted in one iteration, read in the next: then the queue is really drained
WILDCARD = {"0.0.0.0", "::", ""}
# Longest wait: a burst of 128 new connections drains in 13-26 ms in a Ray ingress replica (one accept per
# 0.2-0.45 ms iteration: 512 need over 100 ms). The queue stays non-empty that long only while connections
# arrive faster than the loop accepts them with nothing else to do, i.e. in such a burst.
MAX_HOLD_S = 0.1  # ServeConfig.accept_hold_ms's default


def accept_queue(sock: socket.socket) -> int:
    """How many established connections wait in `sock`'s accept queue (a listening TCP socket, Linux)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return struct.unpack_from("I", info, _UNACKED_AT)[0]


def find_listener(host: str, port: int) -> int | None:
    """The file descriptor of this process's listening TCP socket that accepts connections to host:port
    (bound to that address or to a wildcard), or None. Not a duplicate: a duplicate would keep the socket
    listening (connections queued with no one to accept them) after its server closes it."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=int(name))
        except (OSError, ValueError):
            continue
        try:
            if (sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                bound_host, bound_port = sock.getsockname()[:2]
                if bound_port == port and (bound_host == host or bound_host in WILDCARD):
                    accept_queue(sock)  # TCP_INFO works here
                    return sock.fileno()
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays its owner's
    return None


class AcceptHold:
    """The accept queue of one listening socket, and the admitted requests waiting for it to drain."""

    _by_server: dict[tuple, AcceptHold | None] = {}

    def __init__(self, fd: int):
        self.fd = fd
        self.gone = False  # its server closed it: nothing to wait for any more
        self._waiters: list[tuple[asyncio.Future, float]] = []  # (future, monotonic deadline)
        self._polling = False
        self._quiet = 0
        self.holds = 0  # admitted requests that waited (tests, debugging)

    @classmethod
    def for_server(cls, server) -> AcceptHold | None:
        """The hold of the listening socket behind an ASGI scope's "server" (host, port); looked up once."""
        if not server or len(server) < 2 or server[1] is None:
            return None
        key = (server[0], server[1])
        if key not in cls._by_server:
            fd = find_listener(*key)
            cls._by_server[key] = cls(fd) if fd is not None else None
        return cls._by_server[key]

    def pending(self) -> int:
        """The accept queue's length; 0 once the descriptor is no longer a listening socket (its server
        closed it; the number may since name another file)."""
        if self.gone:
            return 0
        sock = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=self.fd)  # no probing syscalls
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return accept_queue(sock)
        except OSError:
            pass
        finally:
            if sock is not None:
                sock.detach()
        self.gone = True
        return 0

    async def wait(self, max_s: float = MAX_HOLD_S) -> None:
        """Return once no connection waits to be accepted (at once in the common case), or after max_s
        (0: at once)."""
        if max_s <= 0 or (not self._waiters and not self.pending()):
            return
        loop = asyncio.get_running_loop()
        entry = (loop.create_future(), time.monotonic() + max_s)
        self._waiters.append(entry)
        self.holds += 1
        if not self._polling:
            self._polling, self._quiet = True, 0
            loop.call_soon(self._poll)
        try:
            await entry[0]
        finally:
            if not entry[0].done():  # cancelled while waiting (the client left)
                self._waiters.remove(entry)

    def _poll(self) -> None:
        """Once per loop iteration while requests wait: release them all when the queue stayed empty, and
        each one whose time is up."""
        self._quiet = self._quiet + 1 if not self.pending() else 0
        now = time.monotonic()
        release = self._quiet >= QUIET_ITERATIONS
        keep = []
        for future, deadline in self._waiters:
            if release or deadline <= now:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((future, deadline))
        self._waiters = keep
        if not keep:  # released, or all cancelled
            self._polling = False
            return
        asyncio.get_running_loop().call_soon(self._poll)
