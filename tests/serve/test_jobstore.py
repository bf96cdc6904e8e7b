"""The job database, one suite for both backends (SQLite file in WAL mode,
and a real PostgreSQL server the tests start): leases, takeover after a
crash, capped attempts, cancel that no late save undoes, expiry, tenancy and
corrupt rows. Two `JobStore` objects are two ingresses (two connections)."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from dheads.platform.dubbing.items import ItemStatus
from dheads.serve.jobstore import ItemRecord, JobRecord, JobStatus, JobStore


def _job(n: int = 2, tenant: str = "default", uploads: str | None = None) -> JobRecord:
    return JobRecord(tenant=tenant, uploads=uploads, items=[
        ItemRecord(item_id=f"i{k}", identity=f"/in/id{k}.png", audio=f"/in/a{k}.wav",
                   output=f"/out/{tenant}/i{k}.mp4") for k in range(n)])


@pytest.fixture
def stores(store_url):
    a = JobStore(store_url, lease_s=10, max_attempts=3)
    b = JobStore(store_url, lease_s=10, max_attempts=3)
    yield a, b
    a.close()
    b.close()


def test_a_job_round_trips_and_is_visible_only_to_its_tenant(stores):
    a, b = stores
    job = _job(3, tenant="acme")
    a.create(job)
    got = b.load(job.job_id, "acme")
    assert got.status == JobStatus.queued and [i.item_id for i in got.items] == ["i0", "i1", "i2"]
    assert got.items[2].output == "/out/acme/i2.mp4" and got.tenant == "acme"
    assert b.load(job.job_id, "other") is None and b.cancel(job.job_id, "other") is None
    assert b.load(job.job_id) is not None          # (the service always passes the tenant)
    assert a.load("not-a-job-id") is None and a.load("0" * 32) is None
    assert a.outputs_in_use(["/out/acme/i1.mp4", "/elsewhere.mp4"]) == {"/out/acme/i1.mp4"}


def test_two_ingresses_never_claim_the_same_item(stores):
    a, b = stores
    jobs = [_job(10) for _ in range(4)]
    for j in jobs:
        a.create(j)
    got: dict[str, list] = {"a": [], "b": []}

    def drain(store, name):
        while True:
            claims = store.claim(name, 1)
            if not claims:
                return
            got[name].extend((c.job_id, c.index) for c in claims)

    threads = [threading.Thread(target=drain, args=(s, n)) for s, n in ((a, "a"), (b, "b"), (a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = {(j.job_id, k) for j in jobs for k in range(10)}
    assert sorted(got["a"] + got["b"]) == sorted(everything)     # each item exactly once
    assert not set(got["a"]) & set(got["b"])
    assert all(i.attempts == 1 for j in jobs for i in a.load(j.job_id).items)


def test_a_crashed_ingress_items_are_taken_over_after_the_lease(stores):
    a, b = stores
    job = _job(1)
    a.create(job)
    t0 = 1_000_000_000.0 + 10 ** 8       # a clock far ahead of the job's creation
    [claim] = a.claim("ingress-a", 5, now=t0)
    assert claim.attempt == 1 and a.progress("ingress-a", job.job_id, 0, 4, 1)
    assert b.claim("ingress-b", 5, now=t0 + 5) == []             # lease still held
    # ingress-a "crashes": it never renews; after the lease, b takes the item over
    [taken] = b.claim("ingress-b", 5, now=t0 + 11)
    assert (taken.job_id, taken.index, taken.attempt) == (job.job_id, 0, 2)
    assert "lease expired" in b.load(job.job_id).items[0].reason
    # a late save from the old owner changes nothing
    assert a.finish("ingress-a", job.job_id, 0, ItemStatus.succeeded) is None
    assert not a.progress("ingress-a", job.job_id, 0, 4, 4)
    assert a.renew("ingress-a", {(job.job_id, 0)}, now=t0 + 12) == set()
    assert b.renew("ingress-b", {(job.job_id, 0)}, now=t0 + 12) == {(job.job_id, 0)}
    assert b.finish("ingress-b", job.job_id, 0, ItemStatus.succeeded, seconds=2.0) == JobStatus.succeeded
    done = a.load(job.job_id)
    assert done.status == JobStatus.succeeded and done.items[0].seconds == 2.0 and done.finished_at


def test_renewal_extends_only_live_items_and_gives_the_others_back(stores):
    """An item whose task ended without finishing or releasing it (a store
    error on its way out) is given back at the next renewal, not renewed
    until its ingress dies."""
    a, b = stores
    job = _job(2)
    a.create(job)
    t = 3_000_000_000.0
    assert len(a.claim("a", 5, now=t)) == 2
    assert a.renew("a", {(job.job_id, 0)}, now=t + 5) == {(job.job_id, 0)}
    items = a.load(job.job_id).items
    assert items[0].status == ItemStatus.running and items[0].lease_owner == "a"
    assert items[1].status == ItemStatus.queued and "ended without a result" in items[1].reason
    # claimable at once, the attempt counted; the live item's lease runs to t + 15
    [again] = b.claim("b", 5, now=t + 6)
    assert (again.index, again.attempt) == (1, 2)
    assert b.claim("b", 5, now=t + 14) == []
    assert [c.index for c in b.claim("b", 5, now=t + 16)] == [0]


def test_lease_times_come_from_the_database_clock(postgres_server, monkeypatch):
    """An ingress whose clock runs an hour ahead takes over no live item:
    PostgreSQL's clock stamps and compares every lease."""
    import dheads.serve.jobstore as js

    url = postgres_server()
    a, b = JobStore(url, lease_s=10), JobStore(url, lease_s=10)
    job = _job(1)
    a.create(job)
    assert len(a.claim("a", 1)) == 1
    real = js.time.time
    monkeypatch.setattr(js.time, "time", lambda: real() + 3600.0)
    assert b.claim("b", 1) == []
    assert a.renew("a", {(job.job_id, 0)}) == {(job.job_id, 0)}
    assert a.load(job.job_id).items[0].lease_owner == "a"
    a.close()
    b.close()


def test_postgres_statements_time_out_and_connections_keep_alive(postgres_server):
    import psycopg

    s = JobStore(postgres_server(), timeout_s=1.0)
    with s.db.tx() as c:
        assert c.rows("SHOW statement_timeout")[0][0] == "1s"
        assert c.rows("SHOW idle_in_transaction_session_timeout")[0][0] == "1s"
    dsn = s.db._conn.info.get_parameters()
    assert dsn["keepalives"] == "1" and dsn["tcp_user_timeout"] == "1000" and "keepalives_idle" in dsn
    with pytest.raises(psycopg.errors.QueryCanceled):
        with s.db.tx() as c:
            c.run("SELECT pg_sleep(30)")
    job = _job(1)
    s.create(job)                         # the store goes on after the cancelled statement
    assert s.load(job.job_id).status == JobStatus.queued
    s.close()


def test_a_postgres_restart_costs_calls_not_the_store(postgres_server):
    """The server stops for 5 s: calls meanwhile fail with an error (no hang
    past the timeout), and the same store works again once it is back."""
    from dheads.serve.jobstore import JobStoreError

    import psycopg

    url = postgres_server()
    s = JobStore(url, lease_s=30, timeout_s=2.0)
    job = _job(1)
    s.create(job)
    [claim] = s.claim("a", 1)
    restart = threading.Thread(target=postgres_server.restart, args=(5.0,))
    restart.start()
    failures = 0
    while restart.is_alive():
        try:
            s.renew("a", {(job.job_id, 0)})
        except (psycopg.Error, JobStoreError):
            failures += 1
        time.sleep(0.3)
    restart.join()
    assert failures > 0
    assert s.renew("a", {(job.job_id, 0)}) == {(job.job_id, 0)}
    assert s.finish("a", job.job_id, 0, ItemStatus.succeeded) == JobStatus.succeeded
    s.close()


def test_attempts_are_capped_and_the_item_fails_with_its_last_error(store_url):
    s = JobStore(store_url, lease_s=10, max_attempts=2)
    job = _job(2)
    s.create(job)
    t = 2_000_000_000.0
    assert len(s.claim("x", 5, now=t)) == 2
    # item 0: its worker crashes; the error comes back and it is released for a retry
    assert s.release("x", job.job_id, 0, "WorkerCrashedError: the worker died")
    # item 1: the whole ingress dies (nothing comes back): the lease expires
    again = s.claim("y", 5, now=t + 11)
    assert sorted((c.index, c.attempt) for c in again) == [(0, 2), (1, 2)]
    assert s.release("y", job.job_id, 0, "WorkerCrashedError: the worker died again")
    assert s.claim("z", 5, now=t + 30) == []            # both are out of attempts now
    items = s.load(job.job_id).items
    assert items[0].status == ItemStatus.failed and items[0].reason == (
        "gave up after 2 attempts; last error: WorkerCrashedError: the worker died again")
    assert items[1].status == ItemStatus.failed and items[1].reason.startswith("gave up after 2 attempts")
    assert "lease expired" in items[1].reason
    assert s.load(job.job_id).status == JobStatus.failed
    s.close()


def test_cancel_is_final_and_no_late_save_undoes_it(stores):
    a, b = stores
    job = _job(3)
    a.create(job)
    claims = a.claim("a", 2)
    assert len(claims) == 2
    assert a.finish("a", job.job_id, 0, ItemStatus.succeeded, seconds=1.0) == JobStatus.running
    cancelled = b.cancel(job.job_id, "default")
    assert cancelled.status == JobStatus.cancelled
    assert [i.status for i in cancelled.items] == [ItemStatus.succeeded, ItemStatus.cancelled,
                                                   ItemStatus.cancelled]
    # the ingress still running item 1 saves late: refused, and it learns it lost the item
    assert a.finish("a", job.job_id, 1, ItemStatus.succeeded) is None
    assert not a.progress("a", job.job_id, 1, 3, 3) and not a.mark_writing("a", job.job_id, 1)
    assert not a.release("a", job.job_id, 1, "late error")
    assert a.renew("a", {(job.job_id, 1)}) == set()
    assert a.claim("a", 5) == [] and b.claim("b", 5) == []
    again = a.load(job.job_id)
    assert again.status == JobStatus.cancelled and again.items[1].status == ItemStatus.cancelled
    assert a.cancel(job.job_id).status == JobStatus.cancelled      # idempotent
    done = _job(1)                                                  # a finished job stays finished
    a.create(done)
    [c] = a.claim("a", 1)
    a.finish("a", done.job_id, 0, ItemStatus.failed, reason="audio: no audio stream")
    assert b.cancel(done.job_id).status == JobStatus.failed


def test_jobs_and_uploads_expire(stores):
    a, _ = stores
    finished, waiting = _job(1, uploads="/up/finished"), _job(2, uploads="/up/waiting")
    a.create(finished)
    a.create(waiting)
    [c] = [c for c in a.claim("a", 5) if c.job_id == finished.job_id] or [None]
    a.release_all("a")                                   # graceful stop: not counted
    assert all(i.attempts == 0 for i in a.load(waiting.job_id).items)
    [c] = [c for c in a.claim("a", 5) if c.job_id == finished.job_id]
    a.release_all("a")
    [c] = [c for c in a.claim("a", 5) if c.job_id == finished.job_id]
    a.finish("a", finished.job_id, 0, ItemStatus.succeeded)
    a.release_all("a")
    end = a.load(finished.job_id).finished_at
    assert a.expire(job_ttl_s=100, upload_ttl_s=1000, now=end + 50) == ([], [])
    gone, uploads = a.expire(job_ttl_s=100, upload_ttl_s=10 ** 9, now=end + 101)
    assert gone == [finished.job_id] and uploads == ["/up/finished"]
    assert a.load(finished.job_id) is None
    # the waiting job's uploads expire before it ran: its queued items fail with the reason
    gone, uploads = a.expire(job_ttl_s=10 ** 9, upload_ttl_s=1000, now=waiting.created_at + 1001)
    assert gone == [] and uploads == ["/up/waiting"]
    left = a.load(waiting.job_id)
    assert left.status == JobStatus.failed
    assert all(i.reason.startswith("upload expired") for i in left.items)


def test_a_corrupt_record_fails_alone_and_blocks_nothing(stores):
    a, b = stores
    bad, good = _job(2), _job(1)
    a.create(bad)
    a.create(good)
    with a.db.tx() as c:   # a row damaged on disk / by hand
        c.run("UPDATE dheads_items SET spec = ? WHERE job_id = ? AND idx = 0", ("{not json", bad.job_id))
    claims = b.claim("b", 10)
    assert sorted((c.job_id, c.index) for c in claims) == sorted([(bad.job_id, 1), (good.job_id, 0)])
    shown = b.load(bad.job_id)
    assert shown.items[0].status == ItemStatus.failed and "corrupt job record" in shown.items[0].reason
    with a.db.tx() as c:
        c.run("UPDATE dheads_jobs SET status = ? WHERE job_id = ?", ("garbage", good.job_id))
    assert b.load(good.job_id).status == JobStatus.failed          # readable, not running
    # a new store over the same database (a restarting ingress) opens and claims normally
    third = _job(1)
    a.create(third)
    c2 = JobStore(a.uri, lease_s=10)
    assert [c.job_id for c in c2.claim("c", 10)] == [third.job_id]
    c2.close()


def test_claims_share_the_runners_fairly_among_tenants(stores):
    """A tenant's big job submitted first does not starve the next tenant:
    each claim goes to the tenant with the fewest items running."""
    a, b = stores
    big, small = _job(20, tenant="big"), _job(3, tenant="small")
    a.create(big)
    a.create(small)
    t = 4_000_000_000.0
    first = a.claim("a", 4, now=t)
    assert sorted(c.job_id == small.job_id for c in first) == [False, False, True, True]
    # small has 2 running, big 2: the next two claims alternate again
    nxt = b.claim("b", 2, now=t + 1)
    assert {c.job_id for c in nxt} == {big.job_id, small.job_id}
    # small is out of queued items: the rest go to big, oldest first
    rest = b.claim("b", 5, now=t + 2)
    assert [c.job_id for c in rest] == [big.job_id] * 5 and [c.index for c in rest] == [3, 4, 5, 6, 7]


def test_a_tenant_over_its_open_item_quota_is_refused(stores):
    from dheads.serve.jobstore import QuotaExceeded

    a, b = stores
    a.create(_job(3, tenant="acme"), max_open_items=5)
    with pytest.raises(QuotaExceeded, match="3 items queued or running; this job's 3 would pass the limit of 5"):
        b.create(_job(3, tenant="acme"), max_open_items=5)
    b.create(_job(3, tenant="other"), max_open_items=5)          # another tenant's own count
    job = _job(2, tenant="acme")
    b.create(job, max_open_items=5)                              # 5 open: at the limit, accepted
    for c in a.claim("a", 10):
        if c.job_id == job.job_id:
            a.finish("a", c.job_id, c.index, ItemStatus.succeeded)
    a.create(_job(2, tenant="acme"), max_open_items=5)           # finished items free the quota


def test_outputs_expire_after_their_ttl_and_a_later_jobs_rewrite_is_kept(stores):
    a, b = stores
    first = _job(2)
    a.create(first)
    for c in a.claim("a", 5):
        a.finish("a", c.job_id, c.index, ItemStatus.succeeded)
    later = JobRecord(tenant="default", overwrite=True, items=[ItemRecord(
        item_id="again", identity="/in/x.png", audio="/in/x.wav", output=first.items[1].output)])
    b.create(later)
    [c] = b.claim("b", 5)
    b.finish("b", c.job_id, c.index, ItemStatus.succeeded)
    t = a.load(later.job_id).finished_at
    assert a.outputs_to_expire(60.0, now=t + 30) == {}                      # not old enough
    due = a.outputs_to_expire(60.0, now=t + 61)
    # first's item 1 was written again by the later job: that one is the later job's to delete
    assert due == {first.job_id: [first.items[0].output], later.job_id: [first.items[1].output]}
    a.outputs_deleted(first.job_id)
    done = b.load(first.job_id)
    assert [r.output for r in (i.result() for i in done.items)] == [None, None]
    assert "output deleted" in done.items[0].reason and done.items[0].status == ItemStatus.succeeded
    # with output expiry on, a job's rows go only once its outputs went
    gone, _ = a.expire(0.0, 10 ** 9, now=t + 62, output_ttl_s=60.0)
    assert gone == [first.job_id] and a.load(later.job_id) is not None
    assert a.outputs_to_expire(60.0, now=t + 63) == {later.job_id: [first.items[1].output]}


def test_a_store_from_before_output_expiry_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "old" / "jobs.sqlite3"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.execute("""CREATE TABLE dheads_jobs (job_id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
            status TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION, seed BIGINT NOT NULL, overwrite INTEGER NOT NULL, uploads TEXT)""")
    s = JobStore(str(path.parent))
    job = _job(1)
    s.create(job)
    assert s.load(job.job_id).items[0].output_deleted is False
    s.close()


def test_a_tenant_over_its_upload_bytes_quota_is_refused(stores):
    from dheads.serve.jobstore import QuotaExceeded

    a, b = stores
    mb = 2 ** 20

    def upload_job(tenant, n_mb):
        job = _job(1, tenant=tenant, uploads=f"/up/{uuid.uuid4().hex}")
        job.upload_bytes = n_mb * mb
        return job

    held = upload_job("acme", 6)
    a.create(held, max_upload_bytes=10 * mb)
    with pytest.raises(QuotaExceeded, match="holds 6.0 MB of uploads; this job's 5.0 MB would pass the limit of 10 MB"):
        b.create(upload_job("acme", 5), max_upload_bytes=10 * mb)
    b.create(upload_job("other", 5), max_upload_bytes=10 * mb)
    b.create(upload_job("acme", 4), max_upload_bytes=10 * mb)      # at the limit
    a.expire(10 ** 9, 0.0)                                           # uploads expired: no longer held
    b.create(upload_job("acme", 9), max_upload_bytes=10 * mb)
