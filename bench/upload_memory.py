"""Ingress memory under a large chunked multipart upload (issue 12).

    python bench/upload_memory.py [--upload-mb 2048] [--smoke]

Runs against real Ray Serve on 127.0.0.1, each a multipart job whose
identity part is `--upload-mb` MB sent with `Transfer-Encoding: chunked`
(no Content-Length, so nothing can be refused before reading):

- `serve_port`: sent to the Serve HTTP port. While the upload listener runs
  (`serve.upload_port`, the default), that route refuses multipart before
  reading the body (421, naming the listener).
- `refused`: sent to the upload listener with the default
  `serve.max_upload_mb` (50): 413 at the limit, counted as the body streams.
- `admitted`: the upload listener with the limit raised above the upload:
  all of it lands in the uploads folder (checked on disk), 202.

For each: resident memory (VmRSS from /proc, sampled every 50 ms) of the
ingress replica and of Serve's HTTP proxy, baseline (after one warm-up job
of 1 MB) / peak / after.

Why a listener of its own (`serve/listener.py`): Ray Serve's HTTP path has
no request-body backpressure (the proxy drains the socket into an unbounded
queue, the replica pulls everything queued into another), so through the
Serve port a fast client put +1.16 GB of a 2 GB upload in the ingress. The
listener is uvicorn in the ingress replica itself, which stops reading the
socket while 64 KB wait; dheads' parser writes each chunk to disk.

`--smoke` (the test suite): 24 MB, a 4 MB limit for `refused`.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import uuid
from pathlib import Path

MB = 1 << 20
RUN_KEYS = ("status", "port", "upload_mb", "limit_mb", "ingress_rss_baseline_mb", "ingress_rss_peak_mb",
            "ingress_rss_growth_mb", "ingress_rss_after_mb", "proxy_rss_growth_mb", "samples")
JSON_KEYS = ("bench", "upload_mb", "cpu_count", "smoke",
             *(f"{run}.{k}" for run in ("serve_port", "refused", "admitted") for k in RUN_KEYS))


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
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _upload(port: int, token: str, upload_mb: int, wav: bytes) -> tuple[int, dict]:
    boundary = "bench" + uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"identity\"; filename=\"id.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + wav + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    conn.putrequest("POST", "/v1/jobs")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"\0" * MB
    try:
        for piece in [head, *([chunk] * upload_mb), tail]:
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass                      # the service answered (413) and closed before the end
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def measure(tmp: Path, ckpt: str, ports: tuple[int, int], upload_mb: int, limit_mb: float, wav: bytes,
            targets: tuple[bool, ...] = (False,)) -> list[dict]:
    """One deployment with `serve.max_upload_mb = limit_mb`; one upload per
    target (True: to the Serve port, False: to the upload listener)."""
    from ray import serve

    from dheads.platform.config import compose
    from dheads.serve import app

    token = "bench-upload-" + uuid.uuid4().hex
    cfg = compose("serve", [
        f"checkpoint={ckpt}", "sampler.steps=ddim2", f"serve.port={ports[0]}", f"serve.upload_port={ports[1]}",
        f"serve.token={token}",
        "blocking=false", f'serve.allowed_uris=["{tmp}/out"]', f"serve.job_store={tmp}/state-{limit_mb}",
        f"serve.output_dir={tmp}/out", f"serve.max_upload_mb={limit_mb}", "dub.num_threads=1",
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1"])
    app.run(cfg)
    try:
        [ingress] = _pids(b"ServeReplica:dheads:DubbingAPI")
        proxy = _pids(b"ProxyActor")
        # one 1 MB job through the listener first: the baseline then includes what the
        # first submission loads once (media probes, imports), not just an idle replica
        warm, _ = _upload(ports[1], token, 1, wav)
        if warm != 202:
            raise SystemExit(f"warm-up upload answered {warm}")
        return [_one(tmp, ports, token, ingress, proxy, upload_mb, limit_mb, wav, t) for t in targets]
    finally:
        serve.delete(app.APP_NAME)


def _one(tmp: Path, ports: tuple[int, int], token: str, ingress: int, proxy: list[int], upload_mb: int,
         limit_mb: float, wav: bytes, to_serve_port: bool) -> dict:
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
    port = ports[0] if to_serve_port else ports[1]
    status, body = _upload(port, token, upload_mb, wav)
    stop.wait(1.0)                                   # let the replica settle
    after = _rss_mb(ingress)
    stop.set()
    sampler.join()
    if status == 202:
        upload = tmp / f"state-{limit_mb}" / "uploads" / body["job_id"] / "identity.png"
        if upload.stat().st_size != upload_mb * MB:
            raise SystemExit(f"upload incomplete on disk: {upload.stat().st_size} bytes")
    elif status != (421 if to_serve_port else 413):
        raise SystemExit(f"unexpected answer {status}: {body}")
    return {"status": status, "port": "serve" if to_serve_port else "upload", "upload_mb": upload_mb, "limit_mb": limit_mb,
            "ingress_rss_baseline_mb": round(baseline, 1), "ingress_rss_peak_mb": round(max(peak), 1),
            "ingress_rss_growth_mb": round(max(peak) - baseline, 1),
            "ingress_rss_after_mb": round(after, 1),
            "proxy_rss_growth_mb": round(max((proxy_peak[p] - proxy_base[p] for p in proxy), default=0), 1),
            "samples": len(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upload-mb", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny inputs (the test suite)")
    args = ap.parse_args()
    refused_limit = 4.0 if args.smoke else 50.0
    if args.smoke:
        args.upload_mb = 24

    import ray
    from ray import serve

    from _dubbing import free_port, speech, tiny_checkpoint, write_wav

    tmp = Path(tempfile.mkdtemp(prefix="dheads-bench-upload-"))
    ckpt = str(tiny_checkpoint(tmp / "ckpt"))
    write_wav(tmp / "a.wav", speech(1.0))
    wav = (tmp / "a.wav").read_bytes()
    ports = (free_port(), free_port())   # one Serve instance: its HTTP port, the upload listener's
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = {"bench": "upload_memory", "upload_mb": args.upload_mb, "cpu_count": os.cpu_count(),
               "smoke": args.smoke,
               }
        out["serve_port"], out["refused"] = measure(tmp, ckpt, ports, args.upload_mb, refused_limit, wav,
                                                    targets=(True, False))
        [out["admitted"]] = measure(tmp, ckpt, ports, args.upload_mb, args.upload_mb + 16, wav)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
