"""`dheads info [model=paper ...]`: one JSON line with the model's size.

Parameters and FLOPs are counted on the meta device (no weights allocated):
FLOPs by torch's FlopCounterMode over one forward at batch 1.
"""
from __future__ import annotations

import json

from dheads.model.flops import build_meta, count_flops, count_params


def run(cfg) -> int:
    m = cfg.model
    info = {
        "preset": m.preset,
        "params": count_params(build_meta(m)),
        "gflops_per_forward": round(count_flops(m, batch=1) / 1e9, 3),
        "image_size": m.image_size,
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "motion": m.motion.describe(),
    }
    print(json.dumps(info), flush=True)
    return 0
