"""`polyhead serve --address`: deploy onto a Ray cluster someone started (`ray start --head`), serve through the
cluster's Serve proxy, and on Ctrl-C drain, delete the app and disconnect, leaving the cluster running."""
from __future__ import annotations

import os
import signal
import subprocess
import shutil
import sys
import tempfile
import time

import httpx

from serving.app import free_port
from tests.integration.test_ray_loopback import ROOT, _serve_config, _wait_ready


def test_serve_deploys_onto_a_running_cluster_and_leaves_it_running(tmp_path):
    gcs, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", POLYHEAD_STORE=str(tmp_path / "store"))  # the same in every process
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    short = tempfile.mkdtemp(prefix="ph-", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    with (tmp_path / "head.log").open("w") as out:
        head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=3",
                                 "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                                 f"--temp-dir={short}"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    serve = None
    try:
        address = f"127.0.0.1:{gcs}"
        deadline = time.monotonic() + 120
        while subprocess.run([ray_bin, "status", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        log = tmp_path / "serve.log"
        with log.open("w") as out:
            serve = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config",
                                      str(_serve_config(tmp_path, port)), "--address", address], cwd=ROOT, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(serve, port, log, 240)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "sentiment", "input": "great"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["data"][0]["label"] == "positive", r.text
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=120) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "polyhead: deleting the app from the cluster" in text and "polyhead: stopped" in text
        # the cluster is still up, without the app
        assert subprocess.run([ray_bin, "status", "--address", address], env=env, capture_output=True).returncode == 0
        try:
            httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
            gone = False
        except httpx.HTTPError:
            gone = True
        assert gone or httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 404
    finally:
        for proc in (serve, head):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)
