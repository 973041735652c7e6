"""Closed-loop HTTP load generators for serve_load.py, each reporting its own CPU time.

wrk     C, with a Lua script (Debian's wrk): cheapest; per-status counts, one latency histogram.
py      a raw asyncio HTTP/1.1 keep-alive client (uvloop when installed) in its own process: every
        request's status and latency, so shed (429/503) and accepted answers get their own percentiles.

Each request is POST /v1/embeddings or /v1/classify (half each, at random) of {"model": adapter, "input":
text} for a random adapter and text; with `model_header` the adapter is also sent as Ray Serve's
`serve_multiplexed_model_id` header (what @serve.multiplexed routes on). Requests still in flight when the
duration ends are dropped, as wrk does.

    python benchmarks/load_clients.py < arguments.json     # the py client's own process (used by run_py)
"""
from __future__ import annotations

import asyncio
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROUTES = ("/v1/embeddings", "/v1/classify")
MUX_HEADER = "serve_multiplexed_model_id"
WARMUP_S = 1.0  # shed_p99_later_ms: only requests sent this long after all clients started at once

WRK_LUA = r"""
local texts = {%(texts)s}
local adapters = {%(adapters)s}
local prefix = "%(prefix)s"
local model_header = %(model_header)s
local threads = {}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end
function init(args)
  math.randomseed(%(seed)d + tid * 7919)
  n200 = 0; n429 = 0; n503 = 0; nother = 0
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  local text = texts[math.random(#texts)]
  local adapter = adapters[math.random(#adapters)]
  local body = '{"model":"' .. adapter .. '","input":"' .. text .. '"}'
  local headers = nil
  if model_header then headers = {["%(mux_header)s"] = adapter} end
  local route = "/v1/classify"
  if math.random(2) == 1 then route = "/v1/embeddings" end
  return wrk.format("POST", prefix .. route, headers, body)
end
function response(status, headers, body)
  if status == 200 then n200 = n200 + 1
  elseif status == 429 then n429 = n429 + 1
  elseif status == 503 then n503 = n503 + 1
  else nother = nother + 1 end
end
function done(summary, latency, requests)
  local c = {n200 = 0, n429 = 0, n503 = 0, nother = 0}
  for _, t in ipairs(threads) do
    for k, _ in pairs(c) do c[k] = c[k] + t:get(k) end
  end
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p95_us": %%d, ' ..
    '"p99_us": %%d, "max_us": %%d, "n200": %%d, "n429": %%d, "n503": %%d, "nother": %%d, ' ..
    '"err_connect": %%d, "err_read": %%d, "err_write": %%d, "err_timeout": %%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max, c.n200, c.n429, c.n503, c.nother, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
"""


def run_wrk(url: str, prefix: str, texts, adapters, conc: int, duration: float, seed: int, tmp: Path,
            model_header: bool = False) -> dict:
    script = tmp / f"load_{seed}_{conc}.lua"
    script.write_text(WRK_LUA % {"texts": ", ".join(json.dumps(t) for t in texts),
                                 "adapters": ", ".join(json.dumps(a) for a in adapters), "prefix": prefix,
                                 "seed": seed, "model_header": "true" if model_header else "false",
                                 "mux_header": MUX_HEADER})
    threads = min(2, conc)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(["wrk", "-t", str(threads), "-c", str(conc), "-d", f"{max(1, round(duration))}s",
                           "--timeout", "30s", "-s", str(script), url], capture_output=True, text=True,
                          timeout=duration + 120)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: rc={proc.returncode} {proc.stdout[-500:]} {proc.stderr[-500:]}")
    r = json.loads(line[len("WRKJSON "):])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    total, secs = r["requests"], r["duration_us"] / 1e6

    def ms(key):  # wrk reports 0 for an empty histogram: nothing completed
        return r[key] / 1000 if total else None

    return {"client": "wrk", "concurrency": conc, "requests": total, "seconds": secs,
            "req_per_s": total / secs if secs else 0.0, "ok_per_s": r["n200"] / secs if secs else 0.0,
            "p50_ms": ms("p50_us"), "p95_ms": ms("p95_us"), "p99_ms": ms("p99_us"), "max_ms": ms("max_us"),
            "n200": r["n200"], "n429": r["n429"], "n503": r["n503"],
            "nother": r["nother"], "socket_errors": r["err_connect"] + r["err_read"] + r["err_write"],
            "timeouts": r["err_timeout"], **_shares(total, r["n429"], r["n503"]),
            "client_cpu_s": cpu, "client_cpu_share_of_one_core": cpu / wall}


def run_py(url: str, prefix: str, texts, adapters, conc: int, duration: float, seed: int, tmp: Path | None = None,
           model_header: bool = False, honour_retry_after: bool = False, reconnecting: int = 0) -> dict:
    """The asyncio client in its own process (its CPU is its own); per-status latency percentiles.

    honour_retry_after: a client answered 429/503 with Retry-After waits that long before its next request (as
    the official openai client does); otherwise it sends the next one at once.
    reconnecting: that many more clients, each opening a new connection for every request and sending the next
    at once whatever the answer (a script calling `requests.post` in a loop); the figures are the `conc`
    clients', theirs are under "reconnecting"."""
    import numpy as np

    arg = json.dumps({"url": url, "prefix": prefix, "texts": texts, "adapters": adapters, "conc": conc,
                      "duration": duration, "seed": seed, "model_header": model_header,
                      "honour_retry_after": honour_retry_after, "reconnecting": reconnecting})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__], input=arg, capture_output=True, text=True,
                          timeout=duration + 180)
    wall = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PYJSON ")), None)
    if line is None:
        raise RuntimeError(f"py client gave no result: rc={proc.returncode} {proc.stderr[-800:]}")
    r = json.loads(line[len("PYJSON "):])
    mine = np.asarray(r["kind"], dtype=np.int64) == 0  # the `conc` clients' requests
    status = np.asarray(r["status"], dtype=np.int64)
    others = status[~mine]
    status = status[mine]
    lat = np.asarray(r["lat"], dtype=np.float64)[mine] * 1000
    secs = r["seconds"]

    def pct(mask, q):
        return float(np.percentile(lat[mask], q)) if mask.any() else None

    sent = np.asarray(r["sent"], dtype=np.float64)[mine]
    every = status != -1
    ok, shed = status == 200, (status == 429) | (status == 503)
    later = sent >= WARMUP_S  # sent after the clients' simultaneous start
    n = {code: int((status == code).sum()) for code in (200, 429, 503, -1)}
    total = int(every.sum())
    return {"client": "py", "honour_retry_after": honour_retry_after, "concurrency": conc, "requests": total, "seconds": secs,
            "req_per_s": total / secs, "ok_per_s": n[200] / secs,
            "p50_ms": pct(every, 50), "p95_ms": pct(every, 95), "p99_ms": pct(every, 99),
            "max_ms": float(lat[every].max()) if total else None,
            "ok_p50_ms": pct(ok, 50), "ok_p99_ms": pct(ok, 99),
            "shed_p50_ms": pct(shed, 50), "shed_p99_ms": pct(shed, 99), "shed_max_ms": pct(shed, 100),
            "shed_p99_later_ms": pct(shed & later, 99),
            "n200": n[200], "n429": n[429], "n503": n[503], "nother": total - n[200] - n[429] - n[503],
            "socket_errors": n[-1], "timeouts": 0, **_shares(total, n[429], n[503]),
            "retry_after_s": _spread(r["retry_after"]),
            "reconnecting": None if not reconnecting else {
                "clients": reconnecting, "req_per_s": len(others) / secs, "ok_per_s": int((others == 200).sum()) / secs,
                "shed_per_s": int(((others == 429) | (others == 503)).sum()) / secs},
            "client_cpu_s": r["cpu_s"], "client_cpu_share_of_one_core": r["cpu_s"] / wall}


def _spread(values: list[float]) -> dict | None:
    """Median, p90 and max of the Retry-After values the client was given (None without any)."""
    if not values:
        return None
    v = sorted(values)
    return {"p50": v[len(v) // 2], "p90": v[min(len(v) - 1, int(len(v) * 0.9))], "max": v[-1], "n": len(v)}


def _shares(total: int, n429: int, n503: int) -> dict:
    return {"shed_share": (n429 + n503) / total if total else 0.0, "share_429": n429 / total if total else 0.0,
            "share_503": n503 / total if total else 0.0}


# the py client's own process ------------------------------------------------------------------

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, float | None]:
    """One HTTP/1.1 response: (status, server closes the connection, Retry-After seconds or None). The body is
    read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for ln in lines[1:]:
        key, _, value = ln.partition(":")
        headers[key.strip().lower()] = value.strip().lower()
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    retry = headers.get("retry-after")
    return status, headers.get("connection") == "close", float(retry) if retry and retry.isdigit() else None


async def _client(a: dict) -> dict:
    parts = urlsplit(a["url"])
    host, port = parts.hostname, parts.port or 80
    rng = random.Random(a["seed"])
    texts, adapters = a["texts"], a["adapters"]
    status: list[int] = []
    lat: list[float] = []
    sent: list[float] = []
    kind: list[int] = []  # 0: one of the `conc` clients, 1: a reconnecting one
    retries: list[float] = []  # Retry-After of each refusal to the `conc` clients that had one, in order
    t_start = time.perf_counter()

    def request() -> bytes:
        adapter = rng.choice(adapters)
        body = json.dumps({"model": adapter, "input": rng.choice(texts)}).encode()
        extra = f"{MUX_HEADER}: {adapter}\r\n" if a["model_header"] else ""
        return (f"POST {a['prefix']}{rng.choice(ROUTES)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body

    async def connection(reconnects: bool = False):
        writer = None
        try:
            while True:
                if writer is None:
                    try:
                        reader, writer = await asyncio.open_connection(host, port)
                    except OSError:
                        status.append(-1)
                        lat.append(0.0)
                        sent.append(time.perf_counter() - t_start)
                        kind.append(int(reconnects))
                        await asyncio.sleep(0.05)
                        continue
                t = time.perf_counter()
                retry = None
                try:
                    writer.write(request())
                    code, close, retry = await _read_response(reader)
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    code, close = -1, True
                status.append(code)
                lat.append(time.perf_counter() - t)
                sent.append(t - t_start)
                kind.append(int(reconnects))
                if reconnects:  # a new connection for the next request, at once
                    writer.close()
                    writer = None
                    continue
                if code in (429, 503) and retry is not None:
                    retries.append(retry)
                if close:
                    writer.close()
                    writer = None
                if a.get("honour_retry_after") and code in (429, 503) and retry:
                    await asyncio.sleep(retry)  # as the openai client does before retrying
        finally:
            if writer is not None:
                writer.close()

    tasks = [asyncio.ensure_future(connection()) for _ in range(a["conc"])]
    tasks += [asyncio.ensure_future(connection(reconnects=True)) for _ in range(a.get("reconnecting", 0))]
    start = time.perf_counter()
    await asyncio.sleep(a["duration"])
    seconds = time.perf_counter() - start
    n = len(status)  # what completed within the duration
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"status": status[:n], "lat": [round(x, 6) for x in lat[:n]], "sent": [round(x, 4) for x in sent[:n]],
            "kind": kind[:n], "retry_after": retries, "seconds": seconds}


def _client_main() -> None:
    import os

    try:
        from uvloop import run  # a cheaper event loop, where installed
    except ImportError:
        run = asyncio.run
    out = run(_client(json.loads(sys.stdin.read())))
    t = os.times()
    out["cpu_s"] = t.user + t.system
    print("PYJSON " + json.dumps(out))


if __name__ == "__main__":
    _client_main()
