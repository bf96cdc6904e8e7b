"""Memory of the ingress under a 2 GB chunked upload (issue 12): the
multipart body streams to a temporary file with a running count, so the
ingress replica's resident memory grows by at most 100 MB and comes back.
Real Ray Serve over HTTP; RSS read from /proc/<pid>/status (what psutil
reads) for the ingress replica and, for the record, Serve's HTTP proxy.
Prints the figures (docs/readme/issue12_serve.md quotes them)."""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest

from dheads.platform.config import compose

MB = 1 << 20
UPLOAD_MB = 2048


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids(title: bytes) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if title in Path(f"/proc/{d}/cmdline").read_bytes():
                    out.append(int(d))
            except OSError:
                pass
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(pid)


@pytest.mark.slow
def test_a_2gb_chunked_upload_keeps_the_ingress_small(ray_session, tmp_path, dub_inputs, capsys):
    from ray import serve

    from dheads.serve import app

    token = "memory-test-" + uuid.uuid4().hex
    port = _free_port()
    ckpt = dub_inputs.tiny_checkpoint(tmp_path / "ckpt")
    cfg = compose("serve", [
        f"checkpoint={ckpt}", "sampler.steps=ddim2", f"serve.port={port}", f"serve.token={token}",
        "blocking=false", f'serve.allowed_uris=["{tmp_path}/out"]', f"serve.job_store={tmp_path}/state",
        f"serve.output_dir={tmp_path}/out", f"serve.max_upload_mb={UPLOAD_MB + 16}",
        "serve.max_audio_s=30", "dub.num_threads=1",
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1"])
    app.run(cfg)
    try:
        [ingress] = _pids(b"ServeReplica:dheads:DubbingAPI")
        proxy = _pids(b"ProxyActor")
        wav = tmp_path / "a.wav"
        dub_inputs.write_audio(wav, dub_inputs.speech(1.0))
        boundary = "memtest" + uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"identity\"; filename=\"id.png\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n"
                "Content-Type: audio/wav\r\n\r\n").encode() + wav.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        baseline = _rss_mb(ingress)
        proxy_base = {p: _rss_mb(p) for p in proxy}
        peak, proxy_peak, stop = [baseline], dict(proxy_base), threading.Event()

        def sample():
            while not stop.wait(0.05):
                peak.append(_rss_mb(ingress))
                for p in proxy:
                    proxy_peak[p] = max(proxy_peak[p], _rss_mb(p))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"\0" * MB
        for piece in [head, *([chunk] * UPLOAD_MB), tail]:
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        after = _rss_mb(ingress)
        stop.set()
        sampler.join()
        assert resp.status == 202, body
        upload = Path(tmp_path / "state" / "uploads" / body["job_id"] / "identity.png")
        assert upload.stat().st_size == UPLOAD_MB * MB       # all 2 GB arrived, on disk
        figures = {"upload_mb": UPLOAD_MB, "ingress_rss_baseline_mb": round(baseline, 1),
                   "ingress_rss_peak_mb": round(max(peak), 1),
                   "ingress_rss_growth_mb": round(max(peak) - baseline, 1),
                   "ingress_rss_after_mb": round(after, 1),
                   "proxy_rss_growth_mb": round(max((proxy_peak[p] - proxy_base[p] for p in proxy), default=0), 1),
                   "samples": len(peak)}
        with capsys.disabled():
            print("\nupload memory:", json.dumps(figures))
        assert max(peak) - baseline <= 100, figures
        assert after - baseline <= 100, figures
    finally:
        serve.delete(app.APP_NAME)
        serve.shutdown()
