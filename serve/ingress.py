"""HTTP ingress of the dubbing service (FastAPI through `serve.ingress`).

    POST   /v1/jobs                 JSON `{"items": [...], "seed": 0, "overwrite": false}`
                                    (or a bare list) of URIs, or multipart: one item
                                    with uploaded files
    GET    /v1/jobs/{id}            status, per-item progress and errors
    GET    /v1/jobs/{id}/results    output URI / seconds / reason per item
    DELETE /v1/jobs/{id}            cancel
    GET    /healthz, /metrics       liveness; Prometheus text
    GET    /docs, /openapi.json     OpenAPI

Multipart uploads go to the ingress replicas' own listener on
`serve.upload_port` (`serve/listener.py`: the same `POST /v1/jobs` and
`/healthz`, read with TCP backpressure); while it runs, this Serve route
answers multipart bodies 421 before reading them, since Serve's proxy would
buffer the whole body.

`/v1/*` needs `Authorization: Bearer <token>` (scheme in any case; 401); a
job is visible only to the tenant whose token submitted it (404 for others).

What a request may cost is bounded while it streams in (`serve/limits.py`),
each refusal naming its limit:

- 413: a JSON body over `serve.max_body_kb` or with more than
  `serve.max_items_per_job` items (counted before parsing); uploads over
  `serve.max_upload_mb` (counted while written to disk); an identity image
  over `dub.max_image_pixels` (from its header);
- 422: malformed requests; audio over `serve.max_audio_s` (from its header;
  decoding stops there anyway); `identity_frame` over `dub.max_identity_frame`;
  duplicate item ids or outputs; an output that is one of the job's inputs;
- 403: a URI outside `serve.allowed_uris`, or inside the service's own state
  (the job store, the uploads folder), whatever the allow-list says;
- 409: an output that exists already (not written by this job), unless the
  job says `overwrite: true`; or one that an unfinished job will write.

The per-item checks (image pixels, audio seconds, identity frame) fail the
request only when no item of the job passes them; otherwise the job is
accepted and those items are failed at once with their reason. Every other
bad input fails its own item when it runs, with a reason; the rest of the
job completes.
"""
# no `from __future__ import annotations`: FastAPI must see real types on the
# methods `serve.ingress` re-binds.

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field, ValidationError, field_validator
from ray import serve

from dheads.platform import storage
from dheads.platform.config import ServeJob
from dheads.platform.dubbing.items import (DubItem, DubResult, ItemError, ItemStatus, check_job_items,
                                           identity_frame_problem)
from dheads.platform.media import AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS
from dheads.serve import limits
from dheads.serve.jobstore import ItemRecord, JobRecord, JobStore, QuotaExceeded
from dheads.serve.listener import UploadListener
from dheads.serve.metrics import CONTENT_TYPE, ServeMetrics
from dheads.serve.runner import JobRunner
from dheads.serve.security import UriForbidden, UriPolicy, tenant_of

ITEM_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # item ids name output files


def _matches(pattern: str, s: str) -> bool:
    return re.match(pattern, s) is not None


class JobIn(BaseModel):
    items: list[DubItem] = Field(min_length=1)
    seed: int = 0
    overwrite: bool = Field(False, description="replace outputs that exist already")

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
    segments_stopped: Optional[int] = None   # (cancel) segments dropped from the model replicas
    steps_waited: Optional[int] = None       # (cancel) denoising steps they ran before the drop (<= 1)


class ItemProgress(BaseModel):
    item_id: str
    status: str
    segments_done: int
    segments_total: int
    attempts: int
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
        "identity_frame": {"type": "integer"}, "seed": {"type": "integer"},
        "overwrite": {"type": "boolean"}}}}}}}

api = FastAPI(title="dheads dubbing", version="1",
              description="Dub talking-head videos with Diffused Heads: submit jobs, poll, fetch results.")
# documents the scheme in OpenAPI; the check itself is `DubbingAPI._authorize`
bearer = HTTPBearer(auto_error=False, description="API token (one per tenant: serve.tokens_file)")


def _fail(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


# Helpers sit above the deployment: `serve.ingress` serialises the class when
# it is decorated, so names defined below it would be missing in the replica.
def multipart_refusal(s, listener_port: Optional[int], host: str) -> Optional[tuple[int, str]]:
    """Why the Serve route does not read a multipart body (None: it does).
    Serve's proxy queues a whole body before the handler runs, so uploads
    go to the ingress's own listener; with none (`serve.upload_port` null)
    they are refused unless `serve.multipart_via_serve` accepts that cost."""
    if listener_port is not None:
        return 421, (f"multipart uploads go to the upload listener: POST http://{host}:{listener_port}/v1/jobs "
                     "(serve.upload_port; this port's proxy would buffer the whole body)")
    if not s.multipart_via_serve:
        return 415, ("multipart uploads are off on this service: it has no upload listener "
                     "(serve.upload_port is null) and Serve's proxy would buffer the whole body before any "
                     "check; put the media under an allowed prefix (e.g. S3) and submit their URIs")
    return None


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def _form_int(fields: dict, name: str) -> Optional[int]:
    value = fields.get(name)
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _fail(422, f"{name} must be an integer, got {value!r}") from None
    if number < 0:
        raise _fail(422, f"{name} must be >= 0")
    return number


def _media_problem(item: ItemRecord, cfg: ServeJob) -> Optional[tuple[int, str]]:
    """(status, reason) when the item's headers break a limit; None otherwise
    (or when a header cannot be read: the item then fails when it runs)."""
    d = cfg.dub
    image_file = Path(item.identity).suffix.lower() in IMAGE_EXTS
    for kind, uri, limit in (("identity", item.identity, d.max_image_mb if image_file else d.max_media_mb),
                             ("audio", item.audio, d.max_media_mb)):
        try:  # an object's size is one HEAD: checked before any byte is read
            storage.check_size(uri, round(limit * 2**20), cfg.storage)
        except storage.TooLarge as e:
            return 413, f"{kind} {uri}: {e} (dub.max_{'image' if kind == 'identity' and image_file else 'media'}_mb)"
        except OSError:
            pass  # unreadable: the item fails with its reason when it runs
    if image_file:
        size = limits.image_header(item.identity, cfg.storage)
        if size is not None and size[0] * size[1] > d.max_image_pixels:
            w, h = size
            return 413, (f"identity image is {w}x{h} = {w * h / 1e6:.0f} MP, over the limit of "
                         f"{d.max_image_pixels / 1e6:g} MP (dub.max_image_pixels; read from the header)")
    else:
        problem = identity_frame_problem(d.identity_frame if item.identity_frame is None else item.identity_frame, d)
        if problem:
            return 422, problem
    seconds = limits.audio_seconds(item.audio, cfg.storage)
    if seconds is not None and seconds > cfg.serve.max_audio_s:
        return 422, f"audio is {seconds:.1f} s, over the limit of {cfg.serve.max_audio_s:g} s (serve.max_audio_s)"
    return None


def _replica_id() -> str:
    """Serve's id of this replica (names its /metrics answer)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests construct the class directly)
        return f"pid-{os.getpid()}"


@serve.deployment
@serve.ingress(api)
class DubbingAPI:
    async def __init__(self, model, cfg: ServeJob, tokens: dict):
        s = cfg.serve
        self.cfg, self.tokens = cfg, dict(tokens)
        self.store = JobStore(s.job_store, lease_s=s.lease_s, max_attempts=s.max_attempts,
                              timeout_s=s.store_timeout_s)
        self.upload_dir = s.upload_dir
        state = [p for p in (self.store.location, self.upload_dir) if p]
        self.policy = UriPolicy(s.allowed_uris, state, protected=[cfg.checkpoint], shared=s.shared_uris)
        self.metrics = ServeMetrics(_replica_id())
        self.runner = JobRunner(cfg, model, self.store, self.metrics)
        self.runner.start()
        self.listener = None if s.upload_port is None else UploadListener(
            self._accept, self.healthz, s.host, s.upload_port, JobAccepted,
            max_connections=s.max_upload_connections, header_timeout_s=s.header_timeout_s,
            body_timeout_s=s.body_timeout_s).start()

    # ------------------------------------------------------------- helpers
    def _authorize(self, request: Request) -> str:
        tenant = tenant_of(request.headers.get("authorization"), self.tokens)
        if tenant is None:
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        return tenant

    def _allowed(self, uri: str, tenant: str, output: bool = False) -> str:
        try:
            return (self.policy.check_output if output else self.policy.check)(uri, tenant)
        except UriForbidden as e:
            raise _fail(403, str(e)) from e

    async def _job(self, job_id: str, tenant: str) -> JobRecord:
        try:
            job = await self.runner.get(job_id, tenant)
        except ValidationError as e:
            raise _fail(500, f"job {job_id}: its record is corrupt ({e.error_count()} errors)") from e
        if job is None:
            raise _fail(404, f"no job {job_id}")
        return job

    # ------------------------------------------------------------ endpoints
    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict:
        return {"status": "ok", "items_running": len(self.runner.tasks)}

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @api.post("/v1/jobs", status_code=202, response_model=JobAccepted, openapi_extra=_JOB_BODY,
              summary="Submit a dubbing job (JSON list of URIs, or one item as multipart uploads)",
              dependencies=[Depends(bearer)])
    async def submit(self, request: Request) -> JobAccepted:
        if _is_multipart(request):
            refusal = multipart_refusal(self.cfg.serve, self.listener and self.listener.port,
                                        request.url.hostname or self.cfg.serve.host)
            if refusal is not None:
                self._authorize(request)
                raise _fail(*refusal)
        return await self._accept(request)

    async def _accept(self, request: Request) -> JobAccepted:
        """A job submission, from the Serve route or the upload listener."""
        tenant = self._authorize(request)
        s = self.cfg.serve
        upload_limit = int(s.max_upload_mb * 1024 * 1024)
        multipart = _is_multipart(request)
        declared = request.headers.get("content-length")
        limit = upload_limit + limits.ENVELOPE_BYTES if multipart else int(s.max_body_kb * 1024)
        if declared and declared.isdigit() and int(declared) > limit:
            raise _fail(413, f"request is {int(declared)} bytes, over the limit of {limit} bytes")
        if multipart:
            job = await self._from_upload(request, tenant, upload_limit)
        else:
            job = await self._from_json(request, tenant)
        try:
            await self.runner.submit(job)
        except QuotaExceeded as e:
            if job.uploads:
                await asyncio.to_thread(storage.delete, job.uploads, self.cfg.storage)
            raise _fail(429, str(e)) from e
        return JobAccepted(job_id=job.job_id, status=job.status.value, items=len(job.items))

    @api.get("/v1/jobs/{job_id}", response_model=JobView, summary="Job status and per-item progress",
             dependencies=[Depends(bearer)])
    async def status(self, job_id: str, request: Request) -> JobView:
        job = await self._job(job_id, self._authorize(request))
        return JobView(job_id=job.job_id, status=job.status.value, created_at=job.created_at,
                       updated_at=job.updated_at, counts=job.counts(),
                       items=[ItemProgress(item_id=i.item_id, status=i.status.value,
                                           segments_done=i.segments_done, segments_total=i.segments_total,
                                           attempts=i.attempts, reason=i.reason)
                              for i in job.items])

    @api.get("/v1/jobs/{job_id}/results", response_model=JobResults, summary="Per-item outputs",
             dependencies=[Depends(bearer)])
    async def results(self, job_id: str, request: Request) -> JobResults:
        job = await self._job(job_id, self._authorize(request))
        return JobResults(job_id=job.job_id, status=job.status.value,
                          results=[i.result() for i in job.items])

    @api.delete("/v1/jobs/{job_id}", response_model=JobAccepted, summary="Cancel a job",
                dependencies=[Depends(bearer)])
    async def cancel(self, job_id: str, request: Request) -> JobAccepted:
        tenant = self._authorize(request)
        await self._job(job_id, tenant)
        job, reports = await self.runner.cancel(job_id, tenant)
        if job is None:
            raise _fail(404, f"no job {job_id}")
        reports = [r for r in reports if isinstance(r, dict)]
        return JobAccepted(job_id=job.job_id, status=job.status.value, items=len(job.items),
                           segments_stopped=sum(r["cancelled"] for r in reports),
                           steps_waited=max((r["steps_waited"] for r in reports), default=0))

    # ------------------------------------------------------------- parsing
    async def _from_json(self, request: Request, tenant: str) -> JobRecord:
        s = self.cfg.serve
        try:
            raw = await limits.read_json_job(request.stream(), int(s.max_body_kb * 1024), s.max_items_per_job)
        except limits.BodyTooLarge as e:
            raise _fail(413, str(e)) from e
        try:
            body = json.loads(raw)
            if isinstance(body, list):
                body = {"items": body}
            if isinstance(body, dict) and len(body.get("items") or []) > s.max_items_per_job:
                raise _fail(413, f"{len(body['items'])} items, over the limit of {s.max_items_per_job} per job")
            spec = JobIn.model_validate(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _fail(422, f"body is not JSON: {e}") from e
        except ValidationError as e:
            raise _fail(422, f"invalid job: {e.errors(include_url=False, include_context=False)}") from e
        job = JobRecord(items=[], seed=spec.seed, overwrite=spec.overwrite, tenant=tenant)
        out_dir = storage.join(s.output_dir.replace("{tenant}", tenant), job.job_id)
        for n, it in enumerate(spec.items):
            it = it.with_defaults(f"item{n:04d}", out_dir)
            job.items.append(ItemRecord(**it.model_dump(exclude={"identity", "audio", "output"}),
                                        identity=self._allowed(it.identity, tenant),
                                        audio=self._allowed(it.audio, tenant),
                                        output=self._allowed(it.output, tenant, output=True)))
        await self._check_items(job)
        return job

    async def _check_items(self, job: JobRecord) -> None:
        """Job-level refusals (422 / 409), then the per-item header checks."""
        try:
            check_job_items(job.items)
        except ItemError as e:
            raise _fail(422, str(e)) from e
        outputs = [i.output for i in job.items]
        if not job.overwrite:
            exists = await asyncio.gather(*(asyncio.to_thread(storage.exists, o, self.cfg.storage)
                                            for o in outputs))
            found = [o for o, e in zip(outputs, exists) if e]
            if found:
                raise _fail(409, f"output {found[0]} exists already and was not written by this job "
                                 f"({len(found)} such outputs); submit with overwrite: true to replace them")
        busy = await asyncio.to_thread(self.store.outputs_in_use, outputs)
        if busy:
            raise _fail(409, f"output {sorted(busy)[0]} is being written by another unfinished job")
        problems = await asyncio.gather(*(asyncio.to_thread(_media_problem, i, self.cfg) for i in job.items))
        if all(problems):
            status, reason = problems[0]
            raise _fail(status, reason if len(job.items) == 1 else f"no item can run; item 0: {reason}")
        for item, problem in zip(job.items, problems):
            if problem:
                item.status, item.reason = ItemStatus.failed, problem[1]

    async def _from_upload(self, request: Request, tenant: str, limit: int) -> JobRecord:
        try:
            parts = await limits.read_uploads(request.stream(), request.headers["content-type"], limit)
        except limits.BodyTooLarge as e:
            raise _fail(413, str(e)) from e
        except limits.BadBody as e:
            raise _fail(422, str(e)) from e
        try:
            return await self._upload_job(parts, tenant)
        finally:
            parts.cleanup()

    async def _upload_job(self, parts: "limits.Uploads", tenant: str) -> JobRecord:
        s, fields = self.cfg.serve, parts.fields
        if set(parts.files) != {"identity", "audio"}:
            raise _fail(422, "multipart jobs need two files: 'identity' and 'audio'")
        overwrite = str(fields.get("overwrite", "")).lower() in ("1", "true", "yes")
        job = JobRecord(items=[], seed=_form_int(fields, "seed") or 0, overwrite=overwrite, tenant=tenant)
        item_id = str(fields.get("item_id") or "item0000")
        if not _matches(ITEM_ID, item_id):
            raise _fail(422, f"invalid item_id {item_id!r}")
        output = self._allowed(str(fields.get("output") or storage.join(
            s.output_dir.replace("{tenant}", tenant), job.job_id, f"{item_id}.mp4")), tenant, output=True)
        for name, up in parts.files.items():
            suffix = Path(up.filename).suffix.lower()
            if suffix not in (IMAGE_EXTS + VIDEO_EXTS if name == "identity" else AUDIO_EXTS + VIDEO_EXTS):
                raise _fail(422, f"{name}: unsupported file type {suffix or '(none)'!r}")
        job.uploads = storage.join(self.upload_dir, job.job_id)
        job.upload_bytes = sum(up.size for up in parts.files.values())
        local = ItemRecord(item_id=item_id, identity=parts.files["identity"].path,
                           audio=parts.files["audio"].path, output=output,
                           identity_frame=_form_int(fields, "identity_frame"))
        problem = await asyncio.to_thread(_media_problem, local, self.cfg)   # checked before storing
        if problem:
            raise _fail(*problem)
        uris = {name: storage.join(job.uploads, Path(up.path).name) for name, up in parts.files.items()}
        for name, up in parts.files.items():
            await asyncio.to_thread(storage.upload_file, up.path, uris[name], self.cfg.storage)  # streamed
        job.items.append(local.model_copy(update={"identity": uris["identity"], "audio": uris["audio"]}))
        try:
            await self._check_items(job)
        except HTTPException:
            await asyncio.to_thread(storage.delete, job.uploads, self.cfg.storage)
            raise
        return job

    def __del__(self):
        if getattr(self, "listener", None) is not None:
            self.listener.stop()
        runner = getattr(self, "runner", None)
        if runner is not None:
            try:
                runner.store.release_all(runner.owner)
            except Exception:  # noqa: BLE001 - the leases then expire on their own
                pass


__all__ = ["api", "DubbingAPI", "JobIn"]
