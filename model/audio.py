"""Audio front end: 16 kHz mono, one feature window per video frame, and the
audio encoder that turns each window into an embedding.

Timing (docs/architecture.md): video frame i covers samples [640 i, 640 (i+1)) at
16 kHz / 25 fps. Its feature window is 0.2 s (3,200 samples) centred on the
frame's centre 640 i + 320, i.e. samples [640 i - 1280, 640 i + 1920), zero
(silence) outside the clip.

- encoder `conv` (default): the window is a log-mel spectrogram
  [n_mels, window_s * 16000 / mel_hop] = [n_mels, 20] (25 ms FFT, 10 ms hop),
  encoded by a small 1-D CNN trained jointly with the UNet.
- encoder `wav2vec2` / `hubert`: the window is the raw waveform [3200], encoded
  by the torchaudio base architecture with weights from a safetensors file the
  user gives (never downloaded), then mean-pooled and projected.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import torchaudio  # loads libtorchaudio, compiled against one torch release
except (ImportError, OSError) as _e:  # e.g. "undefined symbol: torch_exception_get_what..."
    raise ImportError(
        f"torchaudio does not load next to torch {torch.__version__} ({_e}). torch and "
        "torchaudio must be one matching release: reinstall from the lock file "
        "(`make install`, i.e. `uv sync --locked`), never with a bare `pip install`.") from _e

from dheads.model.config import AudioConfig, AudioEncoderKind

Wave = Union[torch.Tensor, np.ndarray]

N_FFT = 400  # 25 ms at 16 kHz


def to_mono_16k(wave: Wave, sr: int, target_sr: int = 16000) -> torch.Tensor:
    """Any-rate audio `[C, S]` or `[S]` -> mono float32 `[S']` at 16 kHz
    (channel mean, then torchaudio's band-limited sinc resampling)."""
    x = torch.as_tensor(np.asarray(wave) if isinstance(wave, np.ndarray) else wave)
    x = x.to(torch.float32)
    if x.ndim == 2:
        x = x.mean(dim=0)
    elif x.ndim != 1:
        raise ValueError(f"audio must be [C, S] or [S], got shape {tuple(x.shape)}")
    if sr != target_sr:
        x = torchaudio.functional.resample(x, int(sr), int(target_sr))
    return x.contiguous()


def feature_shape(cfg: AudioConfig) -> tuple:
    """Shape of one per-frame feature window: (n_mels, 20) or (3200,)."""
    if cfg.encoder == AudioEncoderKind.conv:
        return (cfg.n_mels, cfg.window_samples // cfg.mel_hop)
    return (cfg.window_samples,)


def _frame_windows(wave: torch.Tensor, n_frames: int, cfg: AudioConfig) -> torch.Tensor:
    """`[S]` -> `[n_frames, window_samples]` raw windows centred on each frame,
    zero-padded at the clip edges."""
    spf, win = cfg.samples_per_frame, cfg.window_samples
    left = win // 2 - spf // 2  # 1280: from the window start to the frame start
    wave = _fit(wave, n_frames * spf)
    padded = F.pad(wave, (left, win - spf - left))
    return padded.unfold(0, win, spf)[:n_frames]


def _fit(wave: torch.Tensor, n: int) -> torch.Tensor:
    if wave.shape[0] >= n:
        return wave[:n]
    return F.pad(wave, (0, n - wave.shape[0]))


class AudioFeatures:
    """`(wave16k [S], n_frames) -> [n_frames, *feature_shape(cfg)]` float32.

    The log-mel is computed once over the whole clip (centred STFT frames every
    `mel_hop` samples) and then cut into one 20-frame window per video frame,
    so window i holds the mel frames centred at samples
    640 i - 1280 + 160 j, j = 0..19. Values are Whisper-style scaled:
    (log10(max(mel, 1e-5)) + 4) / 4, which puts silence at -0.25 and speech
    around 0..2 without any per-clip statistics (a segment's features do not
    depend on the rest of the clip).
    """

    def __init__(self, cfg: AudioConfig):
        self.cfg = cfg
        self.shape = feature_shape(cfg)
        self.mel = None
        if cfg.encoder == AudioEncoderKind.conv:
            if cfg.window_samples % cfg.mel_hop or cfg.samples_per_frame % cfg.mel_hop:
                raise ValueError("window and frame length must be multiples of mel_hop")
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=cfg.sample_rate, n_fft=N_FFT, hop_length=cfg.mel_hop,
                n_mels=cfg.n_mels, center=True, power=2.0)

    @torch.no_grad()
    def __call__(self, wave16k: Wave, n_frames: int) -> torch.Tensor:
        wave = torch.as_tensor(wave16k, dtype=torch.float32).reshape(-1).cpu()
        if self.mel is None:
            return _frame_windows(wave, n_frames, self.cfg).contiguous()
        cfg = self.cfg
        spf, win, hop = cfg.samples_per_frame, cfg.window_samples, cfg.mel_hop
        left = win // 2 - spf // 2
        wave = F.pad(_fit(wave, n_frames * spf), (left, left))
        mel = self.mel(wave)  # [n_mels, (n_frames*spf + 2 left) / hop + 1]
        logmel = (torch.log10(mel.clamp_min(1e-5)) + 4.0) / 4.0
        per_frame, per_win = spf // hop, win // hop
        # window i starts at mel frame i * per_frame (mel frame j is centred at
        # padded sample j * hop, i.e. original sample j * hop - left)
        windows = logmel.unfold(1, per_win, per_frame)[:, :n_frames]  # [M, n, 20]
        return windows.permute(1, 0, 2).contiguous()


class _ConvEncoder(nn.Module):
    """Log-mel window `[N, n_mels, 20]` -> `[N, embed_dim]`: 1-D convolutions
    over time with the mel bins as channels, then average pooling."""

    def __init__(self, cfg: AudioConfig, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(cfg.n_mels, width, 3, padding=1), nn.SiLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.proj = nn.Linear(width, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.net(x).mean(dim=-1))


class _PretrainedEncoder(nn.Module):
    """Raw window `[N, 3200]` -> `[N, embed_dim]` through torchaudio's
    wav2vec2-base / HuBERT-base, mean-pooled over its ~9 output frames."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        build = (torchaudio.models.wav2vec2_base if cfg.encoder == AudioEncoderKind.wav2vec2
                 else torchaudio.models.hubert_base)
        self.backbone = build()
        if cfg.encoder_weights:
            load_encoder_weights(self.backbone, cfg.encoder_weights)
        dim = self.backbone.encoder.feature_projection.projection.out_features
        self.proj = nn.Linear(dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, _ = self.backbone(x)
        return self.proj(feats.mean(dim=1))


def load_encoder_weights(backbone: nn.Module, path: str) -> None:
    """Load a torchaudio wav2vec2/HuBERT state dict from a safetensors file.

    Only safetensors is accepted (no unpickling); keys must match exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"audio encoder weights {path!r}: not a readable safetensors "
                         f"file ({e})") from e
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"audio encoder weights {path!r} do not fit the "
                         f"{type(backbone).__name__} architecture: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


class AudioEncoder(nn.Module):
    """`[B, W, *feature_shape] -> [B, W, embed_dim]`: one embedding per video
    frame of the audio window (W = 2 m_y + 1 in the UNet)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_shape = feature_shape(cfg)
        self.net = (_ConvEncoder(cfg) if cfg.encoder == AudioEncoderKind.conv
                    else _PretrainedEncoder(cfg))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, w = feats.shape[:2]
        if tuple(feats.shape[2:]) != self.feature_shape:
            raise ValueError(f"audio features must be [B, W, {self.feature_shape}], "
                             f"got {tuple(feats.shape)}")
        out = self.net(feats.reshape(b * w, *self.feature_shape))
        return out.reshape(b, w, -1)
