#!/usr/bin/env python3
"""The floor of a Redis round trip on this machine, under whatever load it carries now.

Usage: redis_probe.py PORT SECONDS [RATE]

Sends PING to the Redis at 127.0.0.1:PORT, one at a time, RATE a second (default 200) for
SECONDS, over one TCP connection (TCP_NODELAY), and prints one JSON object: the count and the
p50, p99 and max round trip in ms (nearest rank). bench/limits.sh runs it beside each Redis run,
so that the limit phase's own p99 (Server-Timing `limit`) can be read against what a bare
round trip to the same Redis costs at the same time. The probe sleeps between pings, so its
figure includes its own wake-up, as the gateway's includes its workers'. Standard library only;
loopback only.
"""
import json
import socket
import sys
import time


def main() -> None:
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 200.0
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ping = b"*1\r\n$4\r\nPING\r\n"
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        s.sendall(ping)
        got = b""
        while not got.endswith(b"\r\n"):
            chunk = s.recv(64)
            if not chunk:
                raise SystemExit("redis closed the connection")
            got += chunk
        lat.append((time.perf_counter() - t) * 1e3)
        time.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t)))
    lat.sort()
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)
    print(json.dumps({"count": len(lat), "p50": pick(0.5), "p99": pick(0.99), "max": round(lat[-1], 3)}))


if __name__ == "__main__":
    main()
