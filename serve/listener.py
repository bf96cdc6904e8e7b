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
"""
# no `from __future__ import annotations`: FastAPI must see `Request` as a type

import asyncio
import logging
import socket
from typing import Awaitable, Callable, Optional

from fastapi import FastAPI, Request

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable]


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
                 max_connections: int = 32):
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
