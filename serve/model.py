"""The model deployment `DubbingModel`: segments in, frames out.

Each replica holds one `ContinuousBatcher` (a slot pool of `dub.batch_size`
segments) stepped by a background thread (`serve/batcher.py`).
`@serve.batch` admits requests in batches; up to `max_concurrent_batches`
admission batches are in flight at once, all feeding the same slot pool, so
a segment arriving while others are mid-way joins at the next denoising
step (continuous batching) instead of waiting for a whole batch to drain.
A replica does nothing but sampling: decoding and encoding run in Ray tasks
(`serve/runner.py`).
"""
from __future__ import annotations

import asyncio
import time

from ray import serve

from dheads.platform.config import ServeJob
from dheads.platform.dubbing.engine import build_engine
from dheads.platform.dubbing.segments import Segment
from dheads.serve.batcher import BackgroundBatcher

# Decoration-time upper bounds; the configured values are applied per replica.
MAX_BATCH_SIZE = 64
MAX_CONCURRENT_BATCHES = 4


@serve.deployment
class DubbingModel:
    def __init__(self, cfg: ServeJob):
        engine = build_engine(cfg.checkpoint, cfg.sampler, cfg.dub, cfg.storage)
        self.image_size = engine.image_size
        self.batcher = BackgroundBatcher(engine)
        self.generate.set_max_batch_size(min(cfg.serve.max_batch_size, MAX_BATCH_SIZE))
        self.generate.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.05,
                 max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def generate(self, segments: list[Segment]) -> list[dict]:
        """`[Segment]` -> `[{frames [T, H, W, 3] uint8, seconds, batch_sizes} | {error}]`."""
        t0 = time.perf_counter()
        futures = [asyncio.wrap_future(self.batcher.submit(s)) for s in segments]
        results = await asyncio.gather(*futures, return_exceptions=True)
        batch_sizes = self.batcher.engine.stats.drain_batch_sizes()
        out = []
        for r in results:
            if isinstance(r, BaseException):
                out.append({"error": f"{type(r).__name__}: {r}"})
            else:
                out.append({"frames": r, "seconds": time.perf_counter() - t0,
                            "batch_sizes": batch_sizes})
                batch_sizes = {}
        return out

    async def cancel(self, prefix: str) -> dict:
        """Drop this replica's segments whose `item_id` starts with `prefix`
        (the runner names them `<job_id>/<item>`) before its next denoising
        step: `{"cancelled": n, "steps_waited": 0 or 1, "replica": id}`."""
        out = await asyncio.wrap_future(self.batcher.cancel(prefix))
        return {**out, "replica": serve.get_replica_context().replica_id.unique_id}

    def active_items(self) -> list[str]:
        """`item_id`s with a segment queued or generating on this replica."""
        return sorted(self.batcher.active_items())

    def info(self) -> dict:
        """Replica identity (for operators and tests) and engine statistics."""
        import ray

        rt = ray.get_runtime_context()
        s = self.batcher.engine.stats
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "actor_name": rt.get_actor_name(), "namespace": rt.namespace,
                "image_size": self.image_size, "unet_s": s.unet_s, "wall_s": s.wall_s, "cpu_s": s.cpu_s,
                "steps": s.steps, "frames": s.frames, "segments": s.segments,
                "queue_depth": self.batcher.queue_depth}

    def __del__(self):
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()
