"""Prometheus metrics shared by the jobs (prometheus-client).

One process-wide `REGISTRY` (not the client's global default, so importing
this module never collides with a library's own collectors). Jobs create
their gauges through `gauge()`, which returns the same gauge for the same
name, then either expose the registry over HTTP (`serve`, for a Prometheus
scrape) or push it to a Pushgateway (`push`, for batch jobs that end). On a
Ray cluster, training is scraped from the rank-0 worker at
`trainer.metrics_port`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
_gauges: dict[str, Gauge] = {}
_lock = threading.Lock()
_servers: dict[int, object] = {}


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    """The gauge `dheads_<name>` of `REGISTRY`, created on first use."""
    with _lock:
        if name not in _gauges:
            _gauges[name] = Gauge(f"dheads_{name}", doc, labelnames=labels, registry=REGISTRY)
        return _gauges[name]


def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Expose `REGISTRY` at http://addr:port/metrics (once per port; 0 picks a
    free port). Returns the port it listens on."""
    with _lock:
        if port and port in _servers:
            return port
        server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
        bound = server.server_port
        _servers[bound] = server
        return bound


def push(gateway: str, job: str) -> None:
    """Push `REGISTRY` to a Prometheus Pushgateway (`host:port`)."""
    push_to_gateway(gateway, job=job, registry=REGISTRY)


# --------------------------------------------------------------------- training
TRAINING_FIELDS = {
    "loss": "total training loss (weighted L_simple + L_vlb + L_ls), mean over the global batch",
    "loss_simple": "L_simple: epsilon MSE",
    "loss_vlb": "L_vlb: variational bound term (trains the variance)",
    "loss_ls": "L_ls: lip-sync loss, epsilon MSE inside the mouth box",
    "grad_norm": "global gradient norm before clipping",
    "lr": "learning rate",
    "samples_per_s": "training samples per second, all workers",
    "mfu": "model FLOPs utilisation: 3 x forward FLOPs x samples/s / (workers x device peak)",
    "step": "optimizer steps done",
}


@dataclass
class TrainingGauges:
    """The per-step training gauges, labelled by run name."""
    run: str

    def __post_init__(self) -> None:
        self._gauges = {k: gauge(f"train_{k}", doc, ("run",)) for k, doc in TRAINING_FIELDS.items()}

    def update(self, values: dict[str, float]) -> None:
        for k, g in self._gauges.items():
            if k in values:
                g.labels(run=self.run).set(float(values[k]))


def exposition() -> str:
    """The registry in Prometheus text format (for tests and debugging)."""
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY).decode()


__all__ = ["REGISTRY", "gauge", "serve", "push", "TrainingGauges", "TRAINING_FIELDS",
           "exposition"]
