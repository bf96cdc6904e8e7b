"""Dubbing jobs in a SQL database: SQLite (the embedded default) or PostgreSQL.

`serve.job_store` is a local directory (SQLite in WAL mode at
`<dir>/jobs.sqlite3`, one node) or a `postgresql://` URL (any number of
ingresses on any nodes). One row per job, one per item; every change is one
short transaction, and every state change is a guarded `UPDATE`:

- **leases**: an ingress runs an item only after `claim` set the item's
  `lease_owner` to its own id with `lease_until` in the future; it renews
  the leases of the items a task of it still runs (`renew(owner, live)`), and
  gives back at once any other item it holds (a task that ended on an error
  before it could finish or release its item). Two ingresses on one store
  never run the same item; the items of one that crashed are claimable again
  once their lease has expired, and the next claim takes them over.
- **one clock**: lease times come from the database's clock (PostgreSQL's
  `clock_timestamp()`; SQLite's file lives on one node, whose clock all its
  ingresses share), so an ingress whose own clock runs ahead cannot take over
  live items.
- **no hang on a dead server**: PostgreSQL connections carry a statement
  timeout, TCP keepalives and a TCP user timeout (`JobStore(timeout_s=...)`),
  so a half-open connection fails the call instead of holding the store lock.
- **attempts** are counted by `claim`: an item claimed `max_attempts` times
  without finishing fails with its last error (a crash of the process running
  it counts as an attempt, so an item that kills its worker cannot loop).
- **final is final**: only the lease holder can change a running item, never
  once it is final; a job that is cancelled, succeeded or failed never goes
  back to running (a late save cannot undo a cancel).
- **expiry**: `expire(now)` deletes the jobs that finished more than
  `job_ttl_s` ago and names the uploads older than `upload_ttl_s`.
- **corrupt rows** fail their own job with a reason; they never stop a load.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Optional

from pydantic import BaseModel, Field, ValidationError

from dheads.platform import storage
from dheads.platform.dubbing.items import FINAL_STATUSES, DubItem, DubResult, ItemStatus

log = logging.getLogger("ray.serve")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
SQLITE_FILE = "jobs.sqlite3"


class QuotaExceeded(ValueError):
    """A tenant's job would put it over a quota (open items, held upload bytes)."""


class JobStoreError(RuntimeError):
    """A job store that cannot be opened (bad URL, unreachable server)."""


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"      # every item succeeded
    failed = "failed"            # finished, at least one item failed
    cancelled = "cancelled"


FINAL_JOB = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
_FINAL_JOB_SQL = "('succeeded', 'failed', 'cancelled')"
_OPEN_ITEM_SQL = "('queued', 'running')"


class ItemRecord(DubItem):
    """An item of a job (its `item_id` and `output` always set) and its progress."""
    status: ItemStatus = ItemStatus.queued
    reason: Optional[str] = None
    segments_total: int = 0
    segments_done: int = 0
    seconds: Optional[float] = None
    attempts: int = 0            # times the item was claimed (a takeover counts)
    lease_owner: Optional[str] = None
    output_deleted: bool = False # the job's outputs expired (serve.output_ttl_s)

    def result(self) -> DubResult:
        return DubResult(item_id=self.item_id, status=self.status,
                         output=self.output if self.status == ItemStatus.succeeded and not self.output_deleted
                         else None,
                         seconds=self.seconds, reason=self.reason)


class JobRecord(BaseModel):
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    tenant: str = "default"
    status: JobStatus = JobStatus.queued
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    finished_at: Optional[float] = None
    seed: int = 0
    overwrite: bool = False      # outputs may replace existing files
    uploads: Optional[str] = None  # folder of this job's uploaded inputs
    upload_bytes: int = 0          # their size (the tenant's upload quota)
    items: list[ItemRecord]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in ItemStatus if s != ItemStatus.skipped}  # serve never skips
        for item in self.items:
            out[item.status.value] = out.get(item.status.value, 0) + 1
        return out


def job_status(item_states: set[ItemStatus]) -> JobStatus:
    """A job's status from its items' (the job is final once every item is)."""
    if not item_states <= FINAL_STATUSES:
        return JobStatus.running if item_states - {ItemStatus.queued} else JobStatus.queued
    if item_states == {ItemStatus.cancelled}:
        return JobStatus.cancelled
    return JobStatus.failed if item_states - {ItemStatus.succeeded} else JobStatus.succeeded


@dataclass
class Claim:
    """An item this ingress now holds the lease of."""
    job_id: str
    index: int
    item: ItemRecord
    seed: int
    overwrite: bool
    attempt: int
    wrote: bool                 # an earlier attempt reached the output write


_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS dheads_jobs (
        job_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION, seed BIGINT NOT NULL, overwrite INTEGER NOT NULL,
        uploads TEXT, outputs_deleted_at DOUBLE PRECISION, upload_bytes BIGINT NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS dheads_items (
        job_id TEXT NOT NULL, idx INTEGER NOT NULL, spec TEXT NOT NULL, output TEXT NOT NULL,
        status TEXT NOT NULL, reason TEXT, segments_total INTEGER NOT NULL DEFAULT 0,
        segments_done INTEGER NOT NULL DEFAULT 0, seconds DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until DOUBLE PRECISION,
        wrote INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (job_id, idx))""",
    "CREATE INDEX IF NOT EXISTS dheads_items_open ON dheads_items (status, lease_until)",
    "CREATE INDEX IF NOT EXISTS dheads_items_output ON dheads_items (output)",
    "CREATE INDEX IF NOT EXISTS dheads_jobs_finished ON dheads_jobs (status, finished_at)",
]
_ADDED_COLUMNS = [("dheads_jobs", "outputs_deleted_at", "DOUBLE PRECISION"),
                  ("dheads_jobs", "upload_bytes", "BIGINT NOT NULL DEFAULT 0")]
_ITEM_COLS = ("idx, spec, status, reason, segments_total, segments_done, seconds, attempts, "
              "lease_owner")


def is_postgres(uri: str) -> bool:
    return uri.startswith(("postgresql://", "postgres://"))


class _Db:
    """One connection, one lock; `tx()` yields a cursor inside one transaction.
    SQL is written with `?` placeholders (psycopg's are `%s`)."""

    def __init__(self, uri: str, timeout_s: float = 30.0):
        self.postgres = is_postgres(uri)
        self.uri, self.timeout_s = uri, float(timeout_s)
        self._lock = threading.Lock()
        self._conn = self._connect()
        with self.tx() as cur:
            for ddl in _SCHEMA:
                cur.run(ddl)
            for table, column, kind in _ADDED_COLUMNS:     # stores created before the column
                if self.postgres:
                    cur.run(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
                elif column not in {r[1] for r in cur.rows(f"PRAGMA table_info({table})")}:
                    cur.run(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def _connect(self):
        if self.postgres:
            import psycopg

            try:
                ms = max(int(self.timeout_s * 1000), 1)
                # the server ends a statement after timeout_s; the client's kernel
                # ends a connection whose peer stopped answering (keepalive probes
                # on an idle link, TCP_USER_TIMEOUT on unacknowledged data)
                return psycopg.connect(
                    self.uri, autocommit=True, connect_timeout=max(int(self.timeout_s), 2),
                    options=f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}",
                    keepalives=1, keepalives_idle=max(int(self.timeout_s / 3), 1),
                    keepalives_interval=max(int(self.timeout_s / 9), 1), keepalives_count=3,
                    tcp_user_timeout=ms)
            except psycopg.Error as e:
                raise JobStoreError(f"job store {_redacted(self.uri)}: cannot connect ({e})") from e
        path = self.uri if self.uri.endswith((".sqlite3", ".sqlite", ".db")) else \
            os.path.join(self.uri, SQLITE_FILE)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")   # a committed state survives a power cut
        except sqlite3.Error as e:
            raise JobStoreError(f"job store {path}: cannot open SQLite ({e})") from e
        return conn

    @contextmanager
    def tx(self) -> Iterator["_Cursor"]:
        with self._lock:
            if self.postgres:
                import psycopg

                if self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                try:
                    with self._conn.transaction(), self._conn.cursor() as cur:
                        yield _Cursor(cur, True)
                except psycopg.OperationalError:
                    self._conn.close()
                    raise
            else:
                cur = self._conn.cursor()
                cur.execute("BEGIN IMMEDIATE")   # writers queue here, not at first write
                try:
                    yield _Cursor(cur, False)
                except BaseException:
                    self._conn.rollback()
                    raise
                else:
                    self._conn.commit()
                finally:
                    cur.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Cursor:
    def __init__(self, cur, postgres: bool):
        self.cur, self.postgres = cur, postgres

    def run(self, sql: str, params: tuple = ()) -> int:
        self.cur.execute(sql.replace("?", "%s") if self.postgres else sql, params)
        return self.cur.rowcount

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        self.run(sql, params)
        return list(self.cur.fetchall())

    def now(self, given: Optional[float] = None) -> float:
        """`given` (tests), else the database's clock: PostgreSQL's own; for
        SQLite this host's, which every ingress of the file shares."""
        if given is not None:
            return float(given)
        if self.postgres:
            return float(self.rows("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")[0][0])
        return time.time()


def _redacted(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)


class JobStore:
    """Jobs and items in SQLite (`uri` a local directory) or PostgreSQL (`uri`
    a `postgresql://` URL). Thread-safe; the ingress calls it from threads."""

    def __init__(self, uri: str, *, lease_s: float = 30.0, max_attempts: int = 3, timeout_s: float = 30.0):
        if storage.is_s3(uri):
            raise JobStoreError(f"job store {uri}: an object store cannot hold leases; use a local "
                                "directory (SQLite) or a postgresql:// URL")
        self.uri, self.lease_s, self.max_attempts = uri, float(lease_s), int(max_attempts)
        self.db = _Db(uri, timeout_s)

    @property
    def location(self) -> Optional[str]:
        """The local directory holding the database (None for PostgreSQL)."""
        if self.db.postgres:
            return None
        return os.path.dirname(os.path.abspath(self.uri)) if self.uri.endswith(
            (".sqlite3", ".sqlite", ".db")) else os.path.abspath(self.uri)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ jobs
    def create(self, job: JobRecord, max_open_items: int = 0, max_upload_bytes: int = 0) -> None:
        """Store a new job. QuotaExceeded (counted in the same transaction)
        when the tenant's queued and running items, this job's included, would
        pass `max_open_items`, or the bytes of its uploads still held would
        pass `max_upload_bytes` (each: 0 = no limit)."""
        with self.db.tx() as c:
            now = c.now()
            if max_upload_bytes > 0 and job.upload_bytes:
                [(held,)] = c.rows("SELECT COALESCE(SUM(upload_bytes), 0) FROM dheads_jobs "
                                   "WHERE tenant = ? AND uploads IS NOT NULL", (job.tenant,))
                if int(held) + job.upload_bytes > max_upload_bytes:
                    raise QuotaExceeded(
                        f"tenant {job.tenant} holds {int(held) / 2**20:.1f} MB of uploads; this job's "
                        f"{job.upload_bytes / 2**20:.1f} MB would pass the limit of {max_upload_bytes / 2**20:.0f} MB "
                        "(serve.max_upload_gb_per_tenant; uploads are kept serve.upload_ttl_s)")
            if max_open_items > 0:
                [(n_open,)] = c.rows(f"SELECT COUNT(*) FROM dheads_items i JOIN dheads_jobs j ON j.job_id = i.job_id "
                                     f"WHERE j.tenant = ? AND i.status IN {_OPEN_ITEM_SQL}", (job.tenant,))
                if int(n_open) + len(job.items) > max_open_items:
                    raise QuotaExceeded(
                        f"tenant {job.tenant} has {int(n_open)} items queued or running; this job's "
                        f"{len(job.items)} would pass the limit of {max_open_items} (serve.max_open_items_per_tenant)")
            job.created_at = job.updated_at = now
            c.run("INSERT INTO dheads_jobs (job_id, tenant, status, created_at, updated_at, seed, "
                  "overwrite, uploads, upload_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (job.job_id, job.tenant, JobStatus.queued.value, now, now, job.seed,
                   int(job.overwrite), job.uploads, int(job.upload_bytes)))
            for n, item in enumerate(job.items):
                spec = DubItem.model_validate(item.model_dump()).model_dump_json()
                # an item refused at submission (a media limit) is stored failed with its reason
                failed = item.status == ItemStatus.failed
                c.run("INSERT INTO dheads_items (job_id, idx, spec, output, status, reason) "
                      "VALUES (?, ?, ?, ?, ?, ?)", (job.job_id, n, spec, item.output,
                                                    (ItemStatus.failed if failed else ItemStatus.queued).value,
                                                    item.reason if failed else None))
            self._settle(c, job.job_id, now)

    def load(self, job_id: str, tenant: Optional[str] = None) -> Optional[JobRecord]:
        """The job (None if there is none, or it belongs to another tenant)."""
        if not JOB_ID.match(job_id or ""):
            return None
        with self.db.tx() as c:
            rows = c.rows("SELECT tenant, status, created_at, updated_at, finished_at, seed, overwrite, "
                          "uploads, outputs_deleted_at FROM dheads_jobs WHERE job_id = ?", (job_id,))
            if not rows or (tenant is not None and rows[0][0] != tenant):
                return None
            items = c.rows(f"SELECT {_ITEM_COLS} FROM dheads_items WHERE job_id = ? ORDER BY idx",
                           (job_id,))
        t, status, created, updated, finished, seed, overwrite, uploads, deleted = rows[0]
        records = [_item(r) for r in items]
        if deleted is not None:
            for item in records:
                if item.status == ItemStatus.succeeded:
                    item.output_deleted = True
                    item.reason = "output deleted when it expired (serve.output_ttl_s)"
        return JobRecord(job_id=job_id, tenant=t, status=_job_status(status), created_at=created,
                         updated_at=updated, finished_at=finished, seed=seed, overwrite=bool(overwrite),
                         uploads=uploads, items=records)

    def cancel(self, job_id: str, tenant: Optional[str] = None) -> Optional[JobRecord]:
        """Cancel a job and every item not yet final; a final job stays as it is."""
        if self.load(job_id, tenant) is None:
            return None
        with self.db.tx() as c:
            now = c.now()
            changed = c.run(f"UPDATE dheads_jobs SET status = 'cancelled', updated_at = ?, finished_at = ? "
                            f"WHERE job_id = ? AND status NOT IN {_FINAL_JOB_SQL}", (now, now, job_id))
            if changed:
                c.run(f"UPDATE dheads_items SET status = 'cancelled', reason = 'job cancelled', "
                      f"lease_owner = NULL, lease_until = NULL WHERE job_id = ? AND status IN {_OPEN_ITEM_SQL}",
                      (job_id,))
        return self.load(job_id, tenant)

    def outputs_in_use(self, outputs: list[str]) -> set[str]:
        """Those of `outputs` that an unfinished job is going to write."""
        if not outputs:
            return set()
        marks = ", ".join("?" for _ in outputs)
        with self.db.tx() as c:
            rows = c.rows(f"SELECT DISTINCT output FROM dheads_items WHERE output IN ({marks}) "
                          f"AND status IN {_OPEN_ITEM_SQL}", tuple(outputs))
        return {r[0] for r in rows}

    # ------------------------------------------------------------ leases
    def claim(self, owner: str, limit: int, now: Optional[float] = None) -> list[Claim]:
        """Take up to `limit` runnable items: queued ones, and running ones whose
        lease expired (their ingress stopped). An item already claimed
        `max_attempts` times fails instead, with its last error."""
        out: list[Claim] = []
        if limit <= 0:
            return out
        with self.db.tx() as c:
            now = c.now(now)
            rows = self._fair_candidates(c, now, int(limit) * 2 + 8)
            for job_id, idx, spec, attempts, reason, wrote, seed, overwrite, status in rows:
                if len(out) >= limit:
                    break
                guard = (f"WHERE job_id = ? AND idx = ? AND status IN {_OPEN_ITEM_SQL} "
                         f"AND (lease_until IS NULL OR lease_until < ?)")
                try:
                    item = ItemRecord.model_validate_json(spec)
                    attempts, seed, overwrite = int(attempts), int(seed), bool(int(overwrite))
                except (ValidationError, ValueError, TypeError) as e:
                    c.run(f"UPDATE dheads_items SET status = 'failed', reason = ?, lease_owner = NULL, "
                          f"lease_until = NULL {guard}",
                          (f"corrupt job record: {_one_line(e)}", job_id, idx, now))
                    self._settle(c, job_id, now)
                    continue
                if attempts >= self.max_attempts:
                    last = reason or "its ingress stopped while running it (lease expired)"
                    c.run(f"UPDATE dheads_items SET status = 'failed', reason = ?, lease_owner = NULL, "
                          f"lease_until = NULL {guard}",
                          (f"gave up after {attempts} attempts; last error: {last}", job_id, idx, now))
                    self._settle(c, job_id, now)
                    continue
                if status == ItemStatus.running.value and not reason:
                    reason = "its ingress stopped while running it (lease expired)"
                took = c.run(f"UPDATE dheads_items SET status = 'running', lease_owner = ?, lease_until = ?, "
                             f"attempts = attempts + 1, reason = ? {guard}",
                             (owner, now + self.lease_s, reason, job_id, idx, now))
                if took:
                    item.status, item.attempts, item.lease_owner = ItemStatus.running, attempts + 1, owner
                    out.append(Claim(job_id, idx, item, seed, overwrite, attempts + 1, bool(wrote)))
                    self._settle(c, job_id, now)
        return out

    def _fair_candidates(self, c: _Cursor, now: float, n: int) -> list[tuple]:
        """Up to `n` runnable items, shared fairly among tenants: each next
        pick goes to the tenant with the fewest items running (live leases)
        plus picked so far, ties to the oldest job; within a tenant, oldest
        job first. One tenant's thousand-item job cannot starve another's."""
        runnable = (f"i.status IN {_OPEN_ITEM_SQL} AND j.status NOT IN {_FINAL_JOB_SQL} "
                    f"AND (i.lease_until IS NULL OR i.lease_until < ?)")
        tenants = c.rows(f"SELECT j.tenant, MIN(j.created_at) FROM dheads_items i JOIN dheads_jobs j "
                         f"ON j.job_id = i.job_id WHERE {runnable} GROUP BY j.tenant", (now,))
        if not tenants:
            return []
        load = {t: 0 for t, _ in tenants}
        for t, k in c.rows("SELECT j.tenant, COUNT(*) FROM dheads_items i JOIN dheads_jobs j ON j.job_id = i.job_id "
                           "WHERE i.status = 'running' AND i.lease_until >= ? GROUP BY j.tenant", (now,)):
            if t in load:
                load[t] = int(k)
        oldest = {t: float(first) for t, first in tenants}
        queues = {t: c.rows(f"SELECT i.job_id, i.idx, i.spec, i.attempts, i.reason, i.wrote, j.seed, j.overwrite, "
                            f"i.status FROM dheads_items i JOIN dheads_jobs j ON j.job_id = i.job_id "
                            f"WHERE {runnable} AND j.tenant = ? ORDER BY j.created_at, i.idx LIMIT ?",
                            (now, t, n))[::-1] for t in load}
        out: list[tuple] = []
        while len(out) < n and any(queues.values()):
            t = min((t for t in queues if queues[t]), key=lambda t: (load[t], oldest[t]))
            out.append(queues[t].pop())
            load[t] += 1
        return out

    def renew(self, owner: str, live: set[tuple[str, int]],
              now: Optional[float] = None) -> set[tuple[str, int]]:
        """Extend the leases `owner` holds of the items in `live` (those a task
        of it still runs); an item it holds that is not live (its task ended on
        an error before finishing or releasing it) is given back at once,
        queued with that reason, the attempt counted. Returns the live items
        it still holds: one missing was cancelled or taken over, stop it."""
        live = set(live)
        with self.db.tx() as c:
            now = c.now(now)
            held = {(r[0], int(r[1])) for r in c.rows(
                "SELECT job_id, idx FROM dheads_items WHERE lease_owner = ? AND status = 'running'", (owner,))}
            for job_id, idx in held - live:
                c.run(f"UPDATE dheads_items SET status = 'queued', lease_owner = NULL, lease_until = NULL, "
                      f"reason = ? {self._held(owner)}",
                      ("its ingress task ended without a result (a job-store error); retried",
                       job_id, idx, owner))
            for job_id, idx in held & live:
                c.run(f"UPDATE dheads_items SET lease_until = ? {self._held(owner)}",
                      (now + self.lease_s, job_id, idx, owner))
        return held & live

    def _held(self, owner: str) -> str:
        return "WHERE job_id = ? AND idx = ? AND lease_owner = ? AND status = 'running'"

    def progress(self, owner: str, job_id: str, idx: int, total: int, done: int) -> bool:
        with self.db.tx() as c:
            return bool(c.run(f"UPDATE dheads_items SET segments_total = ?, segments_done = ? "
                              f"{self._held(owner)}", (total, done, job_id, idx, owner)))

    def mark_writing(self, owner: str, job_id: str, idx: int) -> bool:
        """Record that this attempt is about to write the output (so a later
        attempt that finds the output knows this job wrote it)."""
        with self.db.tx() as c:
            return bool(c.run(f"UPDATE dheads_items SET wrote = 1 {self._held(owner)}", (job_id, idx, owner)))

    def finish(self, owner: str, job_id: str, idx: int, status: ItemStatus,
               reason: Optional[str] = None, seconds: Optional[float] = None) -> Optional[JobStatus]:
        """A final state for an item `owner` holds. Returns None when it no
        longer holds it (cancelled, or taken over: nothing changes then), else
        the job's status if this made the job final, else `running`."""
        with self.db.tx() as c:
            now = c.now()
            changed = c.run(f"UPDATE dheads_items SET status = ?, reason = ?, seconds = ?, lease_owner = NULL, "
                            f"lease_until = NULL {self._held(owner)}",
                            (status.value, reason, seconds, job_id, idx, owner))
            if not changed:
                return None
            final = self._settle(c, job_id, now)
        return final or JobStatus.running

    def release(self, owner: str, job_id: str, idx: int, error: str) -> bool:
        """Give an item back after an error worth retrying (a lost worker):
        it is claimable at once, and `error` is its last error."""
        with self.db.tx() as c:
            return bool(c.run(f"UPDATE dheads_items SET status = 'queued', reason = ?, lease_owner = NULL, "
                              f"lease_until = NULL {self._held(owner)}", (error, job_id, idx, owner)))

    def release_all(self, owner: str) -> int:
        """Give back every item `owner` holds (a graceful shutdown: the
        attempt is not counted). Returns how many."""
        with self.db.tx() as c:
            return c.run("UPDATE dheads_items SET status = 'queued', lease_owner = NULL, lease_until = NULL, "
                         "attempts = attempts - 1 WHERE lease_owner = ? AND status = 'running'", (owner,))

    def _settle(self, c: _Cursor, job_id: str, now: float) -> Optional[JobStatus]:
        """The job's status from its items' (never out of a final state);
        returns it when this call made the job final."""
        states = set()
        for (s,) in c.rows("SELECT DISTINCT status FROM dheads_items WHERE job_id = ?", (job_id,)):
            try:
                states.add(ItemStatus(s))
            except ValueError:
                states.add(ItemStatus.failed)
        status = job_status(states)
        finished = now if status in FINAL_JOB else None
        changed = c.run(f"UPDATE dheads_jobs SET status = ?, updated_at = ?, finished_at = ? "
                        f"WHERE job_id = ? AND status NOT IN {_FINAL_JOB_SQL}",
                        (status.value, now, finished, job_id))
        return status if changed and status in FINAL_JOB else None

    # ------------------------------------------------------------ expiry
    def expire(self, job_ttl_s: float, upload_ttl_s: float, now: Optional[float] = None,
               output_ttl_s: Optional[float] = None) -> tuple[list[str], list[str]]:
        """Delete the jobs that finished `job_ttl_s` ago or more (with
        `output_ttl_s`, only once their outputs are deleted too); returns
        (their ids, the upload folders to delete: theirs, and those of jobs
        created `upload_ttl_s` ago or more). An item whose upload expired
        before it ran fails then (`upload expired`)."""
        kept = "" if output_ttl_s is None else "AND outputs_deleted_at IS NOT NULL "
        with self.db.tx() as c:
            now = c.now(now)
            gone = c.rows(f"SELECT job_id, uploads FROM dheads_jobs WHERE status IN {_FINAL_JOB_SQL} "
                          f"AND finished_at IS NOT NULL AND finished_at <= ? {kept}", (now - job_ttl_s,))
            for job_id, _ in gone:
                c.run("DELETE FROM dheads_items WHERE job_id = ?", (job_id,))
                c.run("DELETE FROM dheads_jobs WHERE job_id = ?", (job_id,))
            old = c.rows("SELECT job_id, uploads FROM dheads_jobs WHERE uploads IS NOT NULL "
                         "AND created_at <= ?", (now - upload_ttl_s,))
            for job_id, _ in old:
                c.run("UPDATE dheads_jobs SET uploads = NULL WHERE job_id = ?", (job_id,))
                c.run(f"UPDATE dheads_items SET status = 'failed', reason = ?, lease_owner = NULL, "
                      f"lease_until = NULL WHERE job_id = ? AND status = 'queued'",
                      (f"upload expired (uploads are kept {upload_ttl_s:g} s)", job_id))
                self._settle(c, job_id, now)
        return [j for j, _ in gone], [u for _, u in gone + old if u]

    def outputs_to_expire(self, output_ttl_s: float, now: Optional[float] = None) -> dict[str, list[str]]:
        """The outputs of jobs that finished `output_ttl_s` ago or more and
        are not deleted yet: `{job_id: [output URIs of its succeeded items]}`
        (delete them, then `outputs_deleted(job_id)`). An output that a later
        job, its outputs still kept, wrote again is left to that job."""
        with self.db.tx() as c:
            now = c.now(now)
            jobs = c.rows(f"SELECT job_id, created_at FROM dheads_jobs WHERE status IN {_FINAL_JOB_SQL} "
                          f"AND finished_at IS NOT NULL AND finished_at <= ? AND outputs_deleted_at IS NULL",
                          (now - output_ttl_s,))
            out: dict[str, list[str]] = {}
            for job_id, created in jobs:
                out[job_id] = [r[0] for r in c.rows(
                    "SELECT i.output FROM dheads_items i WHERE i.job_id = ? AND i.status = 'succeeded' "
                    "AND NOT EXISTS (SELECT 1 FROM dheads_items o JOIN dheads_jobs oj ON oj.job_id = o.job_id "
                    "WHERE o.output = i.output AND o.job_id <> i.job_id AND oj.created_at > ? "
                    "AND oj.outputs_deleted_at IS NULL)", (job_id, created))]
        return out

    def outputs_deleted(self, job_id: str, now: Optional[float] = None) -> None:
        with self.db.tx() as c:
            c.run("UPDATE dheads_jobs SET outputs_deleted_at = ? WHERE job_id = ?", (c.now(now), job_id))


def _job_status(value: str) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        return JobStatus.failed   # an unreadable status is not a running job


def _item(row: tuple) -> ItemRecord:
    idx, spec, status, reason, total, done, seconds, attempts, owner = row
    fields = dict(segments_total=total, segments_done=done, seconds=seconds, attempts=attempts,
                  lease_owner=owner)
    try:
        item = ItemRecord.model_validate({**json.loads(spec), **fields})
        item.status, item.reason = ItemStatus(status), reason
    except (ValidationError, ValueError, TypeError) as e:
        # a corrupt row is shown as a failed item, never an error for the whole job
        item = ItemRecord(identity="?", audio="?", output="?", item_id=f"item{idx:04d}",
                          status=ItemStatus.failed, reason=reason or f"corrupt job record: {_one_line(e)}",
                          **fields)
    return item


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def new_owner() -> str:
    """The id an ingress holds its leases under."""
    return f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


__all__ = ["JobStore", "JobStoreError", "JobRecord", "ItemRecord", "JobStatus", "Claim", "FINAL_JOB",
           "job_status", "is_postgres", "new_owner", "SQLITE_FILE"]
