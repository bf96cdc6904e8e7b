"""The dubbing service over HTTP: real Ray Serve, moto S3 on 127.0.0.1, real mp4s.

One app for the module (tiny random checkpoint at 16 px, DDIM 2 steps,
4 s segments so the 20 s item fans out); the configs are the real ones,
composed with Hydra and shrunk.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
import requests

from dheads.platform import storage
from dheads.platform.config import ServeJob, compose
from dheads.platform.media import probe, write_video
from dheads.serve.jobstore import JobStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import media_kinds as mk  # noqa: E402

TOKEN = "test-token-" + uuid.uuid4().hex
OTHER = "other-tenant-" + uuid.uuid4().hex      # a second tenant's token


@dataclass
class Service:
    url: str
    upload_url: str          # the ingress replicas' own listener (serve.upload_port)
    cfg: ServeJob
    bucket: str
    inputs: dict

    def post(self, json=None, token=TOKEN, **kw):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(f"{self.url}/v1/jobs", json=json, headers=headers, timeout=60, **kw)

    def upload(self, files, token=TOKEN, **kw):
        """A multipart job, sent to the upload listener."""
        return requests.post(f"{self.upload_url}/v1/jobs", files=files, timeout=60,
                             headers={"Authorization": f"Bearer {token}"}, **kw)

    def get(self, path: str, token=TOKEN):
        return requests.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def wait(self, job_id: str, timeout: float = 240.0, until=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.get(f"/v1/jobs/{job_id}")
            if r.status_code == 200:
                job = r.json()
                if (until or (lambda j: j["status"] in ("succeeded", "failed", "cancelled")))(job):
                    return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not done in {timeout} s: {r.status_code} {r.text}")


def _mp4_with_audio(path, seconds: float, seed: int, inputs) -> None:
    n = int(seconds * 25)
    frames = np.repeat(inputs.face_image(seed, 32)[None], n, 0)
    write_video(path, frames, audio=inputs.speech(seconds, seed=seed))


@pytest.fixture(scope="module")
def service(ray_session, s3_server, tmp_path_factory, dub_inputs, free_port):
    import boto3
    from ray import serve
    from PIL import Image

    from dheads.serve import app

    bucket = f"dub-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("serve")
    face_image, speech, write_audio = dub_inputs.face_image, dub_inputs.speech, dub_inputs.write_audio
    ckpt = dub_inputs.tiny_checkpoint(tmp / "ckpt")
    Image.fromarray(face_image(1)).save(tmp / "id.png")
    write_video(tmp / "id.mp4", np.stack([face_image(i % 3 + 2) for i in range(8)]))  # no audio
    write_audio(tmp / "a20.wav", speech(20.0, seed=20))
    write_audio(tmp / "a2.flac", speech(2.0, seed=2))
    write_audio(tmp / "a15.m4a", speech(1.5, seed=15))
    _mp4_with_audio(tmp / "v12.mp4", 1.2, seed=12, inputs=dub_inputs)
    write_audio(tmp / "a40.wav", speech(40.0, seed=40))
    for i in range(4):
        write_audio(tmp / f"s{i}.wav", speech(6.0, seed=100 + i))
    (tmp / "bad.wav").write_bytes(b"RIFF\x00\x00garbage, not audio" * 10)
    (tmp / "big.wav").write_bytes(os.urandom(5 << 20))           # over dub.max_media_mb=4
    from dheads.platform.config import StorageConfig

    st = StorageConfig(endpoint_url=s3_server)
    inputs = {p.name: storage.join(f"s3://{bucket}/in", p.name) for p in tmp.iterdir() if p.is_file()}
    for p in tmp.iterdir():
        if p.is_file():
            storage.upload_file(p, inputs[p.name], st)
    port, upload_port = free_port(), free_port()
    mk.huge_png(tmp / "huge.png", 12000, 12000)                  # valid header, 144 MP
    for p in [tmp / "huge.png"]:
        storage.upload_file(p, storage.join(f"s3://{bucket}/in", p.name), st)
        inputs[p.name] = storage.join(f"s3://{bucket}/in", p.name)
    tokens = tmp / "tokens"
    tokens.write_text(f"# tenant: token\ndefault: {TOKEN}\nother: {OTHER}\n")
    state = tmp_path_factory.mktemp("state")
    cfg = compose("serve", [
        f"checkpoint={ckpt}", "sampler.steps=ddim2", f"storage.endpoint_url={s3_server}",
        f"serve.port={port}", f"serve.upload_port={upload_port}", f"serve.tokens_file={tokens}", "blocking=false",
        f'serve.allowed_uris=["s3://{bucket}/out/{{tenant}}","{state}/{{tenant}}"]',
        f'serve.shared_uris=["s3://{bucket}/in"]',
        f"serve.job_store={state}/jobstore", f"serve.upload_dir=s3://{bucket}/uploads",
        f"serve.output_dir='s3://{bucket}/out/{{tenant}}'", "serve.ingress_replicas=2", "serve.lease_s=6",
        "serve.poll_s=0.3", "serve.max_attempts=2", "serve.max_body_kb=64",
        "serve.max_items_per_job=8", "serve.max_audio_s=30", "serve.max_upload_mb=1",
        "dub.batch_size=8", "dub.num_threads=1", "dub.max_media_mb=4", "dub.max_segment_s=4", "dub.min_segment_s=1",
        # segments spread over replicas and cancelled mid-item (a carried item is one segment)
        "dub.joints=crossfade",
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=2"])
    app.run(cfg)
    yield Service(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{upload_port}", cfg, bucket, inputs)
    serve.delete(app.APP_NAME)
    serve.shutdown()


def _item(svc: Service, identity: str, audio: str, **kw) -> dict:
    return {"identity": svc.inputs[identity], "audio": svc.inputs[audio], **kw}


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _scrape_all(svc: Service, replicas: int = 2, tries: int = 60) -> str:
    """Every ingress replica's /metrics (each counts only what it did; Serve
    routes each scrape to one of them), concatenated: `_metric` then sums
    over replicas. 60 scrapes miss one of two replicas with p ~ 2^-59."""
    seen: dict[str, str] = {}
    for _ in range(tries):
        text = requests.get(f"{svc.url}/metrics", timeout=10).text
        [replica] = re.findall(r'^dheads_ingress_info\{replica="([^"]+)"\}', text, re.M)
        seen[replica] = text
        if len(seen) == replicas:
            return "\n".join(seen.values())
    raise AssertionError(f"only {len(seen)} of {replicas} ingress replicas answered /metrics")


def _check_mp4(svc: Service, uri: str, seconds: float) -> None:
    with storage.local_path(uri, svc.cfg.storage) as path:
        info = probe(path)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert abs(info["video"]["frames"] / 25 - seconds) <= 1 / 25 + 1e-6, (uri, info)
    assert abs(info["audio"]["duration_s"] - seconds) <= 1 / 25 + 1e-6, (uri, info)


def _outputs(svc: Service, job_id: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=svc.cfg.storage.endpoint_url, region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=svc.bucket, Prefix=f"out/default/{job_id}/").get("Contents", [])
    return sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # pyarrow dir markers


def test_auth_allow_list_and_limits(service):
    svc = service
    ok = [_item(svc, "id.png", "a2.flac")]
    assert svc.post({"items": ok}, token=None).status_code == 401
    assert svc.post({"items": ok}, token="wrong").status_code == 401
    assert svc.get("/v1/jobs/" + "0" * 32, token="wrong").status_code == 401
    outside = [{"identity": svc.inputs["id.png"], "audio": "s3://other-bucket/in/a.wav"}]
    r = svc.post({"items": outside})
    assert r.status_code == 403 and "outside" in r.json()["detail"]
    sneaky = [{"identity": svc.inputs["id.png"], "audio": f"s3://{svc.bucket}/in/../jobstore/x.wav"}]
    assert svc.post({"items": sneaky}).status_code == 403
    assert svc.post({"items": [_item(svc, "id.png", "a2.flac", output="/etc/passwd")]}).status_code == 403
    r = svc.post({"items": ok * 9})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = svc.post({"items": [_item(svc, "id.png", "a40.wav")]})
    assert r.status_code == 422 and "over the limit" in r.json()["detail"]
    assert svc.post({"items": []}).status_code == 422
    files = {"identity": ("id.png", b"\x89PNG" + b"0" * (2 * 1024 * 1024)), "audio": ("a.wav", b"x")}
    r = svc.upload(files)
    assert r.status_code == 413 and "over the limit of" in r.json()["detail"]   # declared length
    r = svc.post(files=files)           # multipart on the Serve port: refused, pointing at the listener
    assert r.status_code == 421 and svc.upload_url + "/v1/jobs" in r.json()["detail"]
    assert svc.upload({"identity": ("id.png", b"x"), "audio": ("a.wav", b"x")}, token="wrong").status_code == 401
    assert requests.get(f"{svc.upload_url}/healthz", timeout=10).json()["status"] == "ok"
    assert requests.get(f"{svc.url}/healthz", timeout=10).json()["status"] == "ok"
    assert "/v1/jobs" in requests.get(f"{svc.url}/openapi.json", timeout=10).json()["paths"]


def test_job_fans_out_completes_and_reports_the_corrupt_item(service):
    svc = service
    before = _scrape_all(svc)
    items = [_item(svc, "id.png", "a20.wav", item_id="long"),
             _item(svc, "id.png", "a2.flac", item_id="flac"),
             _item(svc, "id.mp4", "a15.m4a", item_id="m4a", identity_frame=3),
             _item(svc, "id.png", "v12.mp4", item_id="video-audio"),
             _item(svc, "id.png", "bad.wav", item_id="corrupt")]
    r = svc.post({"items": items})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = svc.wait(job_id)
    assert job["status"] == "failed"                      # finished, one item failed
    by_id = {i["item_id"]: i for i in job["items"]}
    assert by_id["long"]["segments_total"] >= 5            # 20 s in ≤ 4 s segments
    assert by_id["corrupt"]["status"] == "failed" and "audio" in by_id["corrupt"]["reason"]
    results = {x["item_id"]: x for x in svc.get(f"/v1/jobs/{job_id}/results").json()["results"]}
    expected = {"long": 20.0, "flac": 2.0, "m4a": 1.5, "video-audio": 1.2}
    for item_id, seconds in expected.items():
        assert results[item_id]["status"] == "succeeded", results[item_id]
        _check_mp4(svc, results[item_id]["output"], seconds)
    assert results["corrupt"]["output"] is None
    assert _outputs(svc, job_id) == sorted(f"out/default/{job_id}/{i}.mp4" for i in expected)
    after = _scrape_all(svc)
    for name, delta in [("dheads_jobs_submitted_total", 1), ("dheads_jobs_failed_total", 1),
                        ("dheads_segments_generated_total", 8), ("dheads_frames_generated_total", 500),
                        ('dheads_items_total{status="failed"}', 1),
                        ('dheads_items_total{status="succeeded"}', 4),
                        ("dheads_batch_size_count", 1), ("dheads_segment_latency_seconds_count", 8)]:
        assert _metric(after, name) - _metric(before, name) >= delta, name
    assert "dheads_queue_depth" in after


def test_multipart_upload_and_cancel(service, tmp_path, dub_inputs):
    svc = service
    dub_inputs.write_audio(tmp_path / "up.wav", dub_inputs.speech(1.0, seed=7))
    from PIL import Image

    Image.fromarray(dub_inputs.face_image(7)).save(tmp_path / "up.png")
    files = {"identity": ("up.png", (tmp_path / "up.png").read_bytes()),
             "audio": ("up.wav", (tmp_path / "up.wav").read_bytes())}
    r = svc.upload(files, data={"item_id": "upload"})
    assert r.status_code == 202, r.text
    job = svc.wait(r.json()["job_id"])
    assert job["status"] == "succeeded", job
    out = svc.get(f"/v1/jobs/{job['job_id']}/results").json()["results"][0]["output"]
    _check_mp4(svc, out, 1.0)
    r = svc.post({"items": [_item(svc, "id.png", f"s{i}.wav") for i in range(4)]})
    job_id = r.json()["job_id"]
    assert requests.delete(f"{svc.url}/v1/jobs/{job_id}", timeout=10,
                           headers={"Authorization": f"Bearer {TOKEN}"}).json()["status"] == "cancelled"
    job = svc.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and all(i["status"] == "cancelled" for i in job["items"])



def test_killing_model_replicas_mid_job_completes_every_item_once(service):
    import ray

    svc = service
    r = svc.post({"items": [_item(svc, "id.png", f"s{i}.wav", item_id=f"k{i}") for i in range(4)]})
    job_id = r.json()["job_id"]
    svc.wait(job_id, until=lambda j: any(i["segments_total"] for i in j["items"]))
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "#DubbingModel#" in a["name"]]
    assert replicas
    for a in replicas:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
    assert svc.get(f"/v1/jobs/{job_id}").json()["status"] == "running"   # killed mid-job
    job = svc.wait(job_id)
    assert job["status"] == "succeeded", job
    stored = JobStore(svc.cfg.serve.job_store).load(job_id)
    assert [i.attempts for i in stored.items] == [1] * 4      # segments re-sent, items not redone
    now = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#DubbingModel#" in a["name"]}
    assert now and not now & {a["name"] for a in replicas}    # replacement replicas did the rest
    results = svc.get(f"/v1/jobs/{job_id}/results").json()["results"]
    assert sorted(x["item_id"] for x in results) == [f"k{i}" for i in range(4)]
    for x in results:
        _check_mp4(svc, x["output"], 6.0)
    assert _outputs(svc, job_id) == sorted(f"out/default/{job_id}/k{i}.mp4" for i in range(4))


def test_restarting_the_app_mid_job_resumes_it(service):
    from ray import serve

    from dheads.serve import app

    svc = service
    r = svc.post({"items": [_item(svc, "id.png", f"s{i}.wav", item_id=f"r{i}") for i in range(4)]})
    job_id = r.json()["job_id"]
    svc.wait(job_id, until=lambda j: any(i["segments_total"] for i in j["items"]))
    serve.delete(app.APP_NAME)
    before = JobStore(svc.cfg.serve.job_store).load(job_id)
    assert before.status.value in ("queued", "running")            # stopped mid-job
    app.run(svc.cfg)
    job = svc.wait(job_id)
    assert job["status"] == "succeeded", job
    after = JobStore(svc.cfg.serve.job_store).load(job_id)
    # the new ingresses took the items over (a graceful stop gives leases back uncounted)
    assert all(1 <= i.attempts <= 2 for i in after.items)
    results = svc.get(f"/v1/jobs/{job_id}/results").json()["results"]
    assert all(x["status"] == "succeeded" for x in results)
    for x in results:
        _check_mp4(svc, x["output"], 6.0)
    assert _outputs(svc, job_id) == sorted(f"out/default/{job_id}/r{i}.mp4" for i in range(4))


def test_a_bad_output_fails_its_item_at_once_with_the_reason(service):
    """The failure policy (as `dheads dub`'s): an output that cannot be
    written where asked fails on its first attempt, not after
    `serve.max_attempts`; the job's other item succeeds."""
    svc = service
    state = Path(svc.cfg.serve.job_store).parent / "default"
    state.mkdir(parents=True, exist_ok=True)
    (state / "blocker").write_text("a file where the output's folder should be")
    bad = str(state / "blocker" / "x.mp4")
    r = svc.post({"items": [_item(svc, "id.png", "a2.flac", item_id="bad", output=bad),
                            _item(svc, "id.png", "a2.flac", item_id="good")]})
    assert r.status_code == 202, r.text
    job = svc.wait(r.json()["job_id"])
    assert job["status"] == "failed" and [i["status"] for i in job["items"]] == ["failed", "succeeded"], job
    bad = job["items"][0]
    assert bad["attempts"] == 1 and bad["reason"].startswith("output: cannot write"), bad


def test_quotas_answer_429_and_expired_outputs_are_deleted(service):
    """The app redeployed with tight per-tenant quotas and output expiry on:
    a job past the open-items quota and an upload past the bytes quota get
    429 over HTTP (the upload's files deleted, no job stored); a job under
    them completes, and the runners' sweep deletes its outputs from S3 once
    `serve.output_ttl_s` passed, its results then saying so."""
    import dataclasses

    import boto3
    from ray import serve

    from dheads.serve import app

    svc = service
    s3 = boto3.client("s3", endpoint_url=svc.cfg.storage.endpoint_url, region_name="us-east-1")

    def uploads() -> set:
        listed = s3.list_objects_v2(Bucket=svc.bucket, Prefix="uploads/").get("Contents", [])
        return {o["Key"] for o in listed if not o["Key"].endswith("/")}          # pyarrow dir markers

    tight = dataclasses.replace(svc.cfg, serve=dataclasses.replace(
        svc.cfg.serve, max_open_items_per_tenant=3, max_upload_gb_per_tenant=0.5 / 1024, output_ttl_s=2.0))
    serve.delete(app.APP_NAME)
    app.run(tight)
    try:
        r = svc.post({"items": [_item(svc, "id.png", "a2.flac", item_id=f"q{i}") for i in range(4)]})
        assert r.status_code == 429 and "would pass the limit of 3" in r.text, r.text
        before = uploads()
        files = {}
        for field, name in (("identity", "id.png"), ("audio", "a20.wav")):   # 20 s wav: 640 KB > 0.5 MB
            with storage.local_path(svc.inputs[name], svc.cfg.storage) as p:
                files[field] = (name, Path(p).read_bytes())
        r = svc.upload(files, data={"item_id": "big"})
        assert r.status_code == 429 and "of uploads" in r.text, r.text
        assert uploads() == before                                   # its files went with it
        r = svc.post({"items": [_item(svc, "id.png", "a2.flac", item_id=f"ok{i}") for i in range(2)]})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert svc.wait(job_id)["status"] == "succeeded"
        assert len(_outputs(svc, job_id)) == 2

        deadline = time.time() + 120
        while _outputs(svc, job_id) and time.time() < deadline:
            time.sleep(0.5)
        assert _outputs(svc, job_id) == []
        results = svc.get(f"/v1/jobs/{job_id}/results").json()["results"]
        assert [(x["status"], x["output"]) for x in results] == [("succeeded", None)] * 2
        assert all("output deleted" in x["reason"] for x in results), results
    finally:
        serve.delete(app.APP_NAME)
        app.run(svc.cfg)


def test_nothing_runs_at_import():
    import subprocess
    import sys

    code = ("import ray, dheads.serve.app, dheads.serve.ingress, dheads.serve.model, "
            "dheads.serve.runner, dheads.jobs.dub; assert not ray.is_initialized(); print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "clean", out.stderr


# ------------------------------------------------------------ issue 12 holes
def _stream_post(svc: Service, chunks, content_type="application/json", token=TOKEN, url=None):
    """POST a chunked body from `chunks` on a raw socket while reading the
    answer: the server may answer (413) and close before the body ends.
    Returns (status, detail, bytes sent)."""
    import http.client
    import threading

    host, port = (url or svc.url).split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    sent = [0]

    def send():
        try:
            sock.sendall(head)
            for c in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(c), c))
                sent[0] += len(c)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass                                     # the server stopped reading: expected

    t = threading.Thread(target=send, daemon=True)
    t.start()
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    sock.close()
    t.join(timeout=60)
    return resp.status, json.loads(body).get("detail"), sent[0]


def test_bodies_are_bounded_while_they_stream(service):
    svc = service
    # 1 GB of JSON (a single huge string): refused at the byte limit, never parsed
    chunks = (b'{"items": [{"identity": "' if i == 0 else b"x" * 65536 for i in range(16384))
    status, detail, sent = _stream_post(svc, chunks)
    assert status == 413 and "limit of 65536 bytes" in detail and "serve.max_body_kb" in detail
    assert sent < 1 << 30                        # the 1 GB was never all read
    # 200k items in a body under the byte limit's reach: counted while streaming, 413 at item 9
    item = b'{"identity": "s3://x/a.png", "audio": "s3://x/a.wav"},'
    chunks = (b"[" if i == 0 else item * 100 for i in range(2001))
    status, detail, _ = _stream_post(svc, chunks)
    assert status == 413 and "more than 8 items" in detail and "serve.max_items_per_job" in detail
    # a 2 GB multipart upload to the upload listener: streamed to disk, cut at the 1 MB limit;
    # the listener reads only as fast as the parser takes chunks, so the client could not
    # push more than the limit plus socket buffers (a few MB) before the answer
    boundary = "dheadsboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"identity\"; filename=\"id.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    chunks = (head if i == 0 else b"\0" * (1 << 20) for i in range(2049))
    status, detail, sent = _stream_post(svc, chunks, content_type, url=svc.upload_url)
    assert status == 413 and "limit of 1048576 bytes" in detail and sent < 64 << 20, (status, detail, sent)
    # the same to the Serve port: refused from the headers (421), the body never parsed
    chunks = (head if i == 0 else b"\0" * (1 << 20) for i in range(2049))
    status, detail, sent = _stream_post(svc, chunks, content_type)
    assert status == 421 and "upload listener" in detail and sent < 1 << 31
    # a 1 GB JSON body to the listener: 413 at the byte limit, the rest never sent
    chunks = (b'{"items": [{"identity": "' if i == 0 else b"x" * 65536 for i in range(16384))
    status, detail, sent = _stream_post(svc, chunks, url=svc.upload_url)
    assert status == 413 and "serve.max_body_kb" in detail and sent < 64 << 20, (status, detail, sent)


def test_tokens_tenants_and_bearer_case(service):
    svc = service
    r = requests.post(f"{svc.url}/v1/jobs", json={"items": [_item(svc, "id.png", "a2.flac")]},
                      headers={"Authorization": f"bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 202, r.text                          # lowercase scheme accepted
    job_id = r.json()["job_id"]
    assert svc.get(f"/v1/jobs/{job_id}", token=OTHER).status_code == 404     # another tenant's job
    assert svc.get(f"/v1/jobs/{job_id}/results", token=OTHER).status_code == 404
    assert requests.delete(f"{svc.url}/v1/jobs/{job_id}", timeout=30,
                           headers={"Authorization": f"Bearer {OTHER}"}).status_code == 404
    assert svc.get(f"/v1/jobs/{job_id}").status_code == 200
    assert svc.get(f"/v1/jobs/{job_id}", token=TOKEN[:-1]).status_code == 401
    job = svc.wait(job_id)
    assert job["status"] == "succeeded"
    # storage is per tenant: the other tenant can neither read this output nor write beside it
    output = svc.get(f"/v1/jobs/{job_id}/results").json()["results"][0]["output"]
    assert output.startswith(f"s3://{svc.bucket}/out/default/")
    for item in ({"identity": svc.inputs["id.png"], "audio": output},
                 {**_item(svc, "id.png", "a2.flac"), "output": f"s3://{svc.bucket}/out/default/x.mp4"},
                 {**_item(svc, "id.png", "a2.flac"), "output": f"s3://{svc.bucket}/in/x.mp4"}):
        r = svc.post({"items": [item]}, token=OTHER)
        assert r.status_code == 403, (item, r.text)
    assert "serve.shared_uris" in r.json()["detail"]                       # shared inputs are read-only


def test_outputs_are_refused_when_they_would_clobber(service):
    svc = service
    state = Path(svc.cfg.serve.job_store)
    ok = dict(identity=svc.inputs["id.png"], audio=svc.inputs["a2.flac"])
    for out in (str(state / "jobs" / "x.json"), str(state / "jobs.sqlite3"),
                f"s3://{svc.bucket}/uploads/x/identity.png"):
        r = svc.post({"items": [{**ok, "output": out}]})
        assert r.status_code == 403 and "own state" in r.json()["detail"], (out, r.text)
    assert not (state / "jobs" / "x.json").exists()
    r = svc.post({"items": [{**ok, "output": f"s3://{svc.bucket}/out/default/x.wav"}]})
    assert r.status_code == 403 and "outputs are .mp4 files" in r.json()["detail"], r.text
    mine = f"s3://{svc.bucket}/out/default/mine.mp4"                    # an input in the tenant's own space
    storage.write_bytes(mine, storage.read_bytes(svc.inputs["v12.mp4"], svc.cfg.storage), svc.cfg.storage)
    r = svc.post({"items": [{**ok, "audio": mine, "output": mine}]})
    assert r.status_code == 422 and "is an input" in r.json()["detail"]    # an input as output
    r = svc.post({"items": [{**ok, "item_id": "same"}, {**ok, "item_id": "same"}]})
    assert r.status_code == 422 and "duplicate item_id 'same'" in r.json()["detail"]
    out = f"s3://{svc.bucket}/out/default/fixed/one.mp4"
    r = svc.post({"items": [{**ok, "output": out}, {**ok, "output": out}]})
    assert r.status_code == 422 and "duplicate output" in r.json()["detail"]
    storage.write_bytes(out, b"someone else's file", svc.cfg.storage)
    r = svc.post({"items": [{**ok, "output": out}]})                     # exists, not ours
    assert r.status_code == 409 and "overwrite: true" in r.json()["detail"]
    assert storage.read_bytes(out, svc.cfg.storage) == b"someone else's file"
    r = svc.post({"items": [{**ok, "output": out}], "overwrite": True})
    assert r.status_code == 202, r.text
    job = svc.wait(r.json()["job_id"])
    assert job["status"] == "succeeded" and job["items"][0]["attempts"] == 1
    _check_mp4(svc, out, 2.0)                                           # really dubbed, not "done"


def test_media_limits_from_headers(service):
    svc = service
    r = svc.post({"items": [_item(svc, "huge.png", "a2.flac")]})
    assert r.status_code == 413 and "12000x12000 = 144 MP, over the limit of 40 MP" in r.json()["detail"]
    r = svc.post({"items": [_item(svc, "id.png", "big.wav")]})            # sized from the object: nothing read
    assert r.status_code == 413 and "the file is 5 MB, over the limit of 4 MB" in r.json()["detail"], r.text
    r = svc.post({"items": [_item(svc, "id.mp4", "a2.flac", identity_frame=10 ** 6)]})
    assert r.status_code == 422 and "over the limit of 1500" in r.json()["detail"]
    # in a job with good items, the bad one fails alone with the reason
    r = svc.post({"items": [_item(svc, "huge.png", "a2.flac", item_id="huge"),
                            _item(svc, "id.png", "a40.wav", item_id="long"),
                            _item(svc, "id.png", "a15.m4a", item_id="fine")]})
    assert r.status_code == 202, r.text
    job = svc.wait(r.json()["job_id"])
    by_id = {i["item_id"]: i for i in job["items"]}
    assert "144 MP" in by_id["huge"]["reason"] and "over the limit of 30 s" in by_id["long"]["reason"]
    assert by_id["fine"]["status"] == "succeeded" and job["status"] == "failed"


def test_cancel_stops_the_segments_within_a_step_and_stays_cancelled(service):
    from ray import serve

    svc = service
    r = svc.post({"items": [_item(svc, "id.png", "a20.wav", item_id="long")]})
    job_id = r.json()["job_id"]
    svc.wait(job_id, until=lambda j: j["items"][0]["segments_total"] > 0)
    r = requests.delete(f"{svc.url}/v1/jobs/{job_id}", timeout=60,
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # the replicas dropped the job's segments before their next denoising step
    assert r.json()["segments_stopped"] >= 1 and r.json()["steps_waited"] <= 1, r.json()
    model = serve.get_deployment_handle("DubbingModel", app_name="dheads")
    active = model.broadcast("active_items").results(timeout_s=60)
    assert not any(a.startswith(job_id) for replica in active for a in replica)
    # other work runs to completion meanwhile, and the cancelled job never comes back
    other = svc.post({"items": [_item(svc, "id.png", "a2.flac")]}).json()["job_id"]
    svc.wait(other)
    job = svc.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["items"][0]["status"] == "cancelled"
    assert _outputs(svc, job_id) == []


def test_two_runners_settle_every_item_through_store_faults_and_a_takeover(service, store_url, request,
                                                                          tmp_path, dub_inputs):
    """Two ingresses' runners on one store (SQLite, PostgreSQL), the real model
    deployment between them. Runner A's store fails `progress` once, and
    `mark_writing` once with the `release` after it (a store error on an
    item's way out); A's renewals stop reaching the store while item 1's
    lease expires and runner B takes it over; on PostgreSQL the server is
    then down for 5 s. Every item ends final, the taken-over one succeeds
    (A stops only its own attempt's segments, not B's), and no row stays
    running without a task."""
    import asyncio
    import dataclasses
    import threading

    from ray import serve

    from dheads.serve.jobstore import ItemRecord, JobRecord, JobStoreError
    from dheads.serve.metrics import ServeMetrics
    from dheads.serve.runner import JobRunner

    svc = service
    cfg = dataclasses.replace(svc.cfg, serve=dataclasses.replace(
        svc.cfg.serve, lease_s=6.0, poll_s=0.2, max_attempts=4, store_timeout_s=2.0))

    class FaultyStore(JobStore):
        """Injected store errors (the real database behind them)."""
        hold = False                       # renewals "lost on the way" while set

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.faults = {"progress": 1, "mark_writing": 1, "release": 1}

        def _fault(self, name: str) -> None:
            if self.faults.get(name, 0) > 0:
                self.faults[name] -= 1
                raise JobStoreError(f"injected {name} failure")

        def renew(self, owner, live, now=None):
            return set(live) if self.hold else super().renew(owner, live, now)

        def progress(self, *a):
            self._fault("progress")
            return super().progress(*a)

        def mark_writing(self, *a):
            self._fault("mark_writing")
            return super().mark_writing(*a)

        def release(self, *a):
            self._fault("release")
            return super().release(*a)

    store_a = FaultyStore(store_url, lease_s=6.0, max_attempts=4, timeout_s=2.0)
    store_b = JobStore(store_url, lease_s=6.0, max_attempts=4, timeout_s=2.0)
    from PIL import Image

    # local files: the test's own Ray tasks hold no S3 credentials (the service's replicas do)
    Image.fromarray(dub_inputs.face_image(1)).save(tmp_path / "id.png")
    dub_inputs.write_audio(tmp_path / "a20.wav", dub_inputs.speech(20.0, seed=20))
    job = JobRecord(tenant="default", seed=3, items=[
        ItemRecord(item_id=f"r{k}", identity=str(tmp_path / "id.png"), audio=str(tmp_path / "a20.wav"),
                   output=str(tmp_path / "out" / f"r{k}.mp4")) for k in range(2)])
    store_a.create(job)

    async def until(check, what: str, timeout: float = 240.0):
        deadline = time.monotonic() + timeout
        while not (got := await asyncio.to_thread(check)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: " + repr(
                [(i.status, i.lease_owner, i.segments_total, i.reason) for i in store_b.load(job.job_id).items])
            await asyncio.sleep(0.1)
        return got

    async def scenario():
        model = serve.get_deployment_handle("DubbingModel", app_name="dheads")   # on this loop
        a = JobRunner(cfg, model, store_a, ServeMetrics("runner-a"))
        b = JobRunner(cfg, model, store_b, ServeMetrics("runner-b"))
        a.start()
        await until(lambda: all(i.lease_owner == a.owner and i.segments_total > 0
                                for i in store_b.load(job.job_id).items), "runner A running both items")
        store_a.hold = True
        with store_b.db.tx() as c:             # item 1's lease runs out
            c.run("UPDATE dheads_items SET lease_until = 0 WHERE job_id = ? AND idx = 1", (job.job_id,))
        b.start()
        await until(lambda: store_b.load(job.job_id).items[1].lease_owner == b.owner, "the takeover")
        store_a.hold = False
        if store_url.startswith("postgresql"):
            down = threading.Thread(target=request.getfixturevalue("postgres_server").restart, args=(5.0,))
            down.start()
            await asyncio.to_thread(down.join)
        done = await until(lambda: (j := store_b.load(job.job_id)).status.value in (
            "succeeded", "failed", "cancelled") and j, "the job to end")
        # every item task the runners started has ended (a wait on that, not a fixed sleep)
        await until(lambda: not (set(a.tasks) | set(b.tasks)), "the runners' item tasks to end", timeout=60.0)
        live = set(a.tasks) | set(b.tasks)
        await a.stop()
        await b.stop()
        return done, live

    try:
        done, live = asyncio.run(scenario())
    finally:
        store_a.close()
        store_b.close()
    assert [i.status.value for i in done.items] == ["succeeded", "succeeded"], \
        [(i.status, i.reason) for i in done.items]
    assert done.items[1].attempts >= 2 and not live
    check = JobStore(store_url)
    assert not [i for i in check.load(job.job_id).items if i.status.value == "running"]
    check.close()
    assert sorted(os.listdir(tmp_path / "out")) == ["r0.mp4", "r1.mp4"]      # no temporary left
    for k in range(2):
        assert probe(done.items[k].output)["duration_s"] > 19
