"""HTTP ingress of the dubbing service (FastAPI through `serve.ingress`).

    POST   /v1/jobs                 JSON `{"items": [...]}` (or a bare list) of URIs,
                                    or multipart: one item with uploaded files
    GET    /v1/jobs/{id}            status, per-item progress and errors
    GET    /v1/jobs/{id}/results    output URI / seconds / reason per item
    DELETE /v1/jobs/{id}            cancel
    GET    /healthz, /metrics       liveness; Prometheus text
    GET    /docs, /openapi.json     OpenAPI

`/v1/*` needs `Authorization: Bearer <token>` (401). Every URI must be under
an allowed prefix (403). Too many items or too large an upload: 413; audio
over the length limit or a malformed request: 422. Each error has a `detail`.
"""
# no `from __future__ import annotations`: FastAPI must see real types on the
# methods `serve.ingress` re-binds.

import asyncio
import json
import re
from pathlib import Path
from typing import Optional

import av
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field, ValidationError, field_validator
from ray import serve

from dheads.platform import storage
from dheads.platform.config import ServeJob
from dheads.platform.dubbing.items import DubItem, DubResult
from dheads.platform.media import AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS
from dheads.serve.jobstore import ItemRecord, JobRecord, JobStore
from dheads.serve.metrics import CONTENT_TYPE, ServeMetrics
from dheads.serve.runner import JobRunner
from dheads.serve.security import UriForbidden, UriPolicy, token_matches

ITEM_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # item ids name output files


def _matches(pattern: str, s: str) -> bool:
    return re.match(pattern, s) is not None


class JobIn(BaseModel):
    items: list[DubItem] = Field(min_length=1)
    seed: int = 0

    @field_validator("items")
    @classmethod
    def _item_ids(cls, items: list[DubItem]) -> list[DubItem]:
        for item in items:
            if item.item_id is not None and not _matches(ITEM_ID, item.item_id):
                raise ValueError(f"item_id {item.item_id!r} must match {ITEM_ID}")
        return items


class JobAccepted(BaseModel):
    job_id: str
    status: str
    items: int


class ItemProgress(BaseModel):
    item_id: str
    status: str
    segments_done: int
    segments_total: int
    reason: Optional[str]


class JobView(BaseModel):
    job_id: str
    status: str
    created_at: float
    updated_at: float
    counts: dict[str, int]
    items: list[ItemProgress]


class JobResults(BaseModel):
    job_id: str
    status: str
    results: list[DubResult]


_JOB_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"oneOf": [JobIn.model_json_schema(),
                                             {"type": "array", "items": DubItem.model_json_schema()}]}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["identity", "audio"], "properties": {
        "identity": {"type": "string", "format": "binary"},
        "audio": {"type": "string", "format": "binary"},
        "output": {"type": "string"}, "item_id": {"type": "string"},
        "identity_frame": {"type": "integer"}, "seed": {"type": "integer"}}}}}}}

api = FastAPI(title="dheads dubbing", version="1",
              description="Dub talking-head videos with Diffused Heads: submit jobs, poll, fetch results.")
# documents the scheme in OpenAPI; the check itself is `DubbingAPI._authorize`
bearer = HTTPBearer(auto_error=False, description="API token (env DHEADS_API_TOKEN or serve.token)")


def _fail(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


# Helpers sit above the deployment: `serve.ingress` serialises the class when
# it is decorated, so names defined below it would be missing in the replica.
def _form_int(form, name: str) -> Optional[int]:
    value = form.get(name)
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _fail(422, f"{name} must be an integer, got {value!r}") from None
    if number < 0:
        raise _fail(422, f"{name} must be >= 0")
    return number


def _check_unique(job: JobRecord) -> None:
    for field in ("item_id", "output"):
        values = [getattr(i, field) for i in job.items]
        if len(set(values)) != len(values):
            raise _fail(422, f"duplicate {field} in the job's items")


def _duration_s(uri: str, cfg: ServeJob) -> Optional[float]:
    """Audio duration from the container header (reads only what PyAV needs);
    None when unknown or unreadable (the item then fails with a reason later)."""
    try:
        fs, path = storage.resolve(uri, cfg.storage)
        with fs.open_input_file(path) as f, av.open(f) as c:
            if not c.streams.audio:
                return None
            a = c.streams.audio[0]
            if a.duration is not None and a.time_base is not None:
                return float(a.duration * a.time_base)
            return c.duration / 1e6 if c.duration else None
    except Exception:  # noqa: BLE001 - any failure here is reported when the item runs
        return None


@serve.deployment
@serve.ingress(api)
class DubbingAPI:
    async def __init__(self, model, cfg: ServeJob, token: str):
        self.cfg, self.token = cfg, token
        self.policy = UriPolicy(cfg.serve.allowed_uris)
        self.metrics = ServeMetrics()
        self.store = JobStore(cfg.serve.job_store, cfg.storage)
        self.runner = JobRunner(cfg, model, self.store, self.metrics)
        await self.runner.resume()

    # ------------------------------------------------------------- helpers
    def _authorize(self, request: Request) -> None:
        if not token_matches(request.headers.get("authorization"), self.token):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    def _allowed(self, uri: str) -> str:
        try:
            return self.policy.check(uri)
        except UriForbidden as e:
            raise _fail(403, str(e)) from e

    async def _check_audio_length(self, uri: str) -> None:
        """422 when the container says the audio is longer than allowed
        (unknown durations are checked again when the item is decoded)."""
        seconds = await asyncio.to_thread(_duration_s, uri, self.cfg)
        limit = self.cfg.serve.max_audio_s
        if seconds is not None and seconds > limit:
            raise _fail(422, f"audio {uri} is {seconds:.1f} s, over the limit of {limit:g} s")

    async def _job(self, job_id: str) -> JobRecord:
        job = await self.runner.get(job_id)
        if job is None:
            raise _fail(404, f"no job {job_id}")
        return job

    # ------------------------------------------------------------ endpoints
    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict:
        return {"status": "ok", "jobs_running": len(self.runner.tasks)}

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @api.post("/v1/jobs", status_code=202, response_model=JobAccepted, openapi_extra=_JOB_BODY,
              summary="Submit a dubbing job (JSON list of URIs, or one item as multipart uploads)",
              dependencies=[Depends(bearer)])
    async def submit(self, request: Request) -> JobAccepted:
        self._authorize(request)
        limit = int(self.cfg.serve.max_upload_mb * 1024 * 1024)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _fail(413, f"request is {int(declared)} bytes, over the limit of {limit} bytes")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            job = await self._from_upload(request, limit)
        else:
            job = await self._from_json(request)
        await self.runner.submit(job)
        return JobAccepted(job_id=job.job_id, status=job.status.value, items=len(job.items))

    @api.get("/v1/jobs/{job_id}", response_model=JobView, summary="Job status and per-item progress",
             dependencies=[Depends(bearer)])
    async def status(self, job_id: str, request: Request) -> JobView:
        self._authorize(request)
        job = await self._job(job_id)
        return JobView(job_id=job.job_id, status=job.status.value, created_at=job.created_at,
                       updated_at=job.updated_at, counts=job.counts(),
                       items=[ItemProgress(item_id=i.item_id, status=i.status.value,
                                           segments_done=i.segments_done,
                                           segments_total=i.segments_total, reason=i.reason)
                              for i in job.items])

    @api.get("/v1/jobs/{job_id}/results", response_model=JobResults, summary="Per-item outputs",
             dependencies=[Depends(bearer)])
    async def results(self, job_id: str, request: Request) -> JobResults:
        self._authorize(request)
        job = await self._job(job_id)
        return JobResults(job_id=job.job_id, status=job.status.value,
                          results=[i.result() for i in job.items])

    @api.delete("/v1/jobs/{job_id}", response_model=JobAccepted, summary="Cancel a job",
             dependencies=[Depends(bearer)])
    async def cancel(self, job_id: str, request: Request) -> JobAccepted:
        self._authorize(request)
        job = await self.runner.cancel(job_id)
        if job is None:
            raise _fail(404, f"no job {job_id}")
        return JobAccepted(job_id=job.job_id, status=job.status.value, items=len(job.items))

    # ------------------------------------------------------------- parsing
    async def _from_json(self, request: Request) -> JobRecord:
        try:
            body = await request.json()
            if isinstance(body, list):
                body = {"items": body}
            spec = JobIn.model_validate(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _fail(422, f"body is not JSON: {e}") from e
        except ValidationError as e:
            raise _fail(422, f"invalid job: {e.errors(include_url=False, include_context=False)}") from e
        if len(spec.items) > self.cfg.serve.max_items_per_job:
            raise _fail(413, f"{len(spec.items)} items, over the limit of "
                             f"{self.cfg.serve.max_items_per_job} per job")
        job = JobRecord(items=[], seed=spec.seed)
        out_dir = storage.join(self.cfg.serve.output_dir, job.job_id)
        for n, it in enumerate(spec.items):
            it = it.with_defaults(f"item{n:04d}", out_dir)
            job.items.append(ItemRecord(**it.model_dump(exclude={"identity", "audio", "output"}),
                                        identity=self._allowed(it.identity),
                                        audio=self._allowed(it.audio), output=self._allowed(it.output)))
        _check_unique(job)
        await asyncio.gather(*(self._check_audio_length(i.audio) for i in job.items))
        return job

    async def _from_upload(self, request: Request, limit: int) -> JobRecord:
        form = await request.form(max_files=2, max_fields=8)
        files = {k: form.get(k) for k in ("identity", "audio")}
        if any(not hasattr(f, "read") for f in files.values()):
            raise _fail(422, "multipart jobs need two files: 'identity' and 'audio'")
        job = JobRecord(items=[], seed=_form_int(form, "seed") or 0)
        item_id = str(form.get("item_id") or "item0000")
        if not _matches(ITEM_ID, item_id):
            raise _fail(422, f"invalid item_id {item_id!r}")
        output = self._allowed(str(form.get("output") or storage.join(
            self.cfg.serve.output_dir, job.job_id, f"{item_id}.mp4")))
        identity_frame = _form_int(form, "identity_frame")
        data, total = {}, 0
        for name, f in files.items():
            suffix = Path(f.filename or "").suffix.lower()
            if suffix not in (IMAGE_EXTS + VIDEO_EXTS if name == "identity" else AUDIO_EXTS + VIDEO_EXTS):
                raise _fail(422, f"{name}: unsupported file type {suffix or '(none)'!r}")
            data[name] = (suffix, await f.read())
            total += len(data[name][1])
            if total > limit:
                raise _fail(413, f"uploads exceed the limit of {limit} bytes")
        uploads = self.store.uploads(job.job_id)
        uris = {name: storage.join(uploads, f"{name}{suffix}") for name, (suffix, _) in data.items()}
        for name, (_, blob) in data.items():
            await asyncio.to_thread(storage.write_bytes, uris[name], blob, self.cfg.storage)
        job.items.append(ItemRecord(item_id=item_id, identity=uris["identity"], audio=uris["audio"],
                                    output=output, identity_frame=identity_frame))
        try:
            await self._check_audio_length(uris["audio"])
        except HTTPException:
            await asyncio.to_thread(storage.delete, uploads, self.cfg.storage)
            raise
        return job


__all__ = ["api", "DubbingAPI", "JobIn"]
