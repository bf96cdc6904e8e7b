"""`dheads submit ...`: run a dheads job on a Ray cluster through Ray's Job
Submission API (`ray.job_submission.JobSubmissionClient`).

    dheads submit <job> [key=value ...] [--no-wait]   # e.g. dheads submit train data.shards=s3://...
    dheads submit status JOB_ID [--address URL]
    dheads submit logs JOB_ID [--follow] [--address URL]
    dheads submit stop JOB_ID [--address URL]

The job's config is composed here first, so a typo fails before anything is
sent. The cluster runs the entrypoint `dheads <job> key=value ...` with the
runtime environment built here: the S3 endpoint and AWS credentials of this
shell as env vars (the job's own `storage.endpoint_url` wins). The
dashboard address is `cluster.dashboard_address` (an override like any
other; `--address` or RAY_API_SERVER_ADDRESS for status/logs/stop).

The dheads package is NOT shipped with the job: it must be installed in the
cluster's image (infra/Dockerfile), like torch and ray themselves. The code
on the cluster is the image's, whatever this checkout holds.

Ray 2.60 clusters enable token auth by default. The token is read the way
Ray's own CLI reads it: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH,
else `~/.ray/auth_token`; it is sent as `Authorization: Bearer ...`.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from dheads.platform.config import ClusterConfig, ConfigError, compose
from dheads.platform.storage import s3_env

USAGE = """usage: dheads submit <job> [key=value ...] [--no-wait] [--address URL]
       dheads submit status|logs|stop JOB_ID [--address URL] [--follow]
The cluster runs `dheads <job> ...` from its own image: install dheads there."""
CONTROL = ("status", "logs", "stop")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60.0


def auth_headers() -> dict[str, str]:
    """`Authorization` header with the cluster's token, if one is configured here."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers())


def runtime_env(cfg) -> dict:
    """Env vars the job needs on the cluster: S3 endpoint and credentials."""
    storage = getattr(cfg, "storage", None)
    env = s3_env(storage) if storage is not None else {}
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        if k in os.environ and k not in env:
            env[k] = os.environ[k]
    return {"env_vars": env} if env else {}


def submit(job: str, overrides: list[str], address: str | None = None) -> tuple[str, str]:
    """Compose (validate) the job's config and submit it; returns (job id, address).

    `address` defaults to the job's `cluster.dashboard_address`.
    """
    cfg = compose(job, overrides)
    address = address or (getattr(cfg, "cluster", None) or ClusterConfig()).dashboard_address
    entrypoint = shlex.join(["dheads", job, *overrides])
    c = client(address)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            job_id = c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(cfg),
                                  metadata={"dheads_job": job})
            return job_id, address
        except RuntimeError as e:
            # A head that just started answers before its job agent is up.
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1.0)


def _split_address(args: list[str]) -> tuple[str | None, list[str]]:
    """(`--address URL` if given, the other arguments)."""
    address, rest = None, []
    it = iter(args)
    for a in it:
        if a == "--address":
            address = next(it, None)
        elif a.startswith("--address="):
            address = a.split("=", 1)[1]
        else:
            rest.append(a)
    return address, rest


def _address(args: list[str]) -> tuple[str, list[str]]:
    """Dashboard address for status/logs/stop: --address, cluster.dashboard_address=,
    RAY_API_SERVER_ADDRESS, else the default."""
    address, rest = _split_address(args)
    for a in list(rest):
        if a.startswith("cluster.dashboard_address="):
            address = a.split("=", 1)[1]
            rest.remove(a)
    return address or os.environ.get("RAY_API_SERVER_ADDRESS", ClusterConfig().dashboard_address), rest


def status(job_id: str, address: str) -> dict:
    info = client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint}


def follow_logs(job_id: str, address: str) -> None:
    import asyncio

    async def tail() -> None:
        async for chunk in client(address).tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    try:
        if command in CONTROL:
            address, rest = _address(args)
            follow = "--follow" in rest
            ids = [a for a in rest if not a.startswith("--")]
            if len(ids) != 1:
                print(USAGE, file=sys.stderr)
                return 2
            job_id = ids[0]
            if command == "status":
                print(json.dumps(status(job_id, address)))
            elif command == "logs":
                if follow:
                    follow_logs(job_id, address)
                else:
                    print(client(address).get_job_logs(job_id), end="")
            else:
                stopped = client(address).stop_job(job_id)
                print(json.dumps({"job_id": job_id, "stop_requested": bool(stopped)}))
            return 0
        wait = "--no-wait" not in args
        address, overrides = _split_address([a for a in args if a != "--no-wait"])
        job_id, address = submit(command, overrides, address)
        print(json.dumps({"job_id": job_id, "address": address}), flush=True)
        if not wait:
            return 0
        follow_logs(job_id, address)
        final = status(job_id, address)
        while final["status"] not in TERMINAL:
            time.sleep(1.0)
            final = status(job_id, address)
        print(json.dumps(final))
        return 0 if final["status"] == "SUCCEEDED" else 1
    except ConfigError as e:
        print(f"dheads: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError) as e:
        print(f"dheads submit: {e}", file=sys.stderr)
        return 1
