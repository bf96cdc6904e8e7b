"""The local Ray instance dheads starts (`cluster.connect`) listens on
loopback only: every TCP/UDP socket any of its processes has bound."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Starts Ray exactly as the jobs do, runs one task (a worker process with its
# own gRPC server), then waits for the test to finish looking.
_DRIVER = """
import sys, ray
from dheads.platform.cluster import connect
from dheads.platform.config import ClusterConfig
connect(ClusterConfig(num_cpus=1))
assert ray.get(ray.remote(lambda: 1).remote()) == 1
print("ready", flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def _socket_inodes(pids: set[int]) -> dict[str, int]:
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    return inodes


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc prints IPv6 as four little-endian 32-bit words
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def bound_sockets(pids: set[int]) -> list[tuple[str, str, int, int]]:
    """(proto, address, port, pid) of every listening TCP socket and every
    bound UDP socket owned by `pids` (from /proc/net, no extra tools)."""
    inodes = _socket_inodes(pids)
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path("/proc/net", proto).read_text().splitlines()[1:]
        for line in lines:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if inode not in inodes or (proto.startswith("tcp") and state != "0A"):  # 0A: LISTEN
                continue
            addr, port = local.split(":")
            out.append((proto, str(_address(addr)), int(port, 16), inodes[inode]))
    return out


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc/net")
def test_local_ray_listens_on_loopback_only():
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # Agents bind their ports while starting; look until the set is stable.
        seen: set[tuple[str, str, int, int]] = set()
        stable = 0
        for _ in range(60):
            now = set(bound_sockets(_descendants(proc.pid)))
            stable = stable + 1 if now <= seen else 0
            seen |= now
            if stable >= 3:
                break
            time.sleep(0.5)
        ports = {p for _, _, p, _ in seen}
        assert len(ports) >= 6, f"expected GCS, raylet, dashboard, agents, workers: {sorted(seen)}"
        exposed = sorted(s for s in seen if not _is_loopback(s[1]))
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
