"""Ray Train's storage for a dheads URI (local path or s3://)."""
from __future__ import annotations

import os

import pyarrow.fs as pafs

from dheads.platform import storage
from dheads.platform.config import StorageConfig


def run_storage(storage_path: str, storage_cfg: StorageConfig) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for `ray.train.RunConfig`.

    S3 goes through a pyarrow S3FileSystem built like every other dheads S3
    access (StorageConfig's endpoint). Credentials present in this process's
    environment are put in the filesystem object explicitly, because the
    object is pickled to Ray Train's controller and workers, whose
    environment may lack them; without any, the AWS default chain applies
    there (instance role, IRSA).
    """
    if not storage.is_s3(storage_path):
        return str(storage.resolve(storage_path)[1]), None
    _, path = storage.resolve(storage_path, storage_cfg)
    kwargs: dict = {"region": storage_cfg.region}
    if storage_cfg.endpoint_url:
        from urllib.parse import urlparse

        ep = urlparse(storage_cfg.endpoint_url)
        kwargs["endpoint_override"] = ep.netloc or storage_cfg.endpoint_url
        kwargs["scheme"] = ep.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return path, pafs.S3FileSystem(**kwargs)
