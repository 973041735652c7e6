"""`make serve` exposes nothing beyond 127.0.0.1: every listening socket of its Ray processes is loopback.

An open Ray port (dashboard, job API, GCS/raylet/worker gRPC) runs arbitrary code (CVE-2023-48022).
This starts the server exactly as `make serve` does (`python -m serving.cli serve --config ...`, with
deploy/serve_config.yaml on a free port), reads the listening TCP sockets of the whole process tree from
/proc (Linux), then stops it with SIGINT (Ctrl-C) and checks that Ray's processes went with it.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving.app import free_port

ROOT = Path(__file__).resolve().parents[2]
TCP_LISTEN = "0A"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from Linux /proc")]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the command name may hold spaces
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[len("socket:["):-1]))
    return found


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)  # /proc stores each 32-bit word in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket in this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != TCP_LISTEN:
                continue
            addr, port = fields[1].split(":")
            out[int(fields[9])] = (str(_address(addr)), int(port, 16))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1, an IPv4 loopback bind on a dual-stack socket
    return ip.is_loopback


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:120]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _serve_config(tmp_path: Path, port: int) -> Path:
    """deploy/serve_config.yaml on a free port, its adapter paths made absolute, a small replica."""
    deploy = ROOT / "deploy"
    raw = yaml.safe_load((deploy / "serve_config.yaml").read_text())
    raw["http_options"]["port"] = port
    args = raw["applications"][0]["args"]
    args.update(port=port, num_threads=1, num_cpus=1)
    args["adapters"] = {name: str((deploy / path).resolve()) for name, path in (args.get("adapters") or {}).items()}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_make_serve_listens_on_loopback_only_and_stops_with_ray(tmp_path):
    port = free_port()
    proc = _start_serving(_serve_config(tmp_path, port), tmp_path, "serve.log")
    tree: list[int] = []
    try:
        _wait_ready(proc, port, tmp_path / "serve.log", 240)

        tree = process_tree(proc.pid)
        sockets = listening_sockets()
        seen, public, owner = [], [], {}
        for pid in tree:
            for inode in _socket_inodes(pid):
                if inode in sockets:
                    addr, sport = sockets[inode]
                    seen.append((addr, sport))
                    owner[sport] = _command(pid)
                    if not is_loopback(addr):
                        public.append(f"{addr}:{sport} pid {pid} {_command(pid)}")
        commands = " ".join(_command(pid) for pid in tree)
        assert "gcs_server" in commands and "raylet" in commands, f"Ray's processes not found under {proc.pid}"
        assert ("127.0.0.1", port) in seen, f"the HTTP port {port} is not among the sockets found: {seen}"
        # direct ingress (ServeConfig.direct_ingress): the Ingress replica itself listens there, not Serve's proxy
        assert "ServeReplica:polyhead:Ingress" in owner[port], owner[port]
        assert len(seen) >= 6, f"too few listening sockets found to mean anything: {seen}"
        assert not public, "Ray listens beyond loopback:\n  " + "\n  ".join(public)

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0, _tail(tmp_path)
        assert "polyhead: shutting down" in (tmp_path / "serve.log").read_text()  # Ray's own shutdown logs follow
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [f"{pid} {_command(pid)}" for pid in tree if _alive(pid)]
        assert not left, "still running after Ctrl-C:\n  " + "\n  ".join(left)
    finally:
        if proc.poll() is None:  # a failure above: end what this test started, and only that
            names = {pid: _command(pid) for pid in tree or process_tree(proc.pid)}
            for pid, name in names.items():
                if _alive(pid) and _command(pid) == name:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            proc.wait(timeout=30)


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text()[-3000:]


def _start_serving(config: Path, tmp_path: Path, log_name: str) -> subprocess.Popen:
    """`polyhead serve` as `make serve` runs it, its output into tmp_path / log_name."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with (tmp_path / log_name).open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config", str(config)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, seconds: float) -> float:
    """Seconds until GET /ready answers 200."""
    start = time.monotonic()
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        assert time.monotonic() - start < seconds, f"/ready not 200 within {seconds} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            for pid in process_tree(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.wait(timeout=30)


def _connected_clients(port: int, n: int = 4) -> list[httpx.Client]:
    """Clients with a kept-alive connection each: the server closes them first when it goes."""
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) for _ in range(n)]
    for client in clients:
        assert client.get("/health").status_code == 200
    return clients


def test_make_serve_survives_its_ingress_replica_being_killed_and_starts_again_at_once_after_ctrl_c(tmp_path):
    """Direct ingress binds its port without SO_REUSEADDR in Ray: with clients connected, an ingress replica
    killed (OOM killer, a crash) was never replaced (the port, in TIME_WAIT, was blocked for good), and
    `make serve` started again right after Ctrl-C failed to deploy. Both now come back on the same port."""
    port = free_port()
    config = _serve_config(tmp_path, port)
    proc = _start_serving(config, tmp_path, "first.log")
    try:
        _wait_ready(proc, port, tmp_path / "first.log", 240)
        clients = _connected_clients(port)
        ingress = [pid for pid in process_tree(proc.pid) if "ServeReplica:polyhead:Ingress" in _command(pid)]
        assert len(ingress) == 1, [_command(pid) for pid in process_tree(proc.pid)]
        os.kill(ingress[0], signal.SIGKILL)
        back = _wait_ready(proc, port, tmp_path / "first.log", 120)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "sentiment", "input": "lovely"})
        assert r.status_code == 200 and r.json()["data"][0]["label"] == "positive", r.text
        clients += _connected_clients(port)
        _stop(proc)
        assert proc.returncode == 0
        for client in clients:
            client.close()
        again = _start_serving(config, tmp_path, "second.log")  # at once: the port's old connections linger
        try:
            _wait_ready(again, port, tmp_path / "second.log", 240)
        finally:
            _stop(again)
        assert again.returncode == 0
        print(f"ingress replica replaced, /ready again after {back:.1f} s")
    finally:
        _stop(proc)
