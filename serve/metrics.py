"""Prometheus metrics of the job service, on the ingress process's registry
(`dheads.platform.metrics`), served at `/metrics`.

Each ingress replica counts what it did (the jobs it accepted, the items it
ran) and `/metrics` answers from whichever replica Serve routes the scrape
to; `dheads_ingress_info{replica=...}` names it. With
`serve.ingress_replicas` > 1, sum over replicas: scrape each one (e.g. a
Prometheus job per replica pod), not the load-balanced URL alone."""
from __future__ import annotations

from dheads.platform import metrics as prom

CONTENT_TYPE = prom.CONTENT_TYPE


class ServeMetrics:
    def __init__(self, replica: str = ""):
        self.info = prom.gauge("ingress_info", "This ingress replica (1)", ("replica",))
        self.info.labels(replica=replica or "local").set(1)
        self.jobs_submitted = prom.counter("jobs_submitted", "Jobs accepted")
        self.jobs_finished = prom.counter("jobs_finished", "Jobs whose items all succeeded")
        self.jobs_failed = prom.counter("jobs_failed", "Jobs finished with failed items")
        self.items = prom.counter("items", "Items by final status", ("status",))
        self.segments = prom.counter("segments_generated", "Segments generated")
        self.frames = prom.counter("frames_generated", "Video frames generated")
        self.queue_depth = prom.gauge("queue_depth", "Segments sent to model replicas and not back yet")
        self.batch_size = prom.histogram("batch_size", "Segments per batched UNet call",
                                         (1, 2, 4, 8, 12, 16, 24, 32, 64))
        self.segment_latency = prom.histogram(
            "segment_latency_seconds", "Segment request to frames",
            (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))

    def render(self) -> bytes:
        return prom.render()
