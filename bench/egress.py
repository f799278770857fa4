"""The egress gateway's cost: what a tunnel through it adds to a direct TCP connection, in the same run.

On loopback, three processes: a TCP server (greets each connection with one byte, then sends or swallows
bulk data), the real gateway (`tests.support.egress_stand`, one VM socket, a user on the direct route), and
this client. Measured, each gateway sample interleaved with a direct one so both see the same load:

- connection set-up: CONNECT on the VM's socket, the 200, and the server's first byte through the tunnel,
  vs a plain TCP connect and the first byte (target: ≤ 2 ms added at p50);
- bulk throughput of one tunnel, server → client (download) and client → server (upload), vs the same
  over a direct connection (targets: ≥ 50 % of direct, ≥ 200 MB/s).

    .venv/bin/python bench/egress.py [--connects 2000] [--gib 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polydev.vm.forwards import RELAY_SNDBUF

SERVER = r"""
import socket, sys, threading
BUF = memoryview(bytes(4 * 1024 * 1024))
def serve(c):
    try:
        c.sendall(b"!")
        cmd = b""  # "down N" or "up N", 32 bytes; or nothing (a set-up sample closes at once)
        while len(cmd) < 32 and (part := c.recv(32 - len(cmd))):
            cmd += part
        cmd = cmd.decode().strip()
        if cmd.startswith("down "):
            n = int(cmd.split()[1])
            while n > 0:
                k = min(n, len(BUF)); c.sendall(BUF[:k]); n -= k
        elif cmd.startswith("up "):
            n, got, sink = int(cmd.split()[1]), 0, bytearray(4 * 1024 * 1024)
            while got < n:
                k = c.recv_into(sink)
                if not k: break
                got += k
            c.sendall(b"done")
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(512)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def open_direct(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert recv_exact(sock, 1) == b"!"
    return sock


def open_tunnel(path: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RELAY_SNDBUF)  # as the VM's relay (socat) sets it
    sock.connect(path)
    sock.sendall(f"CONNECT bench.test:{port} HTTP/1.1\r\nHost: bench.test:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"gateway closed: {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    rest = head.partition(b"\r\n\r\n")[2]
    if not rest:
        rest = recv_exact(sock, 1)
    assert rest == b"!", rest
    return sock


def setup_samples(n: int, path: str, port: int) -> tuple[list[float], list[float]]:
    direct, gateway = [], []
    for i in range(n):
        for kind in ((0, 1) if i % 2 else (1, 0)):  # alternate which goes first
            t0 = time.perf_counter()
            sock = open_tunnel(path, port) if kind else open_direct(port)
            (gateway if kind else direct).append(time.perf_counter() - t0)
            sock.close()
    return direct, gateway


def bulk(sock: socket.socket, direction: str, nbytes: int) -> float:
    """Seconds to move `nbytes` over `sock` in `direction`, until the last byte is known to have arrived."""
    buf = bytearray(4 * 1024 * 1024)
    t0 = time.perf_counter()
    sock.sendall(f"{direction} {nbytes}".encode().ljust(32))
    if direction == "down":
        got = 0
        while got < nbytes:
            k = sock.recv_into(buf)
            if not k:
                raise ConnectionError(f"closed after {got} bytes")
            got += k
    else:
        view, left = memoryview(bytes(4 * 1024 * 1024)), nbytes
        while left > 0:
            k = min(left, len(view))
            sock.sendall(view[:k])
            left -= k
        assert recv_exact(sock, 4) == b"done"
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connects", type=int, default=2000, help="set-up samples of each kind")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB per bulk transfer")
    ap.add_argument("--rounds", type=int, default=3, help="bulk transfers of each kind and direction")
    args = ap.parse_args()
    nbytes = int(args.gib * 1024**3)

    procs: list[subprocess.Popen[str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    try:
        server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
        procs.append(server)
        assert server.stdout is not None
        port = int(server.stdout.readline())
        user, vm = str(uuid.uuid4()), str(uuid.uuid4())
        config = {"run_dir": str(tmp / "run"), "ports": [port], "hosts": {"bench.test": ["127.0.0.1"]},
                  "allow": {"claude_code run": ["bench.test"]},
                  "users": {user: {"mode": "direct", "limits": {"bytes_per_day": 1 << 60, "per_minute": 1 << 30,
                                                                 "concurrent": 1 << 20}}},
                  "vms": [{"vm_id": vm, "user_id": user, "purpose": "run", "provider": "claude_code"}]}
        (tmp / "config.json").write_text(json.dumps(config))
        gw = subprocess.Popen([sys.executable, "-m", "tests.support.egress_stand", str(tmp / "config.json")],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(gw)
        assert gw.stdout is not None
        path = gw.stdout.readline().split()[2]
        assert gw.stdout.readline().strip() == "ready"

        print(f"egress bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
        setup_samples(100, path, port)  # warm-up
        direct, gateway = setup_samples(args.connects, path, port)
        ms = {k: [v * 1000 for v in vals] for k, vals in (("direct", direct), ("gateway", gateway))}
        print(f"\nconnection set-up, {args.connects} of each, interleaved:")
        for k in ("direct", "gateway"):
            print(f"  {k:8} p50 {pct(ms[k], .5):6.3f} ms   p99 {pct(ms[k], .99):6.3f} ms")
        added = pct(ms["gateway"], .5) - pct(ms["direct"], .5)
        print(f"  added at p50: {added:.3f} ms (target <= 2 ms); "
              f"gateway/direct p50 ratio {pct(ms['gateway'], .5) / pct(ms['direct'], .5):.2f}x")

        print(f"\nbulk, one connection, {args.gib:g} GiB each, {args.rounds} rounds interleaved (median):")
        for direction in ("down", "up"):
            rates: dict[str, list[float]] = {"direct": [], "gateway": []}
            gw_cpu = 0.0
            for _ in range(args.rounds):
                for kind in ("direct", "gateway"):
                    sock = open_tunnel(path, port) if kind == "gateway" else open_direct(port)
                    cpu0 = cpu_seconds(gw.pid)
                    rates[kind].append(nbytes / bulk(sock, direction, nbytes) / 1e6)
                    gw_cpu += cpu_seconds(gw.pid) - cpu0 if kind == "gateway" else 0.0
                    sock.close()
            d, g = statistics.median(rates["direct"]), statistics.median(rates["gateway"])
            print(f"  {direction:4}  direct {d:7.0f} MB/s   gateway {g:7.0f} MB/s   "
                  f"ratio {g / d:.2f} (targets >= 0.50 and >= 200 MB/s); "
                  f"gateway CPU {gw_cpu / (args.rounds * args.gib):.2f} s/GiB")
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
