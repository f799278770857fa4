"""One CONNECT through the egress gateway from inside a guest (a VM's python3, or a namespace playing one).

`python3 -c CONNECT_PROBE ADDRESS PORT HOST:PORT` prints the answer's status line, with the gateway's reason
(its `X-Polydev-Egress` header) after ` | ` when it gave one; when the tunnel opened, a second line with
what the far end answered to `ping from the guest`. A connection that fails prints `fail <error>`.
"""

PING = b"ping from the guest\n"

CONNECT_PROBE = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.sendall(f"CONNECT {sys.argv[3]} HTTP/1.1\r\nHost: {sys.argv[3]}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    lines = head.decode("latin-1").split("\r\n")
    reason = [l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("x-polydev-egress:")]
    print(lines[0] + (" | " + reason[0] if reason else ""))
    if lines[0].startswith("HTTP/1.1 200"):
        s.sendall(b"ping from the guest\n")
        print(s.recv(100).decode().strip())
except OSError as e:
    print("fail", type(e).__name__)
"""
