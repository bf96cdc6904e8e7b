"""Connecting to Ray: join the configured cluster or start a local instance."""
from __future__ import annotations

import math
import os

from dheads.platform.config import ClusterConfig, StorageConfig
from dheads.platform.storage import s3_env


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
    """
    import ray

    if ray.is_initialized():
        return
    env_vars = s3_env(storage) if storage else {}
    kwargs: dict = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        num_cpus = cluster.num_cpus or max(os.cpu_count() or 1, int(math.ceil(min_cpus)))
        # The dashboard serves Ray's state API (Ray Train polls it) and the Job
        # Submission API; it binds 127.0.0.1 only.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
