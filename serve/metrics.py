"""Prometheus metrics of the job service (own registry: one per ingress)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.jobs_submitted = Counter("dheads_jobs_submitted", "Jobs accepted", registry=r)
        self.jobs_finished = Counter("dheads_jobs_finished", "Jobs whose items all succeeded", registry=r)
        self.jobs_failed = Counter("dheads_jobs_failed", "Jobs finished with failed items", registry=r)
        self.items = Counter("dheads_items", "Items by final status", ["status"], registry=r)
        self.segments = Counter("dheads_segments_generated", "Segments generated", registry=r)
        self.frames = Counter("dheads_frames_generated", "Video frames generated", registry=r)
        self.queue_depth = Gauge("dheads_queue_depth", "Segments sent to generators and not back yet",
                                 registry=r)
        self.batch_size = Histogram("dheads_batch_size", "Segments per batched UNet call",
                                    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64), registry=r)
        self.segment_latency = Histogram(
            "dheads_segment_latency_seconds", "Segment request to frames",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
