"""What rank 0 does besides training: throughput and MFU, Prometheus gauges,
the CSV + loss curve, sample videos and the final export."""
from __future__ import annotations

import logging

import torch

from dheads.jobs.training.logbook import Logbook
from dheads.platform import metrics as prom
from dheads.platform.config import TrainJob
from dheads.platform.peak import peak_flops

log = logging.getLogger(__name__)


class RankZeroReporter:
    def __init__(self, job: TrainJob, run_uri: str, rank: int, world: int, device: torch.device,
                 forward_flops_per_sample: int, resume_step: int):
        self.job, self.run_uri, self.world, self.device = job, run_uri, world, device
        # fwd + bwd ~ 3 forwards (the backward computes two matmuls per forward one)
        self.train_flops_per_sample = 3 * forward_flops_per_sample
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.peak = peak_flops(device, dtype)
        self.gauges = prom.TrainingGauges(job.trainer.name)
        if job.trainer.metrics_port is not None:
            port = prom.serve(job.trainer.metrics_port, job.trainer.metrics_host)
            log.info("Prometheus metrics at %s:%d/metrics", job.trainer.metrics_host, port)
        self.logbook = Logbook(run_uri, job.storage, resume_step)
        self._val = None
        self._plain = None

    def log(self, metrics: dict[str, float]) -> None:
        """Adds samples/s and MFU to `metrics` (in place), then records them."""
        samples_per_s = metrics["global_batch"] / max(metrics["iter_time_s"], 1e-9)
        metrics["samples_per_s"] = samples_per_s
        metrics["mfu"] = self.train_flops_per_sample * samples_per_s / (self.world * self.peak)
        self.gauges.update(metrics)
        self.logbook.append(metrics)
        if self.job.trainer.pushgateway and metrics["step"] % self.job.trainer.checkpoint_every == 0:
            prom.push(self.job.trainer.pushgateway, job=f"dheads-train-{self.job.trainer.name}")

    def flush(self) -> None:
        self.logbook.flush()

    def _plain_model(self, full_state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """An unsharded copy of the network holding `full_state` (EMA weights)."""
        from dheads.model.unet import DiffusedHeads

        if self._plain is None:
            self._plain = DiffusedHeads(self.job.model).to(self.device).eval()
        self._plain.load_state_dict(full_state)
        return self._plain

    def write_samples(self, full_state: dict[str, torch.Tensor]) -> None:
        from dheads.jobs.training.samples import load_val_clips, write_samples

        tc = self.job.trainer
        if self._val is None:
            self._val = load_val_clips(self.job.val, tc.sample_clips, tc.sample_frames,
                                       self.job.model, self.job.storage)
        step = int(self.logbook.rows[-1]["step"]) if self.logbook.rows else 0
        uris = write_samples(self._plain_model(full_state), self.job.diffusion, self.job.sampler,
                             self._val, self.run_uri, step, self.job.storage, seed=tc.seed)
        log.info("sample videos: %s", uris)

    def export(self, full_state: dict[str, torch.Tensor]) -> None:
        from dheads.jobs.export import write_export
        from dheads.platform import storage

        out = storage.join(self.run_uri, "export")
        write_export(self._plain_model(full_state).cpu(), self.job.model, self.job.diffusion,
                     out, self.job.storage)
        self._plain = None
        log.info("exported EMA weights to %s", out)

    def close(self) -> None:
        self.logbook.flush()
        self.logbook.close()
