import math

import numpy as np
import pytest
import torch

from dheads.model.audio import AudioEncoder, AudioFeatures, feature_shape, to_mono_16k
from dheads.model.config import AudioConfig, AudioEncoderKind


def test_to_mono_16k_resamples_and_mixes():
    sr = 44100
    t = np.arange(sr) / sr
    tone = np.sin(2 * math.pi * 440 * t).astype(np.float32)
    stereo = np.stack([tone, tone])
    out = to_mono_16k(stereo, sr)
    assert out.dtype == torch.float32 and out.shape == (16000,)
    spectrum = torch.fft.rfft(out).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 1  # 1 s of audio: bin = Hz
    assert to_mono_16k(torch.ones(2, 100), 16000).shape == (100,)


def test_log_mel_windows_are_centred_on_frames():
    cfg = AudioConfig()
    assert feature_shape(cfg) == (80, 20)
    wave = torch.zeros(640 * 10)
    k = 4
    wave[640 * k + 320] = 1.0  # an impulse at the centre of frame k
    feats = AudioFeatures(cfg)(wave, 10)
    assert feats.shape == (10, 80, 20) and feats.dtype == torch.float32
    # window k: mel frames centred every 160 samples from 640 k - 1280; the
    # impulse sits at offset 1600 = mel frame 10 (the window centre)
    assert int(feats[k].mean(0).argmax()) == 10
    # the neighbouring window sees it 4 mel frames (one video frame) later
    assert int(feats[k - 1].mean(0).argmax()) == 14
    # short audio is zero-padded: windows past the end are silence
    short = AudioFeatures(cfg)(torch.randn(1000), 10)
    assert torch.allclose(short[-1], torch.full_like(short[-1], -0.25))


def test_raw_windows_for_pretrained_encoders():
    cfg = AudioConfig(encoder=AudioEncoderKind.wav2vec2)
    assert feature_shape(cfg) == (3200,)
    wave = torch.arange(6400, dtype=torch.float32)
    feats = AudioFeatures(cfg)(wave, 10)
    assert feats.shape == (10, 3200)
    assert feats[4, 0] == 640 * 4 - 1280 and feats[4, -1] == 640 * 4 + 1919
    assert (feats[0, :1280] == 0).all()  # silence before the clip


def test_conv_encoder_shapes():
    cfg = AudioConfig(n_mels=40, embed_dim=64)
    enc = AudioEncoder(cfg)
    assert enc(torch.randn(3, 5, 40, 20)).shape == (3, 5, 64)
    with pytest.raises(ValueError):
        enc(torch.randn(3, 5, 80, 20))


def test_wav2vec2_weights_load_from_a_user_file(tmp_path):
    import torchaudio
    from safetensors.torch import save_file

    ref = torchaudio.models.wav2vec2_base()  # random init, nothing downloaded
    weights = tmp_path / "w2v.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    enc = AudioEncoder(AudioConfig(encoder=AudioEncoderKind.wav2vec2, encoder_weights=str(weights),
                                   embed_dim=32))
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.net.backbone.state_dict()[k], v), k
    with torch.no_grad():
        assert enc(torch.randn(1, 2, 3200)).shape == (1, 2, 32)
    # a pickle is not accepted as encoder weights
    bad = tmp_path / "w2v.pt"
    torch.save(ref.state_dict(), bad)
    with pytest.raises(ValueError, match="safetensors"):
        AudioEncoder(AudioConfig(encoder=AudioEncoderKind.wav2vec2, encoder_weights=str(bad)))
