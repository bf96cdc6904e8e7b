"""`make demo`: the whole platform end to end on one machine, no GPU.

Stages (each prints a progress line and its wall time):
synth (train + held-out identities) -> preprocess (Ray Data) -> train (tiny
preset, 2 workers, FSDP2) -> export -> serve + dub the held-out identities
with their unseen audio through the HTTP job API -> eval (HTML report).

Every stage is the same `dheads <job> ...` a user runs; here they share one
local Ray instance. Output: `demo_out/` (override with DHEADS_DEMO_OUT).
Environment knobs: DHEADS_DEMO_STEPS (training steps), DHEADS_DEMO_CLIPS.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import requests

from dheads.platform.cli import main as dheads

OUT = Path(os.environ.get("DHEADS_DEMO_OUT", "demo_out")).resolve()
STEPS = int(os.environ.get("DHEADS_DEMO_STEPS", "800"))
CLIPS = int(os.environ.get("DHEADS_DEMO_CLIPS", "48"))
HELD_OUT = 4
PORT = int(os.environ.get("DHEADS_DEMO_PORT", "8123"))


class Stages:
    def __init__(self, names: list[str]):
        self.names, self.times, self.t0 = names, {}, time.time()

    def run(self, name: str, fn) -> None:
        k = self.names.index(name) + 1
        print(f"\n[demo {k}/{len(self.names)}] {name} ...", flush=True)
        t = time.time()
        rc = fn()
        self.times[name] = round(time.time() - t, 1)
        if rc not in (None, 0):
            sys.exit(f"[demo] stage {name!r} failed (exit {rc})")
        print(f"[demo {k}/{len(self.names)}] {name} done in {self.times[name]:.1f} s", flush=True)


def _job(*args: str) -> int:
    return dheads(list(args))


def dub_via_api(token: str) -> int:
    """Start `dheads serve`, submit one job for the held-out clips, poll it."""
    from ray import serve

    rc = _job("serve", f"checkpoint={OUT / 'export'}", f"serve.token={token}",
              f"serve.port={PORT}", f"serve.upload_port={PORT + 1}", f"serve.allowed_uris=[{OUT}/]",
              f"serve.job_store={OUT / 'jobstore'}", f"serve.output_dir={OUT / 'dubbed'}",
              "dub.num_threads=1", "blocking=false")
    if rc:
        return rc
    base, headers = f"http://127.0.0.1:{PORT}", {"Authorization": f"Bearer {token}"}
    manifest = [json.loads(x) for x in (OUT / "heldout" / "manifest.jsonl").read_text().splitlines()]
    items = [{"item_id": m["clip_id"], "identity": str(OUT / "heldout" / m["video"]),
              "audio": str(OUT / "heldout" / m["video"]),
              "output": str(OUT / "dubbed" / m["video"])} for m in manifest]
    r = requests.post(f"{base}/v1/jobs", json={"items": items}, headers=headers, timeout=60)
    r.raise_for_status()
    job_id = r.json()["job_id"]
    print(f"  job {job_id}: {len(items)} items submitted to {base}/v1/jobs", flush=True)
    last = None
    while True:
        view = requests.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
        done = sum(i["segments_done"] for i in view["items"])
        total = sum(i["segments_total"] for i in view["items"])
        line = f"  {view['status']}: segments {done}/{total}, items {view['counts']}"
        if line != last:
            print(line, flush=True)
            last = line
        if view["status"] not in ("queued", "running"):
            break
        time.sleep(2)
    results = requests.get(f"{base}/v1/jobs/{job_id}/results", headers=headers, timeout=30).json()
    serve.shutdown()
    failed = [r for r in results["results"] if r["status"] != "succeeded"]
    for f in failed:
        print(f"  item {f['item_id']} {f['status']}: {f['reason']}")
    return 1 if failed else 0


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    token = secrets.token_urlsafe(32)   # the service refuses tokens under 32 characters
    stages = Stages(["ray", "synth", "preprocess", "train", "export", "serve+dub", "eval"])

    def start_ray():
        from dheads.platform.cluster import connect
        from dheads.platform.config import ClusterConfig
        # 2 training workers (1 CPU each) + Ray Data tasks + Serve replicas
        connect(ClusterConfig(), min_cpus=4)

    stages.run("ray", start_ray)
    stages.run("synth", lambda: _job("synth", f"out={OUT / 'synth'}", f"n={CLIPS}", "seed=1")
               or _job("synth", f"out={OUT / 'heldout'}", f"n={HELD_OUT}", "seed=77", "min_s=3", "max_s=4"))
    stages.run("preprocess", lambda: _job("preprocess", f"input={OUT / 'synth'}",
                                          f"output={OUT / 'shards'}", "model=tiny"))
    stages.run("train", lambda: _job(
        "train", "experiment=demo", "model=tiny", f"data.shards={OUT / 'shards'}",
        f"trainer.storage_path={OUT / 'runs'}", "trainer.name=demo", f"trainer.steps={STEPS}",
        f"trainer.checkpoint_every={max(1, STEPS // 3)}"))
    stages.run("export", lambda: _job("export", f"run={OUT / 'runs' / 'demo'}", f"out={OUT / 'export'}"))
    stages.run("serve+dub", lambda: dub_via_api(token))
    stages.run("eval", lambda: _job("eval", f"generated={OUT / 'dubbed'}",
                                    f"reference={OUT / 'heldout'}", f"out={OUT / 'report'}"))
    summary = {"stage_seconds": stages.times, "total_s": round(time.time() - stages.t0, 1)}
    metrics = OUT / "report" / "metrics.json"
    if metrics.exists():
        summary["metrics"] = json.loads(metrics.read_text()).get("averages")
    (OUT / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n[demo] stage seconds:", json.dumps(stages.times))
    print(f"[demo] report: {OUT / 'report' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
