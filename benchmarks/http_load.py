#!/usr/bin/env python
"""An HTTP/1.1 load generator for the serving benchmarks, in the manner of wrk: one thread, several keep-alive
connections, one request in flight on each; the request's bytes are built once, answers are read by their
Content-Length. Eight client threads of http.client in one process spend most of a request's time fighting
over the GIL on a 2-CPU machine (their latency spread is the client's own); this client costs a few tens of
microseconds a request and leaves the CPUs to the server being measured.

    python benchmarks/http_load.py --serve-fixed PORT

serves the smallest valid answer to every request (an asyncio protocol, as our REST port's): a round trip with
nothing behind it, the floor any Python HTTP server on this machine starts from.
"""
from __future__ import annotations

import selectors
import socket
import sys
import time

HOST = "127.0.0.1"


def request_bytes(port: int, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), HOST.encode(), port, content_type.encode(), len(body))) + body


class AnswerError(Exception):
    """An answer this client cannot read (chunked, no Content-Length, a closed connection)."""


def split_answer(buf: bytes) -> tuple[tuple[int, bool, bytes] | None, bytes]:
    """((status, close after, body), the bytes after it) for the first whole answer in `buf`, else (None, buf)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None, buf
    head = buf[:end].split(b"\r\n")
    try:
        status = int(head[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise AnswerError(f"not an HTTP status line: {head[0][:80]!r}") from None
    length, close = None, False
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = b"close" in value.lower()
        elif name == b"transfer-encoding":
            raise AnswerError("a chunked answer: this client reads Content-Length answers only")
    if length is None:
        raise AnswerError("an answer without Content-Length")
    start = end + 4
    if len(buf) < start + length:
        return None, buf
    return (status, close, buf[start:start + length]), buf[start + length:]


class _Connection:
    __slots__ = ("sock", "buf", "left", "sent_at")

    def __init__(self, port: int, timeout_s: float):
        self.sock = socket.create_connection((HOST, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.left = 0
        self.sent_at = 0.0


def drive(port: int, request: bytes, clients: int, per_client: int, warmup: int,
          timeout_s: float = 30.0) -> dict:
    """`clients` connections, each sending `warmup` untimed requests and then `per_client` timed ones, one at a
    time; returns n, wall_s (from the first timed send to the last timed answer), lat_ms (of 200 answers),
    errors and note (the first error's words)."""
    out = {"n": clients * per_client, "wall_s": 0.0, "lat_ms": [], "errors": 0, "note": ""}
    conns: list[_Connection] = []
    sel = selectors.DefaultSelector()

    def fail(words: str) -> None:
        out["errors"] += 1
        out["note"] = out["note"] or words[:200]

    def run(phase_requests: int, timed: bool) -> None:
        for c in conns:
            c.left = phase_requests
            if c.left:
                c.sent_at = time.perf_counter()
                c.sock.sendall(request)
        busy = sum(1 for c in conns if c.left)
        deadline = time.monotonic() + timeout_s
        while busy:
            events = sel.select(timeout=1.0)
            if not events and time.monotonic() > deadline:
                raise TimeoutError(f"no answer within {timeout_s:g} s")
            for key, _ in events:
                c = key.data
                chunk = c.sock.recv(65536)
                now = time.perf_counter()
                if not chunk:
                    raise AnswerError("the server closed a connection")
                c.buf += chunk
                while c.left:
                    answer, c.buf = split_answer(c.buf)
                    if answer is None:
                        break
                    status, close, body = answer
                    deadline = time.monotonic() + timeout_s
                    if timed:
                        if status == 200:
                            out["lat_ms"].append((now - c.sent_at) * 1e3)
                        else:
                            fail(f"HTTP {status}: {body[:160].decode(errors='replace')}")
                    if close:
                        raise AnswerError("the server asked to close a keep-alive connection")
                    c.left -= 1
                    if c.left:
                        c.sent_at = time.perf_counter()
                        c.sock.sendall(request)
                    else:
                        busy -= 1

    try:
        for _ in range(clients):
            conns.append(_Connection(port, timeout_s))
            sel.register(conns[-1].sock, selectors.EVENT_READ, conns[-1])
        run(warmup, timed=False)  # all connections warm up side by side
        t0 = time.perf_counter()
        run(per_client, timed=True)
        out["wall_s"] = time.perf_counter() - t0
    except (OSError, AnswerError, TimeoutError) as e:
        out["errors"] = max(out["errors"], out["n"] - len(out["lat_ms"]))
        out["note"] = out["note"] or f"{type(e).__name__}: {e}"[:200]
    finally:
        sel.close()
        for c in conns:
            c.sock.close()
    return out


FIXED_ANSWER = b'{"outputs": [[0.0]]}'


def serve_fixed(port: int) -> None:
    """Answer every request with FIXED_ANSWER (a 200 with Content-Length) on HOST:port until killed."""
    import asyncio
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
              % (len(FIXED_ANSWER), FIXED_ANSWER))

    class Fixed(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buf = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                length = 0
                for line in self.buf[:end].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(self.buf) < end + 4 + length:
                    return
                self.buf = self.buf[end + 4 + length:]
                self.transport.write(answer)

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(Fixed, HOST, port))
    print(f"serving a fixed answer on {HOST}:{port}", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-fixed":
        serve_fixed(int(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} --serve-fixed PORT")
