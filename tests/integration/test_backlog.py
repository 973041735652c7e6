"""AcceptHold (serving/app/backlog.py) on real listening sockets: the kernel's accept-queue length, finding this
process's listener for a request, and admitted work waiting while connections queue. The gate's use of it:
test_gate."""
import asyncio
import socket
import sys

import pytest

from serving.app.backlog import AcceptHold, accept_queue, find_listener

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO accept queue: Linux only")


def _listener(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(64)
    return sock


def _connect(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def test_accept_queue_counts_connections_not_yet_accepted():
    with _listener() as lsock:
        clients = _connect(lsock.getsockname()[1], 3)
        try:
            assert accept_queue(lsock) == 3
            conn, _ = lsock.accept()
            conn.close()
            assert accept_queue(lsock) == 2
        finally:
            for c in clients:
                c.close()


def test_find_listener_matches_the_port_on_its_address_or_a_wildcard_and_owns_nothing():
    with _listener() as lsock, _listener("0.0.0.0") as wild:
        port, wild_port = lsock.getsockname()[1], wild.getsockname()[1]
        assert find_listener("127.0.0.1", port) == lsock.fileno()
        assert find_listener("127.0.0.1", wild_port) == wild.fileno()  # bound to every address
        hold = AcceptHold(lsock.fileno())
        clients = _connect(port, 2)
        assert hold.pending() == 2
        for c in clients:
            c.close()
    # closed by its owner: nothing kept it open (a duplicate would have), and the hold stops waiting
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # the port is free again
    assert hold.pending() == 0 and hold.gone
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        free_port = unused.getsockname()[1]
    assert find_listener("127.0.0.1", free_port) is None  # nothing listens there
    assert AcceptHold.for_server(None) is None and AcceptHold.for_server(("sock", None)) is None  # a Unix socket


def test_wait_returns_at_once_with_an_empty_queue_and_waits_while_connections_queue():
    async def main():
        with _listener() as lsock:
            hold = AcceptHold(lsock.fileno())
            await asyncio.wait_for(hold.wait(10.0), 1.0)  # nothing queued
            assert hold.holds == 0
            clients = _connect(lsock.getsockname()[1], 2)
            waiters = [asyncio.create_task(hold.wait(10.0)) for _ in range(3)]
            for _ in range(20):  # many loop iterations: still queued, so everyone waits
                await asyncio.sleep(0)
            assert not any(w.done() for w in waiters) and hold.holds == 3
            later = asyncio.create_task(hold.wait(10.0))  # joins the waiters even though it checks nothing itself
            for _ in range(2):
                lsock.accept()[0].close()
            await asyncio.wait_for(asyncio.gather(*waiters, later), 1.0)  # drained: all released together
            assert hold.holds == 4
            await asyncio.wait_for(hold.wait(10.0), 1.0)  # and the next one passes at once again
            assert hold.holds == 4
            for c in clients:
                c.close()

    asyncio.run(main())


def test_each_waiter_gives_up_after_its_own_cap_and_a_cancelled_waiter_leaves():
    async def main():
        with _listener() as lsock:
            hold = AcceptHold(lsock.fileno())
            clients = _connect(lsock.getsockname()[1], 1)  # never accepted
            cancelled = asyncio.create_task(hold.wait(10.0))
            await asyncio.sleep(0)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await asyncio.wait_for(hold.wait(0), 1.0)  # a cap of 0: no wait at all
            assert hold.holds == 1
            loop = asyncio.get_running_loop()
            start = loop.time()
            patient = asyncio.create_task(hold.wait(10.0))
            await asyncio.wait_for(hold.wait(0.05), 2.0)
            assert loop.time() - start >= 0.04  # held until its cap, not forever
            for _ in range(20):
                await asyncio.sleep(0)
            assert not patient.done()  # a longer cap still waits: the queue has not drained
            assert accept_queue(lsock) == 1
            lsock.accept()[0].close()
            await asyncio.wait_for(patient, 1.0)
            for c in clients:
                c.close()

    asyncio.run(main())
