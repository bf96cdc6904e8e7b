"""Dubbing jobs and their persistent store.

A job is one JSON document at `<job_store>/jobs/<job_id>.json` in the
configured object store (local directory or `s3://`), rewritten atomically
(`storage.write_bytes`) whenever an item changes state. The ingress keeps
the live copy in memory; on start it reloads every job that is not in a
final state and resumes it, so an ingress or app restart loses no job.
Uploaded files live under `<job_store>/uploads/<job_id>/`.
"""
from __future__ import annotations

import re
import time
import uuid
from enum import Enum
from typing import Optional

from pydantic import BaseModel, Field

from dheads.platform import storage
from dheads.platform.config import StorageConfig
from dheads.platform.dubbing.items import FINAL_STATUSES, DubItem, DubResult, ItemStatus

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"      # every item succeeded
    failed = "failed"            # finished, at least one item failed
    cancelled = "cancelled"


FINAL_JOB = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}


class ItemRecord(DubItem):
    """An item of a job (its `item_id` and `output` always set) and its progress."""
    status: ItemStatus = ItemStatus.queued
    reason: Optional[str] = None
    segments_total: int = 0
    segments_done: int = 0
    seconds: Optional[float] = None
    attempts: int = 0            # times the item was started (restarts resume it)

    def result(self) -> DubResult:
        return DubResult(item_id=self.item_id, status=self.status,
                         output=self.output if self.status == ItemStatus.succeeded else None,
                         seconds=self.seconds, reason=self.reason)


class JobRecord(BaseModel):
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.queued
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    seed: int = 0
    items: list[ItemRecord]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in ItemStatus if s != ItemStatus.skipped}  # serve never skips
        for item in self.items:
            out[item.status.value] += 1
        return out

    def settle(self) -> JobStatus:
        """The job's status from its items' (final once every item is)."""
        if self.status == JobStatus.cancelled:
            return self.status
        states = {i.status for i in self.items}
        if not states <= FINAL_STATUSES:
            self.status = JobStatus.running if states - {ItemStatus.queued} else self.status
        elif ItemStatus.failed in states:
            self.status = JobStatus.failed
        else:
            self.status = JobStatus.succeeded
        return self.status


class JobStore:
    def __init__(self, uri: str, storage_cfg: StorageConfig | None = None):
        self.uri = uri
        self.storage = storage_cfg

    def _path(self, job_id: str) -> str:
        if not JOB_ID.match(job_id):
            raise KeyError(job_id)
        return storage.join(self.uri, "jobs", f"{job_id}.json")

    def uploads(self, job_id: str) -> str:
        return storage.join(self.uri, "uploads", job_id)

    def save(self, job: JobRecord) -> None:
        job.updated_at = time.time()
        storage.write_bytes(self._path(job.job_id), job.model_dump_json().encode(), self.storage)

    def load(self, job_id: str) -> Optional[JobRecord]:
        try:
            path = self._path(job_id)
        except KeyError:
            return None
        if not storage.exists(path, self.storage):
            return None
        return JobRecord.model_validate_json(storage.read_bytes(path, self.storage))

    def unfinished(self) -> list[JobRecord]:
        """Jobs not in a final state, oldest first."""
        jobs = []
        for uri in storage.list_files(storage.join(self.uri, "jobs"), (".json",), self.storage):
            job = JobRecord.model_validate_json(storage.read_bytes(uri, self.storage))
            if job.status not in FINAL_JOB:
                jobs.append(job)
        return sorted(jobs, key=lambda j: j.created_at)
