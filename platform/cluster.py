"""Connecting to Ray: join the configured cluster or start a local instance."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

from dheads.platform.config import ClusterConfig, StorageConfig
from dheads.platform.storage import s3_env

LOOPBACK = "127.0.0.1"


def connect(cluster: ClusterConfig, storage: StorageConfig | None = None,
            min_cpus: float = 0) -> None:
    """Initialise Ray once per process.

    - already initialised (tests, notebooks, a job calling another): reuse it;
    - `cluster.address` set (or RAY_ADDRESS in the env): join that cluster;
    - otherwise start a local instance on this machine, with at least
      `min_cpus` logical CPUs: a job that pins one CPU per training worker
      also needs room for its Ray Data tasks, or it waits forever on a
      2-core laptop (Ray's CPU resource is logical; oversubscribing it only
      lets the OS share the cores).
    S3 endpoint and credentials travel to the workers through the runtime env.

    A local instance listens on 127.0.0.1 only (see `_loopback_node`); Ray's
    token auth (on by default for local instances since Ray 2.59) stays on.
    """
    import ray

    if ray.is_initialized():
        return
    env_vars = s3_env(storage) if storage else {}
    kwargs: dict = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    num_cpus = cluster.num_cpus or max(os.cpu_count() or 1, int(math.ceil(min_cpus)))
    # The dashboard serves Ray's state API (Ray Train polls it) and the Job
    # Submission API; like every other port of the instance it binds 127.0.0.1.
    with _loopback_node():
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK,
                 _node_ip_address=LOOPBACK, **kwargs)


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Make the local node's IP 127.0.0.1, so that nothing it starts listens
    beyond this machine.

    Measured with Ray 2.60 on Linux (`ss -ltnp` after `ray.init`): with the
    node IP left to Ray, the GCS, raylet, object manager, core workers and
    dashboard agent gRPC servers listen on `*`, and the autoscaler, dashboard
    and node metrics exporters (prometheus_client) on 0.0.0.0. Ray binds all
    of them to loopback when the node IP is loopback, but `ray.init` turns
    `_node_ip_address="127.0.0.1"` into the machine's outward IP
    (`services.resolve_ip_for_localhost`) unless
    `ray_constants.ENABLE_RAY_CLUSTER` is false — Ray's own "local Ray only"
    switch (env `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, read once at import; false
    on macOS and Windows). It is only consulted while the node starts: set it
    for `ray.init` and put it back.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
