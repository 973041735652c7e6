"""polyhead on a real three-node Ray cluster (ray.cluster_utils.Cluster on this machine, tests/integration/
cluster_harness.py, in a process of its own): a head with the ingress, the proxy and the adapter store's actor,
and two worker nodes with one model replica each, routed by adapter affinity (one home per adapter), sharing
no filesystem path that polyhead uses (the store is raystore://, each node caches under its own node id).

In order: registrations land in the head's store only and are served on every node through Ray; repeat
requests for an adapter reach its home; base rows spread evenly; a hot adapter spills to the other replica
when its home saturates; a worker node removed under load leaves no request unanswered or lost, the lost
replica's adapters become resident on the survivor, and /metrics sums do not go down.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.app import free_port
from .test_ray_loopback import process_tree

from .conftest import ADMIN_KEY, parse_metrics, total, wait_for, wait_ready

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("cluster_harness.py")
ADAPTERS = ("cls-a", "cls-b", "lazy", "victim")  # classifiers (tests/integration/conftest.py adapter_dirs)
HOT = "late"
TEXTS = ["the cat sat on the mat", "a dull and tiring evening", "polyhead serves many adapters", "short"]


@dataclass
class Harness:
    proc: subprocess.Popen
    lines: queue.Queue
    url: str
    work: Path
    head: str
    workers: list[str]

    def command(self, line: str, timeout: float = 60) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return _next(self, timeout)

    def cache(self, node: str) -> Path:
        """The raystore cache of one node (adapters_store/raystore.py: XDG_CACHE_HOME/polyhead/raystore/<node>)."""
        return self.work / "cache" / "polyhead" / "raystore" / node


def _next(h, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(h.lines.get(timeout=0.5))
        except queue.Empty:
            if h.proc.poll() is not None and h.lines.empty():
                raise AssertionError(f"cluster harness exited ({h.proc.returncode}):\n{_log(h.work)}") from None
    raise AssertionError(f"cluster harness said nothing in {timeout} s:\n{_log(h.work)}")


def _log(work: Path) -> str:
    path = work / "harness.log"
    return path.read_text()[-4000:] if path.exists() else ""


def _read_lines(stream, out: queue.Queue) -> None:
    for line in stream:
        if line.startswith("{"):
            out.put(line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    # every Ray server of the three nodes on 127.0.0.1 only (serving/app/__init__.py start_local_ray says why)
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(ROOT),
               XDG_CACHE_HOME=str(work / "cache"))
    with (work / "harness.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(HARNESS), str(work), str(port), ADMIN_KEY], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    h = Harness(proc, lines, f"http://127.0.0.1:{port}", work, "", [])
    try:
        ready = _next(h, 240)
        assert ready.get("ready"), ready
        h.head, h.workers = ready["head"], ready["workers"]
        wait_ready(h.url, 120)
        yield h
    finally:
        if proc.poll() is None:
            try:
                proc.stdin.write("stop\n")
                proc.stdin.flush()
                proc.wait(timeout=90)
            except (OSError, subprocess.TimeoutExpired):
                for pid in process_tree(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                proc.wait(timeout=30)


def _metrics(h: Harness):
    return parse_metrics(httpx.get(f"{h.url}/metrics", timeout=30).text)


def _metrics_when(h: Harness, ready, timeout: float = 20):
    """/metrics once ready(samples) holds (the replicas push every 0.2 s)."""
    def check():
        m = _metrics(h)
        return m if ready(m) else None
    return wait_for(check, timeout)


def _per_replica(m, name: str) -> dict[str, float]:
    return {dict(labels)["replica"]: v for (n, labels), v in m.items() if n == name}


def _classify(client: httpx.Client, model: str, rows: int = 1) -> httpx.Response:
    return client.post("/v1/classify", json={"model": model, "input": TEXTS[:rows] if rows > 1 else TEXTS[0]})


def test_registrations_land_in_the_heads_store_and_nowhere_else(cluster, adapter_dirs):
    with httpx.Client(base_url=cluster.url, timeout=120, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        for name in (*ADAPTERS, HOT):
            r = c.post("/v1/adapters", json={"name": name, "source": str(adapter_dirs[name])})
            assert r.status_code == 201, r.text
            assert r.json()["version"] == 1
    for name in (*ADAPTERS, HOT):  # committed on the actor's disk (the head's), the marker last
        assert (cluster.work / "store" / name / "1" / "COMMITTED").is_file()
    # each was validated and loaded by one worker's replica, from its own node's cache
    cached = [len(list(cluster.cache(node).glob("*/adapter_model.safetensors"))) for node in cluster.workers]
    assert sum(cached) == len(ADAPTERS) + 1, cached


def test_repeat_requests_for_an_adapter_reach_its_home(cluster):
    with httpx.Client(base_url=cluster.url, timeout=60) as c:
        for name in ADAPTERS * 2:  # warm-up: each adapter finds its home and is loaded there
            assert _classify(c, name).status_code == 200
        wait_for(lambda: total(_metrics(cluster), "polyhead_affinity_routed_total") >= 8)
        before = _metrics(cluster)
        for i in range(48):
            r = _classify(c, ADAPTERS[i % len(ADAPTERS)])
            assert r.status_code == 200, r.text
        after = _metrics_when(cluster, lambda m: total(m, "polyhead_affinity_routed_total")
                              >= total(before, "polyhead_affinity_routed_total") + 48
                              and sum(_per_replica(m, "polyhead_replica_adapter_rows").values())
                              >= sum(_per_replica(before, "polyhead_replica_adapter_rows").values()) + 48)

    def routed(m, outcome):
        return total(m, "polyhead_affinity_routed_total", outcome=outcome)

    hits = routed(after, "hit") - routed(before, "hit")
    misses = sum(routed(after, o) - routed(before, o) for o in ("miss", "spill"))
    assert hits / (hits + misses) > 0.95, (hits, misses)
    # each replica's hit rate over the same requests, 1 - loads / rows, from its own gauges
    rows, loads = ({r: v - _per_replica(before, name).get(r, 0) for r, v in _per_replica(after, name).items()}
                   for name in ("polyhead_replica_adapter_rows", "polyhead_replica_adapter_loads"))
    assert sum(rows.values()) == 48 and sum(loads.values()) <= 1, (rows, loads)
    assert all(1 - loads[r] / rows[r] > 0.95 for r in rows if rows[r] >= 10), (rows, loads)


def test_base_rows_spread_evenly(cluster):
    base = httpx.get(f"{cluster.url}/v1/models", timeout=30).json()["data"][0]["id"]
    before = _per_replica(_metrics(cluster), "polyhead_replica_rows")

    def embed(i):
        with httpx.Client(base_url=cluster.url, timeout=60) as c:
            for j in range(25):
                r = c.post("/v1/embeddings", json={"model": base, "input": TEXTS[(i + j) % len(TEXTS)]})
                assert r.status_code == 200, r.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(embed, range(4)))
    after = _per_replica(_metrics_when(cluster, lambda m: sum(_per_replica(m, "polyhead_replica_rows").values())
                                       >= sum(before.values()) + 100), "polyhead_replica_rows")
    shares = {r: (after[r] - before.get(r, 0)) / 100 for r in after}
    assert len(shares) == 2 and min(shares.values()) >= 0.3, shares


def test_a_hot_adapter_spills_to_the_other_replica_when_its_home_saturates(cluster):
    before = _metrics(cluster)
    homes_before = total(before, "polyhead_adapter_homes", homes="2")

    def hammer(_):
        with httpx.Client(base_url=cluster.url, timeout=60) as c:
            for _ in range(12):
                r = _classify(c, HOT, rows=4)
                assert r.status_code == 200, r.text

    with ThreadPoolExecutor(12) as pool:  # 48 rows at a time against a home saturated at 16 queued
        list(pool.map(hammer, range(12)))
    m = _metrics_when(cluster, lambda m: total(m, "polyhead_adapter_homes", homes="2") > homes_before)
    # sent where it was not resident (its home or the next replica: registration loaded it on either) while the
    # replica holding it was saturated
    moved = sum(total(m, "polyhead_affinity_routed_total", outcome=o) - total(before, "polyhead_affinity_routed_total",
                                                                          outcome=o) for o in ("miss", "spill"))
    assert moved >= 1
    # served on both worker nodes: each fetched the version from the head's store through Ray into its own cache
    sha = json.loads((cluster.work / "store" / HOT / "1" / "polyhead.json").read_text())["sha256"]
    for node in cluster.workers:
        assert (cluster.cache(node) / sha / "adapter_model.safetensors").is_file(), node


def test_a_worker_node_removed_under_load_leaves_every_request_answered(cluster):
    models = (*ADAPTERS, HOT)
    before = _metrics(cluster)
    answers: list[int] = []  # every HTTP answer the clients got, retries included
    finals: list[int] = []  # each request's last answer
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        with httpx.Client(base_url=cluster.url, timeout=60) as c:  # a hang fails the test by timing out
            n = 0
            while not stop.is_set():
                model = models[(i + n) % len(models)]
                n += 1
                for _ in range(30):  # a retrying client: honours Retry-After on a 503
                    r = _classify(c, model)
                    with lock:
                        answers.append(r.status_code)
                    if r.status_code != 503:
                        break
                    assert r.headers.get("retry-after"), r.text
                    time.sleep(min(float(r.headers["retry-after"]), 2))
                with lock:
                    finals.append(r.status_code)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        try:  # the clients stop whatever happens here (a failure must not leave them looping forever)
            time.sleep(2)
            # Ray's remove_node waits for the node's processes: over a minute on a loaded machine
            removed = cluster.command("remove 0", timeout=240)
            assert removed.get("removed") == cluster.workers[0], removed
            time.sleep(8)
        finally:
            stop.set()
        for f in futures:
            f.result()
    assert set(answers) <= {200, 503}, sorted(set(answers))
    assert finals and set(finals) == {200}, [s for s in finals if s != 200][:5]
    extra = [0]  # requests sent below, all answered 200

    def survivor_holds_every_adapter():
        """Every adapter answers (from the survivor), and the router sees each resident on one replica: the lost
        replica's adapters found their new home. Serve notices the lost replica within its health checks."""
        with httpx.Client(base_url=cluster.url, timeout=60) as c:
            for name in models:
                r = _classify(c, name)
                assert r.status_code == 200, r.text
                extra[0] += 1
        m = _metrics(cluster)
        if total(m, "polyhead_adapter_homes", homes="1") >= len(models) and not total(
                m, "polyhead_adapter_homes", homes="2"):
            return m
        return None

    wait_for(survivor_holds_every_adapter, 60, every=1)
    m = _metrics_when(cluster, lambda m: total(m, "polyhead_requests_total", route="classify")
                      >= total(before, "polyhead_requests_total", route="classify") + len(answers) + extra[0])
    # the ingress counted exactly what the clients got, by code
    for code in (200, 503):
        grew = (total(m, "polyhead_requests_total", route="classify", code=str(code))
                - total(before, "polyhead_requests_total", route="classify", code=str(code)))
        assert grew == answers.count(code) + (extra[0] if code == 200 else 0), (code, grew)
    # the lost replica's counts stay in the sums (the hub lives with the ingress on the head)
    for name in ("polyhead_adapter_loads_total", "polyhead_forwards_total", "polyhead_rows_total"):
        assert total(m, name) >= total(before, name), name
    # the lost replica's gauges leave /metrics once it has not reported for its ttl (hub.py: 3 x 5 s heartbeats)
    _metrics_when(cluster, lambda m: len(_per_replica(m, "polyhead_replica_adapter_rows")) == 1, timeout=30)
