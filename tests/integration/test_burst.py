"""A burst on an idle `make serve` is admitted whole (serving/app/admission.py: admission by expected wait).

The server is started as `make serve` starts it (`python -m serving.cli serve --config ...`, deploy/serve_config.yaml
on a free port: two model replicas, the front gate in the ingress replica's own HTTP server, Ray's queue limits).
Before admission by expected wait, 80 one-row requests at once got 18 x 429 from it: admission counted a fixed
48 rows. On an idle server no completion rate is measured yet, so the cold limit (max_pending_rows) applies.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serving.app import free_port

from .test_ray_loopback import _serve_config, _start_serving, _stop, _wait_ready

pytestmark = pytest.mark.slow
BURST = 256
TEXTS = ["I loved this film", "a dull and tiring evening", "the service was quick and friendly",
         "never again, what a waste", "an ordinary day at the office"]


async def _post_at_once(port: int, bodies: list[dict]) -> list[tuple[int, dict, bytes]]:
    """Each body on a connection of its own, opened first, then every request written at once: a burst as a
    fast client sends it (httpx's pool took 18 s to send these 256, which is no burst); (status, headers,
    body) each."""
    conns = await asyncio.gather(*[asyncio.open_connection("127.0.0.1", port) for _ in bodies])

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: dict):
        data = json.dumps(body).encode()
        writer.write(f"POST /v1/classify HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(data)}\r\n\r\n".encode() + data)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        payload = await reader.readexactly(int(headers.get("content-length", "0")))
        writer.close()
        return int(head[0].split(" ", 2)[1]), headers, payload

    return await asyncio.gather(*[one(r, w, b) for (r, w), b in zip(conns, bodies)])


def test_a_burst_of_256_one_row_requests_on_an_idle_make_serve_is_answered_200(tmp_path):
    port = free_port()
    proc = _start_serving(_serve_config(tmp_path, port), tmp_path, "serve.log")
    try:
        _wait_ready(proc, port, tmp_path / "serve.log", 240)
        # one request first, as a client checking the server would: the front gate learns the app's admission
        # from its answer (serving/app/gate.py), so the burst below meets both the gate and the ingress
        first = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "sentiment", "input": TEXTS[0]},
                           timeout=120)
        assert first.status_code == 200, first.text
        bodies = [{"model": "sentiment", "input": f"{TEXTS[i % len(TEXTS)]} ({i})"} for i in range(BURST)]
        answers = asyncio.run(_post_at_once(port, bodies))
        refused = [(status, headers.get("retry-after"), body[:200]) for status, headers, body in answers
                   if status != 200]
        assert not refused, f"{len(refused)} of {BURST} not answered 200: {refused[:5]}"
        for _, _, body in answers:
            (item,) = json.loads(body)["data"]
            assert item["model"] == "sentiment" and item["label"] in ("negative", "positive"), item
    finally:
        _stop(proc)
