#!/usr/bin/env python3
"""What one `WAIT 1` adds to a write, at the Redis level (scripts/bench-replicas.sh --writes).

Against a master on 127.0.0.1:PORT that has one replica: a 1 KB HSET alone, then HSET + WAIT 1
in one pipeline (as keyfleet sends its writes with --redis-replicas 1), N of each, alternated
over 3 rounds. Sequential: one write at a time, p50 and p99 latency. Back-to-back: N writes
sent at once on one connection, as a worker's tasks share one — a client blocked in WAIT has
its next commands wait, so this is the ceiling of waited writes a second per connection.
Raw RESP over a socket, so it needs nothing but Python. Usage: wait-cost.py PORT [N=5000]
"""
import socket
import statistics
import sys
import time

port = int(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
replies = sock.makefile("rb")


def enc(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def read():
    line = replies.readline()
    if line[:1] == b"$" and int(line[1:]) >= 0:
        replies.read(int(line[1:]) + 2)
    return line


value = b"x" * 1000


def run(wait, sequential):
    cmds = []
    for i in range(n):
        c = enc("HSET", "kfwaitcost:{s}:pairs", "n%d" % i, value)
        if wait:
            c += enc("WAIT", 1, 1000)
        cmds.append(c)
    per = 2 if wait else 1
    if sequential:
        lat = []
        for c in cmds:
            t = time.perf_counter()
            sock.sendall(c)
            for _ in range(per):
                r = read()
            lat.append(time.perf_counter() - t)
            if wait and r != b":1\r\n":
                sys.exit(f"WAIT answered {r!r}: does the master have a replica?")
        return statistics.median(lat) * 1e6, statistics.quantiles(lat, n=100)[98] * 1e6
    t = time.perf_counter()
    sock.sendall(b"".join(cmds))
    for _ in range(n * per):
        read()
    return n / (time.perf_counter() - t)


for rnd in range(3):
    for wait in (False, True):
        p50, p99 = run(wait, True)
        rate = run(wait, False)
        name = "HSET + WAIT 1" if wait else "HSET alone   "
        print(f"round {rnd + 1}, {name}: sequential p50 {p50:.0f} us, p99 {p99:.0f} us; "
              f"back-to-back {rate:.0f} writes/s")
sock.sendall(enc("DEL", "kfwaitcost:{s}:pairs"))
read()
