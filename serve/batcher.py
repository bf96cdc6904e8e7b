"""A `ContinuousBatcher` stepped by its own thread, for the model deployment.

`submit` from any thread (e.g. the replica's asyncio loop) returns a
`concurrent.futures.Future` of the segment's frames; the thread admits
whatever arrived before each step, so a segment submitted while others are
mid-way joins at the next denoising step.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading

from dheads.platform.dubbing.engine import ContinuousBatcher
from dheads.platform.dubbing.segments import Segment


class BackgroundBatcher:
    def __init__(self, engine: ContinuousBatcher):
        self.engine = engine
        self._cv = threading.Condition()
        self._incoming: list[tuple[Segment, concurrent.futures.Future]] = []
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._stop = False
        # (prefix, steps when asked, future of {"cancelled": n, "steps_waited": k})
        self._cancels: list[tuple[str, int, concurrent.futures.Future]] = []
        self._thread = threading.Thread(target=self._loop, name="dheads-batcher", daemon=True)
        self._thread.start()

    def submit(self, segment: Segment) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._incoming.append((segment, fut))
            self._cv.notify()
        return fut

    def cancel(self, prefix: str) -> concurrent.futures.Future:
        """Drop every segment whose `item_id` starts with `prefix` before the
        next denoising step; the future resolves to how many were dropped and
        how many steps ran between the request and the drop (0 or 1)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._cancels.append((prefix, self.engine.stats.steps, fut))
            self._cv.notify()
        return fut

    def active_items(self) -> set[str]:
        """`item_id`s with a segment queued or in a slot (a snapshot)."""
        with self._cv:
            incoming = [s.item_id for s, _ in self._incoming]
        return set(incoming) | {s.item_id for s in list(self.engine.queue)} | \
            {s.item_id for s in self.engine.in_flight()}

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self.engine.queue)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._incoming or self._cancels or self.engine.busy):
                    self._cv.wait()
                if self._stop:
                    return
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, []
            for prefix, asked_at, done in cancels:
                dropped = 0
                for seg, fut in [x for x in incoming if x[0].item_id.startswith(prefix)]:
                    fut.cancel()
                    dropped += 1
                incoming = [x for x in incoming if not x[0].item_id.startswith(prefix)]
                for seg in self.engine.cancel(lambda s, p=prefix: s.item_id.startswith(p)):
                    with contextlib.suppress(KeyError):
                        self._futures.pop(id(seg)).cancel()
                    dropped += 1
                done.set_result({"cancelled": dropped, "steps_waited": self.engine.stats.steps - asked_at})
            for seg, fut in incoming:
                self._futures[id(seg)] = fut
                self.engine.add(seg)
            try:
                finished = self.engine.step()
            except Exception as e:  # a broken batch fails its segments, never the loop
                for seg in self.engine.in_flight():
                    with contextlib.suppress(KeyError):
                        self._futures.pop(id(seg)).set_exception(e)
                self.engine.reset()
                continue
            for seg, frames in finished:
                self._futures.pop(id(seg)).set_result(frames)


__all__ = ["BackgroundBatcher"]
