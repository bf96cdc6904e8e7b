"""One way to export Prometheus metrics: dheads_* collectors on a registry,
rendered as text (an endpoint or a file), served, or pushed."""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from dheads.platform import metrics


def test_collectors_are_made_once_per_name_and_registry_and_render_as_text():
    reg = CollectorRegistry()
    jobs = metrics.counter("unit_jobs", "Jobs", registry=reg)
    assert metrics.counter("unit_jobs", "Jobs", registry=reg) is jobs
    assert metrics.counter("unit_jobs", "Jobs") is not jobs           # the process registry is another
    jobs.inc(2)
    metrics.histogram("unit_latency_seconds", "Latency", (1, 10), registry=reg).observe(3)
    metrics.gauge("unit_depth", "Depth", ("kind",), registry=reg).labels(kind="a").set(5)
    text = metrics.render(reg).decode()
    assert "dheads_unit_jobs_total 2.0" in text
    assert 'dheads_unit_latency_seconds_bucket{le="10.0"} 1.0' in text
    assert 'dheads_unit_depth{kind="a"} 5.0' in text
    assert "dheads_unit_jobs_total 0.0" in metrics.render().decode()  # counted on `reg` only
