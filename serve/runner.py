"""Runs dubbing jobs for the ingress: orchestration only.

Per item: a Ray task decodes and segments it (`prepare_item`), every segment
goes to the `DubbingModel` deployment (Serve routes them across replicas; a
segment whose replica died is sent again), a second Ray task stitches,
encodes and writes the mp4 atomically (`finish_item`), and the job is
persisted. The media tasks declare their CPUs (`MEDIA_TASK`), so the
ingress replica itself only awaits. Items of all jobs share
`item_concurrency` slots. An item whose output already exists and that the
store marks succeeded is never redone; one whose output exists but was not
yet recorded (a restart between the write and the save) is recorded, not
regenerated: every output is written once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from dheads.platform import storage
from dheads.platform.config import ServeJob
from dheads.platform.dubbing.items import (
    FINAL_STATUSES, ItemError, ItemStatus, PreparedItem, finish_item, prepare_item,
)
from dheads.platform.dubbing.segments import Segment
from dheads.serve.jobstore import FINAL_JOB, ItemRecord, JobRecord, JobStatus, JobStore
from dheads.serve.metrics import ServeMetrics

log = logging.getLogger("ray.serve")

# Errors that mean "the replica went away", not "the segment is bad".
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)

# Ray resources of one decode or encode task: PyAV decoding, the face crop and
# the H.264 encode keep about one core busy.
MEDIA_TASK = {"num_cpus": 1.0}


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
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise


class JobRunner:
    def __init__(self, cfg: ServeJob, model, store: JobStore, metrics: ServeMetrics):
        self.cfg, self.model, self.store, self.metrics = cfg, model, store, metrics
        self.jobs: dict[str, JobRecord] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.item_slots = asyncio.Semaphore(cfg.serve.item_concurrency)
        self.in_flight = 0
        self._image_size: Optional[int] = None
        self._save_locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------ lifecycle
    async def resume(self) -> int:
        """Reload unfinished jobs from the store and run them again."""
        jobs = await asyncio.to_thread(self.store.unfinished)
        for job in jobs:
            self.start(job)
        return len(jobs)

    async def submit(self, job: JobRecord) -> None:
        await asyncio.to_thread(self.store.save, job)
        self.metrics.jobs_submitted.inc()
        self.start(job)

    def start(self, job: JobRecord) -> None:
        self.jobs[job.job_id] = job
        self.tasks[job.job_id] = asyncio.create_task(self._run_job(job))

    async def get(self, job_id: str) -> Optional[JobRecord]:
        if job_id in self.jobs:
            return self.jobs[job_id]
        return await asyncio.to_thread(self.store.load, job_id)

    async def cancel(self, job_id: str) -> Optional[JobRecord]:
        job = await self.get(job_id)
        if job is None or job.status in FINAL_JOB:
            return job
        job.status = JobStatus.cancelled
        for item in job.items:
            if item.status not in FINAL_STATUSES:
                item.status, item.reason = ItemStatus.cancelled, "job cancelled"
        task = self.tasks.pop(job_id, None)
        if task is not None:
            task.cancel()
        await self._save(job)
        return job

    async def image_size(self) -> int:
        if self._image_size is None:
            info = await self._call(lambda: self.model.info.remote())
            self._image_size = int(info["image_size"])
        return self._image_size

    # ----------------------------------------------------------------- jobs
    async def _run_job(self, job: JobRecord) -> None:
        try:
            pending = [i for i in job.items if i.status not in FINAL_STATUSES]
            await asyncio.gather(*(self._run_item(job, i) for i in pending))
            job.settle()
            await self._save(job)
            if job.status == JobStatus.succeeded:
                self.metrics.jobs_finished.inc()
            elif job.status == JobStatus.failed:
                self.metrics.jobs_failed.inc()
        except asyncio.CancelledError:
            raise
        except Exception:  # never let a job task die silently
            log.exception("job %s crashed", job.job_id)
        finally:
            self.tasks.pop(job.job_id, None)

    async def _run_item(self, job: JobRecord, rec: ItemRecord) -> None:
        async with self.item_slots:
            if job.status == JobStatus.cancelled:
                return
            rec.status, rec.attempts = ItemStatus.running, rec.attempts + 1
            job.settle()
            await self._save(job)
            try:
                if await asyncio.to_thread(storage.exists, rec.output, self.cfg.storage):
                    # written by an earlier run that stopped before saving the job
                    rec.status, rec.reason = ItemStatus.succeeded, None
                else:
                    rec.seconds = await self._dub(job, rec)
                    rec.status, rec.reason = ItemStatus.succeeded, None
            except ItemError as e:
                rec.status, rec.reason = ItemStatus.failed, str(e)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("item %s of job %s failed", rec.item_id, job.job_id)
                rec.status, rec.reason = ItemStatus.failed, f"{type(e).__name__}: {e}"
            self.metrics.items.labels(status=rec.status.value).inc()
            job.settle()
            await self._save(job)

    async def _dub(self, job: JobRecord, rec: ItemRecord) -> float:
        size = await self.image_size()
        item = rec.model_copy()  # the task gets the item as it is now
        prepared_ref = _prepare_task.options(**MEDIA_TASK).remote(item, self.cfg.dub, size,
                                                                  self.cfg.storage, job.seed)
        prepared: PreparedItem = await _unwrap(prepared_ref)
        rec.segments_total, rec.segments_done = len(prepared.segments), 0
        frames = await asyncio.gather(*(self._generate(rec, s) for s in prepared.segments))
        # the task reads the prepared item from the object store, not from here
        return await _unwrap(_finish_task.options(**MEDIA_TASK).remote(prepared_ref, frames,
                                                                        self.cfg.storage))

    async def _generate(self, rec: ItemRecord, segment: Segment):
        t0 = time.perf_counter()
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
        rec.segments_done += 1
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

    async def _save(self, job: JobRecord) -> None:
        lock = self._save_locks.setdefault(job.job_id, asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self.store.save, job)
