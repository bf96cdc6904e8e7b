"""`dheads serve`: the dubbing job service on Ray Serve.

`build_app(cfg)` is the typed builder: it binds the ingress (FastAPI, one
replica: it owns the running jobs) to the `DubbingModel` deployment
(autoscaled model replicas). Decoding and encoding run in Ray tasks the
ingress starts (`serve/runner.py`), not in either deployment. `run(cfg)`
starts Serve bound to `serve.host:serve.port` (127.0.0.1 unless configured)
and deploys the app. Jobs live in `serve.job_store` (SQLite in a local
directory, or PostgreSQL by URL, also from env DHEADS_JOB_STORE_URL);
several ingress replicas can share it. Nothing runs at import.
"""
from __future__ import annotations

import os

from dheads.platform import storage
from dheads.platform.config import ConfigError, ServeJob

APP_NAME = "dheads"
TOKEN_ENV = "DHEADS_API_TOKEN"
JOB_STORE_ENV = "DHEADS_JOB_STORE_URL"   # a postgresql:// URL with its password, from a Secret


def api_tokens(cfg: ServeJob) -> dict[str, str]:
    """{tenant: token}: `serve.tokens_file`, else the one token of
    DHEADS_API_TOKEN / serve.token as tenant `default`. Short tokens are refused."""
    from dheads.serve.security import load_tokens

    return load_tokens(cfg.serve.tokens_file, os.environ.get(TOKEN_ENV) or cfg.serve.token,
                       f"{TOKEN_ENV} or serve.token")


HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node


def _state(s):
    """The job store and uploads folder, checked and made absolute."""
    from dheads.serve.jobstore import is_postgres

    job_store = os.environ.get(JOB_STORE_ENV) or s.job_store
    if storage.is_s3(job_store):
        raise ConfigError(f"serve.job_store {job_store}: an object store cannot hold leases; use a local "
                          "directory (SQLite) or a postgresql:// URL")
    if not is_postgres(job_store):
        job_store = _absolute(job_store)
    upload_dir = s.upload_dir
    if upload_dir is None:
        if is_postgres(job_store):
            raise ConfigError("serve.upload_dir is required with a PostgreSQL job store "
                              "(an s3:// prefix every node can read)")
        upload_dir = os.path.join(job_store, "uploads")
    return job_store, _absolute(upload_dir)


def _absolute(uri: str) -> str:
    """Replicas do not share the driver's working directory: pin local paths."""
    return uri if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def build_app(cfg: ServeJob, tokens: dict[str, str] | None = None):
    """ServeJob -> a bound Serve application (ingress -> model)."""
    import dataclasses

    from dheads.platform.modelfetch import fetch_model_checkpoint
    from dheads.serve.ingress import DubbingAPI
    from dheads.serve.model import MAX_CONCURRENT_BATCHES, DubbingModel
    from dheads.serve.security import UriPolicy, check_tenant_isolation

    tokens = tokens or api_tokens(cfg)
    fetch_model_checkpoint(_absolute(cfg.checkpoint), cfg.storage)  # a clear error now, not in a replica
    s = cfg.serve
    job_store, upload_dir = _state(s)
    check_tenant_isolation(list(tokens), s.allowed_uris, s.output_dir)
    serve_cfg = dataclasses.replace(
        s, allowed_uris=[_absolute(u) for u in s.allowed_uris], job_store=job_store, upload_dir=upload_dir,
        output_dir=_absolute(s.output_dir), shared_uris=[_absolute(u) for u in s.shared_uris])
    # an allow-list inside the service's state is refused now (the state itself is always carved out)
    UriPolicy(serve_cfg.allowed_uris, [p for p in (job_store, upload_dir) if "://" not in p or
                                       storage.is_s3(p)], shared=serve_cfg.shared_uris)
    dub = dataclasses.replace(cfg.dub, max_audio_s=min(cfg.dub.max_audio_s, s.max_audio_s))
    cfg = dataclasses.replace(cfg, checkpoint=_absolute(cfg.checkpoint), serve=serve_cfg, dub=dub)
    env = {"runtime_env": {"env_vars": storage.s3_env(cfg.storage)}}
    a = s.autoscaling
    model = DubbingModel.options(
        autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                            "target_ongoing_requests": a.target_ongoing_requests},
        max_ongoing_requests=s.max_batch_size * MAX_CONCURRENT_BATCHES,
        ray_actor_options={"num_cpus": cfg.dub.cpus_per_worker,
                           "num_gpus": 1 if cfg.dub.use_gpu else 0, **env},
    ).bind(cfg)
    from dheads.serve.jobstore import is_postgres

    # A SQLite job store is a file on one node's disk: every ingress replica
    # runs on the head node then, so all of them open the same file (on
    # different nodes each would open its own, and a job would 404 on the
    # others). PostgreSQL stores let them spread.
    pin = {} if is_postgres(job_store) else {"resources": {HEAD_NODE_RESOURCE: 0.001}}
    return DubbingAPI.options(num_replicas=s.ingress_replicas,
                              ray_actor_options={"num_cpus": 0.1, **pin, **env}).bind(model, cfg, tokens)


def run(cfg: ServeJob) -> int:
    from ray import serve

    from dheads.platform.cluster import connect

    app = build_app(cfg)
    connect(cfg.cluster, cfg.storage)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    s = cfg.serve
    uploads = (f"; uploads (multipart jobs) on http://{s.host}:{s.upload_port}/v1/jobs"
               if s.upload_port is not None else "")
    print(f"dheads serve: jobs API on http://{s.host}:{s.port}/v1/jobs{uploads}", flush=True)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=cfg.blocking)
    return 0


def app_builder(args: dict):
    """Serve config-file entry (`import_path: dheads.serve.app:app_builder`,
    e.g. a KubeRay RayService): `args: {overrides: ["checkpoint=s3://...", ...]}`
    are the same Hydra overrides `dheads serve` takes. Host and port come from
    the Serve config's `http_options` there."""
    from dheads.platform.config import compose

    return build_app(compose("serve", list(args.get("overrides", []))))
