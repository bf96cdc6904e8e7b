"""Connecting to Ray: join the configured cluster or start a local instance."""
from __future__ import annotations

import os

from dheads.platform.config import ClusterConfig, StorageConfig
from dheads.platform.storage import s3_env


def connect(cluster: ClusterConfig, storage: StorageConfig | None = None) -> None:
    """Initialise Ray once per process.

    - already initialised (tests, notebooks, a job calling another): reuse it;
    - `cluster.address` set (or RAY_ADDRESS in the env): join that cluster;
    - otherwise start a local instance on this machine.
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
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=False, **kwargs)
