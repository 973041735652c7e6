"""The front gate (serving/app/gate.py) as a plain ASGI middleware, without Ray: what it gates, how it learns an
app's limit from the app's answers, and what a refusal looks like. Under a real Serve proxy: test_serving."""
import asyncio
import json
import sys
from types import SimpleNamespace

import pytest

from serving.app.admission import Admission

from serving.app.backlog import MAX_HOLD_S
from serving.app.gate import (ADMISSION_HEADER, BODY_BYTES, BODY_TIMEOUT_S, GATED_HEADER, AppGate, Gate,
                              admission_header, gated_route, middlewares, parse_admission)
from serving.app.http import Ingress, error_response


def _scope(path: str, method: str = "POST", server=None, client=None) -> dict:
    return {"type": "http", "method": method, "path": path, "headers": [], "server": server, "client": client}


class App:
    """An ASGI app whose answers the test releases one by one; each carries the admission header."""

    def __init__(self, header: str | None, status: int = 200):
        self.header, self.status = header, status
        self.calls = 0
        self.release = asyncio.Event()
        self.scopes = []

    async def __call__(self, scope, receive, send):
        self.calls += 1
        self.scopes.append(scope)
        await self.release.wait()
        headers = [(b"content-type", b"application/json")]
        if self.header is not None:
            headers.append((ADMISSION_HEADER.encode(), self.header.encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


async def _call(gate, path="/v1/classify", method="POST", server=None, client=None) -> tuple[int, dict, bytes]:
    messages = []

    async def send(message):
        messages.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    await gate(_scope(path, method, server, client), receive, send)
    start = messages[0]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def _configured(app, server=None) -> Gate:
    """A gate in front of `app` that has passed one of its answers on (so it knows the app's limit); the app
    then holds its next answers until app.release is set again."""
    gate = Gate(app)
    app.release.set()
    assert (await _call(gate, server=server))[0] == 200
    app.release.clear()
    return gate


@pytest.mark.parametrize("method,path,expected", [
    ("POST", "/v1/classify", ("", "classify")),
    ("POST", "/v1/tag", ("", "tag")),
    ("POST", "/v1/embeddings", ("", "embeddings")),
    ("POST", "/team-a/v1/embeddings", ("/team-a", "embeddings")),
    ("GET", "/v1/embeddings", None),
    ("POST", "/v1/adapters", None),
    ("GET", "/metrics", None),
    ("POST", "/v1/classify/extra", None),
])
def test_only_inference_posts_are_gated(method, path, expected):
    assert gated_route(_scope(path, method)) == expected


def test_admission_header_round_trip_and_malformed_values():
    value = admission_header("my app;x=1", 64, 1, 60, 0.5, hold_s=0.025)
    assert parse_admission(value) == {"app": "my app;x=1", "max": 64, "min_retry_s": 1, "max_retry_s": 60,
                                      "push_s": 0.5, "hold_s": 0.025, "body_s": BODY_TIMEOUT_S,
                                      "body_bytes": BODY_BYTES, "log_level": "INFO", "wait_s": 0.0, "floor": 1}
    assert parse_admission(admission_header("a", 1, 1, 2, 1, 0.1, 2.5, 300, "WARNING", 0.25, 32)) | {"app": "a"} == {
        "app": "a", "max": 1, "min_retry_s": 1, "max_retry_s": 2, "push_s": 1.0, "hold_s": 0.1, "body_s": 2.5,
        "body_bytes": 300, "log_level": "WARNING", "wait_s": 0.25, "floor": 32}
    old = parse_admission("app=a;max=1;retry=1-2;push=1")  # an older ingress's header
    assert (old["hold_s"], old["body_s"], old["body_bytes"], old["log_level"]) == (MAX_HOLD_S, BODY_TIMEOUT_S,
                                                                                   BODY_BYTES, "INFO")
    assert (old["wait_s"], old["floor"]) == (0.0, 1)  # its fixed limit
    for bad in ["", "app=a", "app=a;max=x;retry=1-2;push=1", "app=a;max=1;retry=3-2;push=1",
                "app=a;max=-1;retry=1-2;push=1", "app=a;max=1;retry=1-2;push=0", "app=a;max=1;retry=12;push=1",
                "app=a;max=1;retry=1-2;push=1;hold=-0.1", "app=a;max=1;retry=1-2;push=1;hold=2",
                "app=a;max=1;retry=1-2;push=1;hold=nan", "app=a;max=1;retry=1-2;push=1;hold=x",
                "app=a;max=1;retry=1-2;push=1;body=0", "app=a;max=1;retry=1-2;push=1;body=nan",
                "app=a;max=1;retry=1-2;push=1;bytes=-1", "app=a;max=1;retry=1-2;push=1;bytes=x",
                "app=a;max=1;retry=1-2;push=1;wait=-1", "app=a;max=1;retry=1-2;push=1;wait=nan",
                "app=a;max=1;retry=1-2;push=1;floor=0", "app=a;max=1;retry=1-2;push=1;floor=x"]:
        assert parse_admission(bad) is None, bad


def test_the_proxy_callback_returns_the_gate():
    (middleware,) = middlewares()
    assert middleware.cls is Gate


def test_gate_passes_everything_until_the_app_has_answered_then_refuses_beyond_its_limit():
    async def main():
        app = App(admission_header("polyhead", 2, 1, 60, 1.0))
        gate = Gate(app)
        first = [asyncio.create_task(_call(gate)) for _ in range(3)]  # no limit known yet: all three pass
        await asyncio.sleep(0.01)
        assert app.calls == 3
        app.release.set()
        for status, headers, _ in await asyncio.gather(*first):
            assert status == 200
            assert ADMISSION_HEADER not in headers  # the gate removes it
        app.release.clear()
        held = [asyncio.create_task(_call(gate)) for _ in range(2)]  # the limit: 2 out
        await asyncio.sleep(0.01)
        status, headers, body = await _call(gate, "/v1/embeddings")
        assert (status, app.calls) == (429, 5)  # refused without reaching the app
        assert int(headers["retry-after"]) >= 1
        refused = Ingress.func_or_class._overloaded(SimpleNamespace(admission=Admission(1, 1, 60)))  # the ingress's own 429
        assert json.loads(body) == json.loads(error_response(refused.status, refused.message, refused.code).body)
        admin = asyncio.create_task(_call(gate, "/v1/adapters"))  # not an inference route: never gated
        await asyncio.sleep(0.01)
        assert app.calls == 6
        app.release.set()
        await asyncio.gather(*held, admin)
        status, _, _ = await _call(gate)  # room again
        assert status == 200
        counts = gate.gates[""].recorder.values()
        assert counts[("polyhead_requests", "polyhead_requests_total", (("code", "429"), ("route", "embeddings")))] == 1
        assert counts[("polyhead_errors", "polyhead_errors_total",
                       (("adapter", "none"), ("route", "embeddings"), ("type", "overloaded")))] == 1

    asyncio.run(main())


def test_a_request_is_no_longer_out_once_its_last_bytes_are_sent():
    """A closed-loop client sends its next request as soon as it has the answer, which can be before the app's
    call returns (its task still finishing): that request is not refused for the one before it."""
    class Lingering(App):
        async def __call__(self, scope, receive, send):
            self.calls += 1
            headers = [(ADMISSION_HEADER.encode(), self.header.encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"{}", "more_body": False})
            await self.release.wait()  # the task lingers after the answer went out

    async def main():
        app = Lingering(admission_header("polyhead", 1, 1, 60, 1.0))
        gate = await _configured(app)  # the limit (1 out) is known from here on
        first = asyncio.create_task(_call(gate))
        await asyncio.sleep(0.01)
        assert not first.done()  # answered, its call not returned yet
        app.release.set()  # the next request is let through: the second call finishes
        assert (await _call(gate))[0] == 200
        await first
        assert gate.gates[""].admission.pending_rows == 0

    asyncio.run(main())


def test_refusals_count_each_connection_once_however_often_it_retries():
    async def main():
        app = App(admission_header("polyhead", 1, 1, 60, 1.0))
        gate = await _configured(app)
        held = asyncio.create_task(_call(gate))
        await asyncio.sleep(0.01)
        for client in [["10.0.0.1", 5555]] * 20 + [("10.0.0.1", 5556), None, None]:  # a list: as some servers give
            assert (await _call(gate, client=client))[0] == 429
        assert gate.gates[""].admission.refused_clients == 4  # two connections, and two refusals without one
        app.release.set()
        await held

    asyncio.run(main())


def test_the_ingress_counts_its_refusals_by_the_requests_connection():
    import contextvars

    from serving.app.admission import set_client

    adm = Admission(1, 1, 60)
    ingress = SimpleNamespace(admission=adm)

    def request(client):  # one request's task: its own context
        set_client({"client": client})
        return Ingress.func_or_class._overloaded(ingress).status

    assert [contextvars.copy_context().run(request, ["10.0.0.1", 5555]) for _ in range(5)] == [429] * 5
    assert contextvars.copy_context().run(request, None) == 429  # no connection known: a client of its own
    assert adm.refused_clients == 2


def test_each_route_prefix_has_its_own_count_and_other_apps_are_never_gated():
    async def main():
        polyhead, other = App(admission_header("a", 1, 1, 60, 1.0)), App(None)

        async def router(scope, receive, send):
            target = polyhead if scope["path"].startswith("/a/") else other
            await target(scope, receive, send)

        gate = Gate(router)
        polyhead.release.set()
        other.release.set()
        await _call(gate, "/a/v1/classify")  # learns a's limit of 1
        await _call(gate, "/b/v1/classify")
        polyhead.release.clear()
        other.release.clear()
        held_a = asyncio.create_task(_call(gate, "/a/v1/classify"))
        held_b = [asyncio.create_task(_call(gate, "/b/v1/classify")) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert (await _call(gate, "/a/v1/tag"))[0] == 429
        assert other.calls == 4  # b answered without the header: never gated
        polyhead.release.set()
        other.release.set()
        await asyncio.gather(held_a, *held_b)

    asyncio.run(main())


def test_a_limit_of_zero_turns_the_gate_off_and_refused_answers_do_not_count_as_served():
    async def main():
        app = App(admission_header("polyhead", 0, 1, 60, 1.0))
        gate = await _configured(app)
        held = [asyncio.create_task(_call(gate)) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert app.calls == 6 and not gate.gates[""].admission.full
        app.release.set()
        await asyncio.gather(*held)
        assert gate.gates[""].admission.pending_rows == 0

        refusing = App(admission_header("polyhead", 3, 1, 60, 1.0), status=429)  # the ingress refused
        gate = Gate(refusing)
        refusing.release.set()
        await _call(gate)
        assert gate.gates[""].admission.rows_per_s() is None  # only 2xx answers make the rate

    asyncio.run(main())


def test_the_gate_marks_what_it_passes_on_and_a_client_cannot_forge_the_mark():
    async def main():
        app = App(None)
        app.release.set()
        gate = Gate(app)
        messages = []

        async def send(message):
            messages.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        forged = dict(_scope("/v1/tag"), headers=[(b"X-Polyhead-Gated", b"forged"), (b"accept", b"*/*")])
        await gate(forged, receive, send)
        await gate(_scope("/metrics", "GET"), receive, send)
        tagged, metrics_scope = app.scopes
        assert [v for k, v in tagged["headers"] if k.lower() == GATED_HEADER.encode()] == [b"1"]
        assert (b"accept", b"*/*") in tagged["headers"]
        assert not [k for k, _ in metrics_scope["headers"] if k.lower() == GATED_HEADER.encode()]  # not an inference route

    asyncio.run(main())


def test_the_gate_admits_by_expected_wait_in_requests_as_the_ingress_does_in_rows():
    """The app's max_queue_wait_s and max_batch_size come with its admission header: with no rate measured the
    gate lets its limit of requests out; once it has measured 20 answers a second, 10 out (0.5 s of work) and
    one more, then 429."""
    async def main():
        now = [1000.0]
        app = App(admission_header("polyhead", 64, 1, 60, 1.0, wait_s=0.5, floor=4))
        gate = Gate(app)
        gate.gates[""] = AppGate("")
        adm = gate.gates[""].admission
        adm.clock = lambda: now[0]
        app.release.set()
        assert (await _call(gate))[0] == 200
        app.release.clear()
        assert (adm.max_pending_rows, adm.max_wait_s, adm.min_rows) == (64, 0.5, 4)
        held = [asyncio.create_task(_call(gate)) for _ in range(64)]  # no rate yet: the limit, 64 out
        await asyncio.sleep(0.01)
        assert (await _call(gate))[0] == 429 and app.calls == 65
        app.release.set()
        await asyncio.gather(*held)
        app.release.clear()
        now[0] += 11  # those answers leave the window; then 20 answers a second for 2 s, loaded (4 out)
        adm.admit(3)
        for _ in range(40):
            adm.admit(1)
            now[0] += 0.05
            adm.done(1)
        adm.done(3, answered=False)
        assert adm.rows_per_s() == pytest.approx(20)
        held = [asyncio.create_task(_call(gate)) for _ in range(11)]
        await asyncio.sleep(0.01)
        status, headers, _ = await _call(gate)
        assert (status, app.calls) == (429, 76) and headers["retry-after"] == "1"  # (11 + 1) / 20 per s
        app.release.set()
        await asyncio.gather(*held)

    asyncio.run(main())


def test_a_redeployed_app_with_another_limit_is_followed():
    async def main():
        app = App(admission_header("polyhead", 3, 1, 60, 1.0))
        app.release.set()
        gate = Gate(app)
        await _call(gate)
        assert gate.gates[""].admission.max_pending_rows == 3
        app.header = admission_header("polyhead", 1, 2, 30, 1.0)  # the new config's answers
        await _call(gate)
        adm = gate.gates[""].admission
        assert (adm.max_pending_rows, adm.min_retry_s, adm.max_retry_s) == (1, 2, 30)
        app.release.clear()
        held = asyncio.create_task(_call(gate))
        await asyncio.sleep(0.01)
        status, headers, _ = await _call(gate)
        assert status == 429 and 2 <= int(headers["retry-after"]) <= 30
        app.release.set()
        await held

    asyncio.run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO accept queue: Linux only")
def test_admitted_requests_wait_while_connections_queue_so_a_burst_reaches_the_gate_first():
    """Under uvloop a server accepts one connection per loop iteration: admitted requests' work would delay
    the refusals still queued in the kernel (serving/app/backlog.py). With a limit known, the gate holds
    admitted requests until this process's listener has nothing left to accept; refusals never wait."""
    import socket

    from serving.app.backlog import AcceptHold

    async def call(gate, server):
        return (await _call(gate, server=server))[0]

    async def main():
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(16)
            server = lsock.getsockname()
            app = App(admission_header("polyhead", 2, 1, 60, 1.0))
            gate = await _configured(app, server)  # the app answers once: its limit (2) is known
            clients = [socket.create_connection(server) for _ in range(3)]  # a burst still in the kernel's queue
            admitted = [asyncio.create_task(call(gate, server)) for _ in range(2)]
            for _ in range(20):
                await asyncio.sleep(0)
            assert app.calls == 1  # admitted (counted out) but held: the app has not seen them
            assert await asyncio.wait_for(call(gate, server), 1.0) == 429  # the limit is out: refused meanwhile
            for _ in range(3):
                lsock.accept()[0].close()
            for _ in range(20):
                await asyncio.sleep(0)
            assert app.calls == 3  # queue drained: passed on
            app.release.set()
            assert await asyncio.gather(*admitted) == [200, 200]
            assert AcceptHold.for_server(server).holds == 2
            for c in clients:
                c.close()

    asyncio.run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO accept queue: Linux only")
def test_an_app_with_accept_hold_0_passes_admitted_requests_on_while_connections_queue():
    import socket

    async def main():
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(16)
            server = lsock.getsockname()
            app = App(admission_header("polyhead", 2, 1, 60, 1.0, hold_s=0))
            gate = await _configured(app, server)  # its config (hold 0) is known
            clients = [socket.create_connection(server) for _ in range(3)]  # still in the kernel's queue
            admitted = asyncio.create_task(_call(gate, server=server))
            for _ in range(20):
                await asyncio.sleep(0)
            assert app.calls == 2  # passed on at once, not held
            app.release.set()
            assert (await admitted)[0] == 200
            for c in clients:
                c.close()

    asyncio.run(main())


class Reading(App):
    """An App that reads the whole request body first and records it."""

    def __init__(self, header):
        super().__init__(header)
        self.bodies = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await super().__call__(scope, receive, send)


def _streaming(chunks, end="complete"):
    """A receive that hands out `chunks`; then the body is complete, or (end "stall") the client sends nothing
    more and receive never returns, or receive returns `end` (a message, e.g. a disconnect)."""
    queue = list(chunks)

    async def receive():
        if queue:
            chunk = queue.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(queue) or end != "complete"}
        if end == "stall":
            await asyncio.Event().wait()
        return end

    return receive


async def _send_to(gate, receive, path="/v1/classify"):
    messages = []

    async def send(message):
        messages.append(message)

    await gate(_scope(path), receive, send)
    return messages


def test_a_request_whose_body_is_still_arriving_holds_no_place_and_a_stalled_one_gets_408():
    """Sixty clients that send headers and half a body, then stall, took every place of the gate (2.4x its
    limit of 48 in make serve: every other request was refused 429, advised 60 s); now they hold none, each
    gets 408 once its deadline passes, and its app never sees it."""
    async def main():
        app = Reading(admission_header("polyhead", 2, 1, 60, 1.0, body_s=0.3, body_bytes=1000))
        gate = await _configured(app)
        calls = app.calls
        stalled = [asyncio.create_task(_send_to(gate, _streaming_forever())) for _ in range(5)]
        await asyncio.sleep(0.05)
        app.release.set()
        status, _, _ = await _call(gate)  # two places, none taken by the five
        assert status == 200 and app.calls == calls + 1
        for messages in await asyncio.gather(*stalled):
            start, body = messages
            assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
            assert json.loads(body["body"])["error"]["code"] == "body_timeout"
        assert app.calls == calls + 1  # the app never saw them
        counts = gate.gates[""].recorder.values()
        assert counts[("polyhead_requests", "polyhead_requests_total", (("code", "408"), ("route", "classify")))] == 5

    asyncio.run(main())


def _streaming_forever():
    """A client that sends half a body and then nothing."""
    return _streaming([b'{"model": "cls-a", '], end="stall")


def test_the_gate_hands_the_app_the_body_it_read_whole_and_a_large_one_as_it_streams():
    async def main():
        app = Reading(admission_header("polyhead", 4, 1, 60, 1.0, body_bytes=10))
        gate = await _configured(app)
        app.release.set()
        chunks = [b'{"model"', b': "cls-a", ', b'"input": "x"}']
        messages = await _send_to(gate, _streaming(chunks))
        assert messages[0]["status"] == 200 and app.bodies[-1] == b"".join(chunks)  # over 10 bytes: read on
        messages = await _send_to(gate, _streaming([b"{}"]))
        assert messages[0]["status"] == 200 and app.bodies[-1] == b"{}"
        calls = app.calls
        gone = await _send_to(gate, _streaming([b'{"mo'], end={"type": "http.disconnect"}))
        assert gone == [] and app.calls == calls  # the client left mid-body: nothing to answer, no app call
        assert gate.gates[""].admission.pending_rows == 0

    asyncio.run(main())


class _Lines:
    """The request log lines (serving/app/logs.py) written while it is in use."""

    def __enter__(self):
        from serving.app import logs

        self.logs, self.sink, self.lines = logs, logs.sink, []
        logs.sink = lambda line: self.lines.append(json.loads(line))
        return self.lines

    def __exit__(self, *exc):
        self.logs.sink = self.sink


def test_the_gates_own_answers_carry_the_request_id_and_are_logged():
    """Serve's RequestIdMiddleware sits behind the gate: the gate's 429 and 408 echo the client's X-Request-Id
    (or one of their own) themselves, and log their line as the ingress logs its answers."""
    async def main():
        app = Reading(admission_header("polyhead", 1, 1, 60, 1.0, body_s=0.2))
        gate = await _configured(app)
        held = asyncio.create_task(_call(gate))
        await asyncio.sleep(0.01)
        with _Lines() as lines:
            given = _scope("/v1/embeddings", client=("10.1.2.3", 4000))
            given["headers"] = [(b"x-request-id", b"client-id-7")]
            messages = []

            async def receive():
                return {"type": "http.request", "body": b"{}", "more_body": False}

            async def send(message):
                messages.append(message)

            await gate(given, receive, send)
            status, headers, _ = await _call(gate, "/v1/embeddings")
            stalled = await _send_to(gate, _streaming_forever())
        assert messages[0]["status"] == 429 and (b"x-request-id", b"client-id-7") in messages[0]["headers"]
        assert status == 429 and len(headers["x-request-id"]) == 36  # a UUID of the gate's own
        assert stalled[0]["status"] == 408
        (stalled_id,) = [v for k, v in stalled[0]["headers"] if k == b"x-request-id"]
        assert [(line["request_id"], line["status"], line["code"], line["route"], line["by"]) for line in lines] == [
            ("client-id-7", 429, "overloaded", "embeddings", "gate"),
            (headers["x-request-id"], 429, "overloaded", "embeddings", "gate"),
            (stalled_id.decode(), 408, "body_timeout", "classify", "gate")]
        assert lines[0]["client"] == "10.1.2.3" and lines[0]["path"] == "/v1/embeddings"
        app.release.set()
        await held

    asyncio.run(main())


def test_path_prefixes_no_app_answers_leave_no_gate_behind():
    """POST /<anything>/v1/classify reaches the gate with a prefix of the client's making; only a prefix whose app
    answered with its settings keeps a gate (issue 24's soak: no state per made-up path)."""
    async def main():
        app = App(None, status=404)  # polyhead's 404 for an unknown path carries no admission header
        app.release.set()
        gate = Gate(app)
        for i in range(200):
            assert (await _call(gate, f"/made-up-{i}/v1/classify"))[0] == 404
        assert gate.gates == {}
        app.header, app.status = admission_header("polyhead", 2, 1, 60, 1.0), 200
        assert (await _call(gate, "/v1/classify"))[0] == 200
        assert list(gate.gates) == [""]
        assert gate.gates[""].admission.max_pending_rows == 2  # the kept gate has the app's settings
        assert gate.gates[""].admission.pending_rows == 0

    asyncio.run(main())
