"""The run folder's human-readable record: `metrics.csv` and `loss_curve.png`.

Written by rank 0. The CSV is kept in a local file and copied to the run
folder (a local path or s3://) at every `flush` (checkpoint steps and the
end); a resumed run starts from the run folder's CSV cut at the step it
resumed from, so the curve has no duplicated or orphaned steps.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

from dheads.platform import storage
from dheads.platform.config import StorageConfig

COLUMNS = ["step", "epoch", "loss", "loss_simple", "loss_vlb", "loss_ls", "loss_eye", "grad_norm", "lr",
           "samples_per_s", "iter_time_s", "step_time_s", "data_s", "mfu"]
CSV_NAME = "metrics.csv"
PNG_NAME = "loss_curve.png"


class Logbook:
    def __init__(self, run_uri: str, storage_cfg: StorageConfig, resume_step: int):
        self.run_uri = run_uri
        self.storage_cfg = storage_cfg
        self._dir = tempfile.mkdtemp(prefix="dheads-logbook-")
        self.rows: list[dict[str, float]] = []
        csv_uri = storage.join(run_uri, CSV_NAME)
        if resume_step > 0 and storage.exists(csv_uri, storage_cfg):
            text = storage.read_bytes(csv_uri, storage_cfg).decode()
            self.rows = [{k: float(v) for k, v in r.items() if v not in ("", None)}
                         for r in csv.DictReader(io.StringIO(text))
                         if int(float(r["step"])) <= resume_step]

    def append(self, row: dict[str, float]) -> None:
        self.rows.append({k: row[k] for k in COLUMNS if k in row})

    def flush(self) -> None:
        csv_path = Path(self._dir, CSV_NAME)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in self.rows:
                # repr keeps every bit of the float: resumed runs compare exactly
                w.writerow({k: repr(r[k]) if isinstance(r.get(k), float) else r.get(k, "")
                            for k in COLUMNS})
        storage.upload_file(csv_path, storage.join(self.run_uri, CSV_NAME), self.storage_cfg)
        if self.rows:
            png_path = Path(self._dir, PNG_NAME)
            plot_losses(self.rows, png_path)
            storage.upload_file(png_path, storage.join(self.run_uri, PNG_NAME), self.storage_cfg)

    def close(self) -> None:
        for p in Path(self._dir).iterdir():
            os.unlink(p)
        os.rmdir(self._dir)


def plot_losses(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("loss_simple", "L_simple"), ("loss_ls", "L_ls"), ("loss_eye", "L_eye")):
        if all(r.get(key, 0) > 0 for r in rows):  # L_eye is 0 without diffusion.lambda_eye
            axes[0].plot(steps, [r[key] for r in rows], label=label, lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(steps, [r["loss_vlb"] for r in rows], lw=1, color="tab:red")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_title("L_vlb (bits/dim)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
