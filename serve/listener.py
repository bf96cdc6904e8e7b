"""The upload listener: the ingress replica's own HTTP server for job submissions.

Ray Serve's HTTP path has no request-body backpressure: its proxy drains
the client's socket into an unbounded queue (`ray/serve/_private/proxy.py`
`proxy_asgi_receive` -> `MessageQueue`) and the replica pulls everything
queued into another (`http_util.py::ASGIReceiveProxy`, likewise
`direct_ingress_http_util.py` for Serve's experimental direct ingress). A
fast client could put most of an upload in memory at once, whatever
dheads' parser does with it.

So every ingress replica also serves `POST /v1/jobs` (multipart uploads and
JSON jobs, the same handler, token and limits as the Serve route) and
`GET /healthz` on `serve.host:serve.upload_port` with uvicorn directly,
at most `serve.max_upload_connections` requests at once (503 past it).
uvicorn stops reading the socket while more than 64 KB of body wait for the
handler (`uvicorn/protocols/http/flow_control.py`), so TCP holds the rest on
the client: an upload costs the ingress about one chunk of memory, however
big it is (`bench/upload_memory.py`). Several replicas on one node share the
port (SO_REUSEPORT: the kernel spreads connections).

The Serve route refuses multipart bodies before reading them (HTTP 421,
naming this port) while the listener runs.

Slow clients cannot hold a slot: a connection whose request headers are not
complete `header_timeout_s` after it opened (or after its last response) is
closed, and so is one whose body stalls, no byte for `body_timeout_s` while
the handler waits for it (time the handler itself spends, with bytes
buffered for it or reading paused by flow control, does not count).
"""
# no `from __future__ import annotations`: FastAPI must see `Request` as a type

import asyncio
import logging
import socket
from typing import Awaitable, Callable, Optional

from fastapi import FastAPI, Request

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable]


def timed_protocol(header_timeout_s: float, body_timeout_s: float):
    """uvicorn's h11 protocol with the header and body read timeouts above."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's headers are timed again (keep-alive)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            waiting_headers = self.cycle is None or self.cycle.response_complete
            self._timer = self.loop.call_later(header_timeout_s if waiting_headers else body_timeout_s,
                                               self._expire)

        def _expire(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                log.info("upload listener: closing a connection without request headers after %s s",
                         header_timeout_s)
                self.transport.close()
            elif (cycle.more_body and not cycle.response_started and not cycle.message_event.is_set()
                  and not self.flow.read_paused):
                log.info("upload listener: closing a request whose body stalled for %s s", body_timeout_s)
                cycle.disconnected = True
                cycle.message_event.set()  # the handler's receive() sees the disconnect
                self.transport.close()
            else:  # the handler has bytes to read, or is answering: not the client's stall
                self._arm()

    return TimedH11Protocol


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other replicas on this host may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"upload listener: cannot listen on {host}:{port} "
                               f"(serve.upload_port; null turns the listener off): {e.strerror}") from e
    return sock


class UploadListener:
    """uvicorn on an already bound socket, in the caller's event loop."""

    def __init__(self, submit: Handler, healthz: Handler, host: str, port: int, response_model=None,
                 max_connections: int = 32, header_timeout_s: float = 10.0, body_timeout_s: float = 30.0):
        import uvicorn

        app = FastAPI(title="dheads uploads", docs_url=None, redoc_url=None, openapi_url=None)

        @app.post("/v1/jobs", status_code=202, response_model=response_model)
        async def _submit(request: Request):
            return await submit(request)

        @app.get("/healthz")
        async def _healthz():
            return await healthz()

        self.host, self.sock = host, bind(host, port)
        self.port = self.sock.getsockname()[1]
        # log_config=None: leave the replica's logging (Ray's) as it is. uvicorn answers
        # 503 once its open connections, the new one included, reach limit_concurrency.
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                timeout_keep_alive=5, server_header=False,
                                http=timed_protocol(header_timeout_s, body_timeout_s),
                                limit_concurrency=max_connections + 1)
        self.server = uvicorn.Server(config)
        self.task: Optional[asyncio.Task] = None

    def start(self) -> "UploadListener":
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        self.task.add_done_callback(self._done)
        return self

    def _done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("upload listener on %s:%s stopped: %r", self.host, self.port, task.exception())

    def stop(self) -> None:
        """Ask uvicorn to finish (it closes the socket itself); thread-safe."""
        self.server.should_exit = True


__all__ = ["UploadListener", "bind"]
