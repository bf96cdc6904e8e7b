import dataclasses

import pytest
import torch

from dheads.model.flops import build_meta, count_flops, count_params, example_inputs
from dheads.model.unet import DiffusedHeads

# Measured with this implementation (meta device, FlopCounterMode, batch 1).
PAPER_PARAMS = 204_441_094      # 203.92 M UNet + 0.52 M audio encoder
PAPER_FLOPS = 996_557_684_736   # ≈ 1.0 TFLOP


def test_paper_preset_matches_the_official_size(load_preset):
    cfg = load_preset("paper")
    assert (cfg.image_size, cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks) == \
        (128, 256, [1, 2, 3], 2)
    assert cfg.attention_resolutions == []  # middle block only (the paper)
    params = count_params(build_meta(cfg))
    assert params == PAPER_PARAMS
    assert abs(params - 204e6) / 204e6 < 0.02
    flops = count_flops(cfg)
    assert flops == pytest.approx(PAPER_FLOPS, rel=1e-3)
    assert abs(flops - 1.0e12) / 1.0e12 < 0.05


def test_attention_resolutions_add_attention_layers(load_preset):
    cfg = load_preset("paper")
    with_32 = dataclasses.replace(cfg, attention_resolutions=[4])  # official training config
    extra = count_params(build_meta(with_32)) - PAPER_PARAMS
    # 2 input + 3 output blocks at the 768-channel level: qkv, proj and GroupNorm each
    assert extra == 5 * (768 * 3 * 768 + 3 * 768 + 768 * 768 + 768 + 2 * 768)


def test_tiny_forward_shapes(tiny_cfg):
    model = DiffusedHeads(tiny_cfg)
    assert 1e6 < count_params(model) < 5e6
    x_t, t, identity, motion, audio = example_inputs(tiny_cfg, batch=2)
    assert audio.shape == (2, 5, 40, 20)
    out = model(torch.randn_like(x_t), torch.tensor([3, 999]), identity, motion, audio)
    assert out.shape == (2, 6, 64, 64)


def test_blocks_partition_the_parameters(tiny_cfg):
    model = DiffusedHeads(tiny_cfg)
    seen = set()
    for block in model.blocks():
        ids = {id(p) for p in block.parameters()}
        assert not ids & seen, "blocks overlap"
        seen |= ids
    # the embeddings and the output head stay with the root module (the preset
    # feeds the motion-frame noise σ and the eye openness through their own embeddings)
    assert model.motion_noise_embed is not None and model.eye_embed is not None
    root = {id(p) for m in (model.time_embed, model.audio_embed, model.motion_noise_embed,
                            model.eye_embed, model.out)
            for p in m.parameters()}
    assert seen | root == {id(p) for p in model.parameters()}
    assert len(list(model.blocks())) == len(model.input_blocks) + len(model.output_blocks) + 2
