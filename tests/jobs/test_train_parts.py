"""The training job's parts without Ray: LR schedule, EMA, the step's
determinism, the CSV/loss-curve logbook, Prometheus gauges, the peak cache."""
from __future__ import annotations

import math
import urllib.request

import pytest
import torch


def test_lr_warms_up_linearly_then_follows_cosine_or_stays_constant():
    from dheads.jobs.training.schedule import learning_rate

    lrs = [learning_rate(s, 1.0, 4, 14, "cosine") for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[9], 0.5) and lrs[-1] < 0.03
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert [learning_rate(s, 1.0, 2, 10, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        learning_rate(0, 1.0, 0, 10, "linear")


def _ema_from_zero_to_one(rate: float):
    """An EMA taken of zero weights, after which the weights become one."""
    from dheads.jobs.training.ema import EMA

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, rate=rate)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model, ema


def test_ema_moves_towards_the_weights_at_its_rate():
    model, ema = _ema_from_zero_to_one(0.9)
    # late steps: the configured rate
    ema.update(1000)
    ema.update(1001)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1 - 0.9 ** 2))
    assert ema.full_state(model)["weight"].dtype == torch.float32


def test_ema_warms_up_so_a_short_run_is_not_the_random_init():
    _, ema = _ema_from_zero_to_one(0.999)
    assert ema.decay(0) == pytest.approx(0.1)
    for step in range(300):
        ema.update(step)
    # with a constant 0.999 only 1 - 0.999**300 = 26 % of the weights would be in
    assert ema.shadow["weight"].min().item() > 0.999


@pytest.fixture
def deterministic_torch():
    """Bit-for-bit comparison of two runs in this process is sound by
    construction: one intra-op thread (no reduction split whose order depends
    on the core count) and deterministic algorithms, on any CPU."""
    old, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.set_num_threads(old)


def test_train_step_is_a_pure_function_of_seed_step_and_rank(deterministic_torch):
    from dheads.jobs.training.loop import step_generator, train_step
    from dheads.model.diffusion import GaussianDiffusion
    from dheads.model.flops import example_inputs
    from dheads.model.unet import DiffusedHeads
    from dheads.platform.config import compose

    job = compose("train", ["model=tiny", "model.image_size=32"])
    _, _, identity, motion, audio = example_inputs(job.model, batch=2)
    g = torch.Generator().manual_seed(0)
    batch = {"target": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
             "identity": identity, "motion": motion, "audio": torch.randn(audio.shape, generator=g),
             "mouth_box": torch.tensor([[8.0, 16, 24, 28]] * 2)}

    def one_step(step: int) -> dict:
        torch.manual_seed(0)
        model = DiffusedHeads(job.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = train_step(model, GaussianDiffusion(job.diffusion), opt, batch, 1e-3, 1.0,
                         step_generator(0, step, 0, torch.device("cpu")))
        return {k: float(v) for k, v in out.items()}

    a, b, c = one_step(7), one_step(7), one_step(8)
    assert a == b and a != c
    assert set(a) == {"loss", "loss_simple", "loss_vlb", "loss_ls", "loss_eye", "grad_norm"}
    assert a["grad_norm"] > 0


def test_logbook_writes_csv_and_png_and_cuts_at_the_resume_step(tmp_path):
    from dheads.jobs.training.logbook import Logbook
    from dheads.platform.config import StorageConfig

    row = dict(epoch=0, loss_simple=1.0, loss_vlb=0.01, loss_ls=1.2, grad_norm=1.0, lr=1e-4,
               samples_per_s=10.0, iter_time_s=0.1, step_time_s=0.1, data_s=0.0, mfu=0.1)
    book = Logbook(str(tmp_path), StorageConfig(), resume_step=0)
    for step in range(1, 6):
        book.append({**row, "step": step, "loss": 1.0 / 3 ** step})
    book.flush()
    book.close()
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    resumed = Logbook(str(tmp_path), StorageConfig(), resume_step=3)
    assert [r["step"] for r in resumed.rows] == [1, 2, 3]
    assert resumed.rows[2]["loss"] == 1.0 / 27  # every bit survives the CSV
    resumed.close()


def test_training_gauges_are_served_for_prometheus():
    from dheads.platform import metrics

    metrics.TrainingGauges("unit").update({"loss": 0.5, "mfu": 0.25, "step": 3})
    port = metrics.serve(0, addr="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'dheads_train_loss{run="unit"} 0.5' in text
    assert 'dheads_train_mfu{run="unit"} 0.25' in text


def test_peak_flops_is_measured_once_and_cached(tmp_path, monkeypatch):
    from dheads.platform import peak

    monkeypatch.setenv("DHEADS_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda d, t: calls.append(1) or 1.5e9)
    assert peak.peak_flops(torch.device("cpu")) == 1.5e9
    assert peak.peak_flops(torch.device("cpu")) == 1.5e9
    assert calls == [1] and (tmp_path / "peak_flops.json").exists()


def test_relative_paths_are_pinned_in_the_driver(tmp_path, monkeypatch):
    """Workers run elsewhere: run folder, shards and val travel as absolute paths."""
    import pytest

    from dheads.jobs.train import pin_paths
    from dheads.platform.config import ConfigError, compose

    monkeypatch.chdir(tmp_path)
    (tmp_path / "val").mkdir()
    cfg = compose("train", ["trainer.storage_path=runs", "data.shards=shards", "val=val",
                            "trainer.sample_every=0"])
    pinned = pin_paths(cfg)
    assert pinned.trainer.storage_path == str(tmp_path / "runs")
    assert pinned.data.shards == str(tmp_path / "shards")
    assert pinned.val == str(tmp_path / "val")
    with pytest.raises(ConfigError, match="no videos"):
        pin_paths(compose("train", ["val=val", "trainer.sample_every=10"]))
