"""Prometheus metrics, the one way every dheads job exports them (prometheus-client).

Metrics are `dheads_<name>` collectors on a registry: the process-wide
`REGISTRY` (not the client's global default, so importing this module never
collides with a library's own collectors) unless a job passes its own (a
batch job that reports one run's totals). `gauge` / `counter` / `histogram`
return the same collector for the same name and registry. A registry leaves
the process one of three ways, by the kind of job:

- `render()`: the text format, for an HTTP handler (the Serve ingress's
  `/metrics`) or a file beside a batch job's output;
- `serve(port)`: an HTTP endpoint for a Prometheus scrape (training: the
  rank-0 worker at `trainer.metrics_port`);
- `push(gateway, job)`: a Pushgateway, for batch jobs that end.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, generate_latest, push_to_gateway, start_http_server,
)

REGISTRY = CollectorRegistry(auto_describe=True)
# the text format `render` writes (prometheus-client's exposition 0.0.4)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_made: "weakref.WeakKeyDictionary[CollectorRegistry, dict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_servers: dict[int, object] = {}


def _collector(kind, name: str, doc: str, labels: tuple[str, ...],
               registry: CollectorRegistry | None, **kw):
    registry = REGISTRY if registry is None else registry
    with _lock:
        made = _made.setdefault(registry, {})
        if name not in made:
            made[name] = kind(f"dheads_{name}", doc, labelnames=labels, registry=registry, **kw)
        return made[name]


def gauge(name: str, doc: str, labels: tuple[str, ...] = (),
          registry: CollectorRegistry | None = None) -> Gauge:
    """The gauge `dheads_<name>`, created on first use."""
    return _collector(Gauge, name, doc, labels, registry)


def counter(name: str, doc: str, labels: tuple[str, ...] = (),
            registry: CollectorRegistry | None = None) -> Counter:
    """The counter `dheads_<name>` (exposed as `dheads_<name>_total`)."""
    return _collector(Counter, name, doc, labels, registry)


def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = (),
              registry: CollectorRegistry | None = None) -> Histogram:
    """The histogram `dheads_<name>` with `buckets`."""
    return _collector(Histogram, name, doc, labels, registry, buckets=buckets)


def render(registry: CollectorRegistry | None = None) -> bytes:
    """The registry in the Prometheus text format (`CONTENT_TYPE`)."""
    return generate_latest(REGISTRY if registry is None else registry)


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


def push(gateway: str, job: str, registry: CollectorRegistry | None = None) -> None:
    """Push the registry to a Prometheus Pushgateway (`host:port`)."""
    push_to_gateway(gateway, job=job, registry=REGISTRY if registry is None else registry)


# --------------------------------------------------------------------- training
TRAINING_FIELDS = {
    "loss": "total training loss (weighted L_simple + L_vlb + L_ls + L_eye), mean over the global batch",
    "loss_simple": "L_simple: epsilon MSE",
    "loss_vlb": "L_vlb: variational bound term (trains the variance)",
    "loss_ls": "L_ls: lip-sync loss, epsilon MSE inside the mouth box",
    "loss_eye": "L_eye: the same inside the eye band (0 without diffusion.lambda_eye)",
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


__all__ = ["REGISTRY", "CONTENT_TYPE", "gauge", "counter", "histogram", "render", "serve", "push",
           "TrainingGauges", "TRAINING_FIELDS"]
