"""benchmarks/http_load.py, the serving benchmark's load client: it reads answers by their Content-Length,
refuses what it cannot read, counts every answer that is not a 200 as an error and times only the 200s."""
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import http_load  # noqa: E402


def test_answers_are_split_by_their_content_length():
    two = (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
           b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno")
    first, rest = http_load.split_answer(two)
    assert first == (200, False, b"abc")
    second, rest = http_load.split_answer(rest)
    assert second == (404, True, b"no") and rest == b""
    for partial in (two[:10], two[:two.index(b"abc") + 2]):  # the head, or the body, not all there yet
        assert http_load.split_answer(partial) == (None, partial)
    with pytest.raises(http_load.AnswerError, match="chunked"):
        http_load.split_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    with pytest.raises(http_load.AnswerError, match="without Content-Length"):
        http_load.split_answer(b"HTTP/1.1 200 OK\r\n\r\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_fixed_server_is_driven_on_every_connection():
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "http_load.py"), "--serve-fixed", str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert "serving a fixed answer" in server.stdout.readline()
        got = http_load.drive(port, http_load.request_bytes(port, "/v1/models/m:predict", b'{"inputs": [1]}'),
                              clients=3, per_client=7, warmup=2)
        assert got["n"] == 21 and got["errors"] == 0 and len(got["lat_ms"]) == 21, got
        assert got["wall_s"] > 0 and all(x > 0 for x in got["lat_ms"])
    finally:
        server.kill()
        server.wait()


def test_an_answer_that_is_not_a_200_is_an_error_with_its_words():
    """A server that answers 404 to everything: every timed request an error, none timed, the note quoting it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 14\r\n\r\nno such model!"

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer_all, args=(conn,), daemon=True).start()

    def answer_all(conn):
        with conn:
            buf = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:  # bodies are tiny and sent with their head
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    buf = buf[size:]
                    conn.sendall(answer)
    threading.Thread(target=serve, daemon=True).start()
    try:
        got = http_load.drive(port, http_load.request_bytes(port, "/", b"{}"), clients=2, per_client=4, warmup=1)
    finally:
        listener.close()
    assert got["errors"] == 8 and got["lat_ms"] == [] and got["note"] == "HTTP 404: no such model!", got


def test_a_server_that_goes_away_is_an_error_not_a_hang():
    port = _free_port()
    start = time.monotonic()
    got = http_load.drive(port, http_load.request_bytes(port, "/", b"{}"), clients=2, per_client=3, warmup=0,
                          timeout_s=5)
    assert got["errors"] == 6 and "ConnectionRefusedError" in got["note"] and time.monotonic() - start < 5
