"""Runs dubbing items for an ingress: orchestration only, through the job store.

An ingress never owns a job: it claims items from the store (`JobStore.claim`
sets a lease in its name), renews its leases every `serve.poll_s`, and runs
each claimed item: a Ray task decodes and segments it (`prepare_item`), every
segment goes to the `DubbingModel` deployment (Serve routes them across
replicas; a segment whose replica died is sent again), a second Ray task
stitches, encodes and writes the mp4 atomically (`finish_item`). Several
ingresses may share one store; one that dies leaves leases that expire, and
the others take its items over. The media tasks declare their CPUs
(`MEDIA_TASK`) and are not retried by Ray: a worker crash comes back here,
counts as an attempt, and the item fails after `serve.max_attempts`.
Failure policy (`platform/dubbing/items.py`, the same as `dheads dub`'s): an
`ItemError` (bad media, an output that cannot be written where asked) fails
the item at once with its reason; a lost worker or replica, a store error or
a transient storage error gives it back for another attempt.

Outputs are written once: an item whose output exists is recorded as done
only when an earlier attempt of this job reached the write (the store's
`wrote` mark) and the job does not overwrite; an output that appeared from
elsewhere fails the item (or is replaced with `overwrite: true`).

Cancel: the store marks the job and its open items cancelled (for good), the
item tasks here stop, and every model replica drops the job's segments
before its next denoising step (`DubbingModel.cancel`, a broadcast). Another
ingress running items of the job sees at its next renewal that it no longer
holds them and stops them the same way.

Segments are named `<job>/<item>/<attempt>/` on the replicas, so an ingress
that lost one item (its lease expired and another ingress took it over)
stops only that attempt's segments, never the new owner's.

Every exit of an item task settles its item: `finish` or `release`, retried
over a store hiccup for up to `serve.lease_s`; progress reports are
best-effort. An item whose task ended without either (the store stayed
down) is given back by the next renewal (`JobStore.renew` extends only the
leases of the items a task here still runs).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Optional

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from dheads.platform import storage
from dheads.platform.config import ServeJob
from dheads.platform.dubbing.items import ItemError, ItemStatus, PreparedItem, finish_item, prepare_item
from dheads.platform.dubbing.segments import Segment
from dheads.serve.jobstore import Claim, JobRecord, JobStatus, JobStore, new_owner
from dheads.serve.metrics import ServeMetrics

log = logging.getLogger("ray.serve")

# Errors that mean "the replica went away", not "the segment is bad".
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)

# Ray resources of one decode or encode task: PyAV decoding, the face crop and
# the H.264 encode keep about one core busy. No Ray-level retries: the store
# counts attempts.
MEDIA_TASK = {"num_cpus": 1.0, "max_retries": 0}


def _finish(prepared: PreparedItem, frames: list[np.ndarray], storage_cfg) -> float:
    by_index = {s.index: f for s, f in zip(prepared.segments, frames)}
    return finish_item(prepared.item.output, prepared.segments, by_index, storage_cfg)


_prepare_task = ray.remote(prepare_item)
_finish_task = ray.remote(_finish)


async def _unwrap(ref: ray.ObjectRef):
    """Await a media task; its ItemError (a reason for the user) comes back as itself."""
    try:
        return await ref
    except RayTaskError as e:
        if isinstance(e.cause, ItemError):
            raise e.cause from None
        raise


def segment_prefix(job_id: str) -> str:
    """The replicas' name prefix of every segment of a job."""
    return f"{job_id}/"


def attempt_prefix(job_id: str, index: int, attempt: int) -> str:
    """The replicas' name of one attempt's segments (a prefix of no other's)."""
    return f"{job_id}/{index}/{attempt}/"


class JobRunner:
    def __init__(self, cfg: ServeJob, model, store: JobStore, metrics: ServeMetrics):
        self.cfg, self.model, self.store, self.metrics = cfg, model, store, metrics
        self.owner = new_owner()
        self.tasks: dict[tuple[str, int], asyncio.Task] = {}
        self.attempts: dict[tuple[str, int], int] = {}   # the attempt each task runs
        self.settling: set[tuple[str, int]] = set()      # tasks saving their result
        self.in_flight = 0
        self._image_size: Optional[int] = None
        self._wake = asyncio.Event()
        self._loop_task: Optional[asyncio.Task] = None
        self._last_sweep = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start claiming items (unfinished jobs in the store included)."""
        self._loop_task = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self.tasks.values()):
            task.cancel()

    async def submit(self, job: JobRecord) -> None:
        s = self.cfg.serve
        await asyncio.to_thread(self.store.create, job, s.max_open_items_per_tenant,
                                int(s.max_upload_gb_per_tenant * 2**30))
        self.metrics.jobs_submitted.inc()
        self._wake.set()

    async def get(self, job_id: str, tenant: Optional[str]) -> Optional[JobRecord]:
        return await asyncio.to_thread(self.store.load, job_id, tenant)

    async def cancel(self, job_id: str, tenant: Optional[str]) -> tuple[Optional[JobRecord], list[dict]]:
        """Cancel in the store (final), stop this ingress's items of the job and
        every replica's segments of it. Returns the job and the replicas' reports."""
        job = await asyncio.to_thread(self.store.cancel, job_id, tenant)
        if job is None:
            return None, []
        return job, await self._stop_job(job_id)

    async def _stop_job(self, job_id: str) -> list[dict]:
        for key in [k for k in self.tasks if k[0] == job_id]:
            self.tasks.pop(key).cancel()
            self.attempts.pop(key, None)
        return await self._broadcast_cancel(segment_prefix(job_id))

    async def _stop_items(self, keys: set[tuple[str, int]]) -> None:
        """Stop this ingress's attempts of `keys` (taken over or cancelled
        elsewhere) and only their segments on the replicas."""
        for key in keys:
            task, attempt = self.tasks.pop(key, None), self.attempts.pop(key, None)
            if task is not None:
                task.cancel()
            if attempt is not None:
                await self._broadcast_cancel(attempt_prefix(*key, attempt))

    async def _broadcast_cancel(self, prefix: str) -> list[dict]:
        try:
            return await self.model.broadcast("cancel", prefix).results_async(
                timeout_s=60, return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - no replica up: nothing is generating
            log.warning("cancel broadcast for %s: %s", prefix, e)
            return []

    async def image_size(self) -> int:
        if self._image_size is None:
            info = await self._call(lambda: self.model.info.remote())
            self._image_size = int(info["image_size"])
        return self._image_size

    # ---------------------------------------------------------- the loop
    async def _poll_loop(self) -> None:
        s = self.cfg.serve
        while True:
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a store hiccup must not end the loop
                log.exception("job runner poll failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=s.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _poll_once(self) -> None:
        s = self.cfg.serve
        live = set(self.tasks)
        held = await asyncio.to_thread(self.store.renew, self.owner, live)
        # cancelled or taken over elsewhere (a task saving its result is left to end)
        await self._stop_items({k for k in live - held if k in self.tasks and k not in self.settling})
        free = s.item_concurrency - len(self.tasks)
        if free > 0:
            for claim in await asyncio.to_thread(self.store.claim, self.owner, free):
                key = (claim.job_id, claim.index)
                self.attempts[key] = claim.attempt
                self.tasks[key] = asyncio.create_task(self._run_item(claim))
        now = time.time()
        if now - self._last_sweep >= min(60.0, s.upload_ttl_s, s.job_ttl_s, s.output_ttl_s or 60.0):
            self._last_sweep = now
            if s.output_ttl_s is not None:
                expired = await asyncio.to_thread(self.store.outputs_to_expire, s.output_ttl_s)
                for job_id, outputs in expired.items():
                    for uri in outputs:
                        await asyncio.to_thread(storage.delete, uri, self.cfg.storage)
                    await asyncio.to_thread(self.store.outputs_deleted, job_id)
            _, uploads = await asyncio.to_thread(self.store.expire, s.job_ttl_s, s.upload_ttl_s,
                                                 None, s.output_ttl_s)
            for uri in uploads:
                await asyncio.to_thread(storage.delete, uri, self.cfg.storage)

    # ----------------------------------------------------------------- items
    async def _run_item(self, claim: Claim) -> None:
        key, rec = (claim.job_id, claim.index), claim.item
        status, reason, seconds, retry = None, None, None, None
        try:
            exists = await asyncio.to_thread(storage.exists, rec.output, self.cfg.storage)
            if exists and claim.wrote and not claim.overwrite:
                status = ItemStatus.succeeded      # this job wrote it, then stopped before saving
            elif exists and not claim.overwrite:
                status, reason = ItemStatus.failed, (
                    f"output {rec.output} appeared after the job was submitted and was not written "
                    "by this job; not overwriting it (submit with overwrite: true to replace it)")
            else:
                seconds = await self._dub(claim)
                status = ItemStatus.succeeded
        except ItemError as e:
            status, reason = ItemStatus.failed, str(e)
        except asyncio.CancelledError:
            self._forget(key)                       # cancelled or moved: the store already says so
            return
        except Exception as e:  # a lost worker or replica, a store or transient storage error: retried
            log.warning("item %s of job %s, attempt %d: %s", rec.item_id, claim.job_id, claim.attempt, e)
            retry = f"{type(e).__name__}: {e}"
        self.settling.add(key)
        try:
            if retry is not None:
                await self._save_result(self.store.release, *key, retry)
                return
            job_status = await self._save_result(self.store.finish, *key, status, reason, seconds)
        finally:
            self.settling.discard(key)
            self._forget(key)
            self._wake.set()
        if job_status is not None:
            self.metrics.items.labels(status=status.value).inc()
        if job_status == JobStatus.succeeded:
            self.metrics.jobs_finished.inc()
        elif job_status == JobStatus.failed:
            self.metrics.jobs_failed.inc()

    def _forget(self, key: tuple[str, int]) -> None:
        if self.tasks.get(key) is asyncio.current_task():
            self.tasks.pop(key, None)
            self.attempts.pop(key, None)

    async def _save_result(self, save, *args):
        """`save(owner, *args)` in the store (finish or release), retried over
        a store error for up to `serve.lease_s`; None when it never got
        through (the next renewal then gives the item back)."""
        deadline = time.monotonic() + self.cfg.serve.lease_s
        delay = min(self.cfg.serve.poll_s, 1.0)
        while True:
            try:
                return await asyncio.to_thread(save, self.owner, *args)
            except Exception as e:  # noqa: BLE001 - a store error: the item must still end
                if time.monotonic() + delay > deadline:
                    log.error("item %s of job %s: could not save its result (%s); the next lease "
                              "renewal gives it back", args[1], args[0], e)
                    return None
                log.warning("saving item %s of job %s: %s; retrying", args[1], args[0], e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _progress(self, key: tuple[str, int], total: int, done: int) -> None:
        """Best-effort: a store error here must not fail the item."""
        try:
            await asyncio.to_thread(self.store.progress, self.owner, *key, total, done)
        except Exception as e:  # noqa: BLE001
            log.warning("progress of item %s of job %s: %s", key[1], key[0], e)

    async def _dub(self, claim: Claim) -> float:
        rec, key = claim.item, (claim.job_id, claim.index)
        size = await self.image_size()
        prepared_ref = _prepare_task.options(**MEDIA_TASK).remote(
            rec.model_copy(), self.cfg.dub, size, self.cfg.storage, claim.seed)
        prepared: PreparedItem = await _unwrap(prepared_ref)
        total = len(prepared.segments)
        await self._progress(key, total, 0)
        done = [0]

        async def one(segment: Segment):
            frames = await self._generate(claim, segment)
            done[0] += 1
            await self._progress(key, total, done[0])
            return frames

        frames = await asyncio.gather(*(one(s) for s in prepared.segments))
        if not await asyncio.to_thread(self.store.mark_writing, self.owner, *key):
            raise asyncio.CancelledError()          # cancelled or taken over meanwhile: do not write
        # the task reads the prepared item from the object store, not from here
        return await _unwrap(_finish_task.options(**MEDIA_TASK).remote(prepared_ref, frames,
                                                                        self.cfg.storage))

    async def _generate(self, claim: Claim, segment: Segment):
        t0 = time.perf_counter()
        # named <job>/<index>/<attempt>/ on the replicas, so a cancel can find
        # the job's segments, or one attempt's
        segment = dataclasses.replace(segment, item_id=attempt_prefix(claim.job_id, claim.index, claim.attempt))
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        try:
            out = await self._call(lambda: self.model.generate.remote(segment))
        finally:
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.in_flight)
        if "error" in out:
            raise ItemError(f"segment {segment.index}: generation failed: {out['error']}")
        for size, calls in out["batch_sizes"].items():
            for _ in range(calls):
                self.metrics.batch_size.observe(size)
        self.metrics.segment_latency.observe(time.perf_counter() - t0)
        self.metrics.segments.inc()
        self.metrics.frames.inc(len(out["frames"]))
        return out["frames"]

    async def _call(self, make_request):
        """Await a model call, re-sending it when its replica is lost."""
        retries = self.cfg.serve.segment_retries
        for attempt in range(retries + 1):
            try:
                return await make_request()
            except REPLICA_LOST:
                if attempt == retries:
                    raise
                log.warning("model replica lost; re-sending (attempt %d)", attempt + 1)
                await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))  # Serve replaces the replica
