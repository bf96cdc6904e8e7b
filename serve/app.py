"""`dheads serve`: the dubbing job service on Ray Serve.

`build_app(cfg)` is the typed builder: it binds the ingress (FastAPI, one
replica: it owns the running jobs) to the `DubbingModel` deployment
(autoscaled model replicas). Decoding and encoding run in Ray tasks the
ingress starts (`serve/runner.py`), not in either deployment. `run(cfg)`
starts Serve bound to `serve.host:serve.port` (127.0.0.1 unless configured)
and deploys the app. Nothing runs at import.
"""
from __future__ import annotations

import os

from dheads.platform import storage
from dheads.platform.config import ConfigError, ServeJob

APP_NAME = "dheads"
TOKEN_ENV = "DHEADS_API_TOKEN"


def api_token(cfg: ServeJob) -> str:
    token = os.environ.get(TOKEN_ENV) or cfg.serve.token
    if not token:
        raise ConfigError(f"no API token: set {TOKEN_ENV} or serve.token (the service never runs open)")
    return token


def _absolute(uri: str) -> str:
    """Replicas do not share the driver's working directory: pin local paths."""
    return uri if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def build_app(cfg: ServeJob, token: str | None = None):
    """ServeJob -> a bound Serve application (ingress -> model)."""
    import dataclasses

    from dheads.platform.checkpointing import fetch_model_checkpoint
    from dheads.serve.ingress import DubbingAPI
    from dheads.serve.model import MAX_CONCURRENT_BATCHES, DubbingModel

    token = token or api_token(cfg)
    fetch_model_checkpoint(_absolute(cfg.checkpoint), cfg.storage)  # a clear error now, not in a replica
    s = cfg.serve
    serve_cfg = dataclasses.replace(
        s, allowed_uris=[_absolute(u) for u in s.allowed_uris], job_store=_absolute(s.job_store),
        output_dir=_absolute(s.output_dir))
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
    return DubbingAPI.options(num_replicas=1, ray_actor_options={"num_cpus": 0.1, **env}) \
        .bind(model, cfg, token)


def run(cfg: ServeJob) -> int:
    from ray import serve

    from dheads.platform.cluster import connect

    app = build_app(cfg)
    connect(cfg.cluster, cfg.storage)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=cfg.blocking)
    return 0


def app_builder(args: dict):
    """Serve config-file entry (`import_path: dheads.serve.app:app_builder`,
    e.g. a KubeRay RayService): `args: {overrides: ["checkpoint=s3://...", ...]}`
    are the same Hydra overrides `dheads serve` takes. Host and port come from
    the Serve config's `http_options` there."""
    from dheads.platform.config import compose

    return build_app(compose("serve", list(args.get("overrides", []))))
