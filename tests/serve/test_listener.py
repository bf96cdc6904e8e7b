"""The upload listener on its own (no Ray): it reads a body only as fast as
the handler takes it, and caps the requests open at once."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from dheads.serve.listener import UploadListener

MB = 1 << 20


class Running:
    """An UploadListener in a thread's event loop, with a handler that waits
    for `release` before it reads the body."""

    def __init__(self, port: int, max_connections: int = 32, **timeouts):
        self.release, self.read = threading.Event(), [0]
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def submit(request):
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait)
            async for chunk in request.stream():
                self.read[0] += len(chunk)
            return {"job_id": "j", "status": "queued", "items": self.read[0]}

        async def healthz():
            return {"status": "ok"}

        async def main():
            self.listener = UploadListener(submit, healthz, "127.0.0.1", port,
                                           max_connections=max_connections, **timeouts).start()
            started.set()
            while not self.listener.server.should_exit:
                await asyncio.sleep(0.05)
            await self.listener.task

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert started.wait(30)
        deadline = time.time() + 30
        while not self.listener.server.started and time.time() < deadline:
            time.sleep(0.05)

    def stop(self):
        self.release.set()
        self.listener.stop()
        self.thread.join(30)


def _open_post(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    return sock


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def listener(free_port):
    running = Running(free_port(), max_connections=2)
    yield running
    running.stop()


def test_a_body_is_read_only_as_fast_as_the_handler_takes_it(listener):
    sock = _open_post(listener.listener.port)
    sock.settimeout(2.0)
    piece, sent = b"%x\r\n%s\r\n" % (MB, b"\0" * MB), 0
    try:
        for _ in range(512):                    # up to 512 MB, while the handler reads nothing
            sock.sendall(piece)
            sent += MB
    except socket.timeout:
        pass                                    # TCP pushed back: the server stopped reading
    # a reader without backpressure (Serve's proxy) would take all 512 MB; here the
    # socket buffers and one high-water mark of uvicorn's (64 KB) fill, then it stalls
    assert sent < 64 * MB, sent
    assert listener.read[0] == 0
    sock.close()


def test_requests_past_the_cap_get_503(listener):
    held = [_open_post(listener.listener.port) for _ in range(2)]   # the cap: 2 open at once
    for s in held:
        s.sendall(b"1\r\nx\r\n")
    connections = listener.listener.server.server_state.connections
    deadline = time.time() + 30
    while len(connections) < 2 and time.time() < deadline:   # both counted by the server
        time.sleep(0.01)
    extra = _open_post(listener.listener.port)
    extra.sendall(b"0\r\n\r\n")
    assert _answer(extra).startswith(b"HTTP/1.1 503"), "a third request at once was not refused"
    extra.close()
    listener.release.set()
    for s in held:
        s.sendall(b"0\r\n\r\n")
        assert _answer(s).startswith(b"HTTP/1.1 202")
        s.close()
    with socket.create_connection(("127.0.0.1", listener.listener.port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(s).startswith(b"HTTP/1.1 200")              # free again once they finished


def _closed_by_server(sock: socket.socket, within: float = 30.0) -> bool:
    """True when the server closes `sock` (EOF or reset) within `within` s."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_slow_clients_are_closed_and_free_their_slots(free_port):
    running = Running(free_port(), max_connections=2, header_timeout_s=1.0, body_timeout_s=1.0)
    running.release.set()                                   # the handler reads at once
    port = running.listener.port
    try:
        silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        header = socket.create_connection(("127.0.0.1", port), timeout=30)
        header.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Len")   # stops mid-header
        for s in silent + [header]:                         # max + 1 silent sockets and a stalled header
            assert _closed_by_server(s), "a stalled connection stayed open"
            s.close()
        body = socket.create_connection(("127.0.0.1", port), timeout=30)
        body.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        assert _closed_by_server(body), "a stalled body stayed open"
        body.close()
        assert running.read[0] == 10                        # the handler got the 10 bytes, then the stall ended it
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert _answer(s).startswith(b"HTTP/1.1 202")    # a real request still gets in
    finally:
        running.stop()


def test_bytes_after_the_closing_boundary_count_against_the_limit():
    from dheads.serve import limits

    def body(trailer: bytes) -> list[bytes]:
        parts = b"".join(b"--B\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n\r\n%s\r\n"
                         % (n, f, d) for n, f, d in ((b"identity", b"i.png", b"png"), (b"audio", b"a.wav", b"wav")))
        return [parts + b"--B--\r\n"] + [trailer[i:i + MB] for i in range(0, len(trailer), MB)]

    async def read(chunks):
        async def stream():
            for c in chunks:
                yield c
        return await limits.read_uploads(stream(), "multipart/form-data; boundary=B", max_file_bytes=MB)

    ok = asyncio.run(read(body(b"x" * 1000)))            # a little epilogue is harmless
    assert {n: u.size for n, u in ok.files.items()} == {"identity": 3, "audio": 3}
    ok.cleanup()
    with pytest.raises(limits.BodyTooLarge, match="multipart body is over"):
        asyncio.run(read(body(b"x" * (8 * MB))))          # 8 MB after the end: stopped at the limit
