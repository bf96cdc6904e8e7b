"""Measured peak FLOP/s of this device, for model FLOPs utilisation (MFU).

The peak is what a large dense matmul reaches here, measured once per
(device, dtype, CPU threads) and cached in `~/.cache/dheads/peak_flops.json`
(`DHEADS_CACHE` overrides the folder). Vendor datasheet numbers overstate
what one gets; a measured peak makes MFU comparable across machines.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def cache_file() -> Path:
    root = Path(os.environ.get("DHEADS_CACHE", Path.home() / ".cache" / "dheads"))
    return root / "peak_flops.json"


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}-{torch.get_num_threads()}threads"
    return f"{device.type}:{name}:{str(dtype).removeprefix('torch.')}"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of repeated square matmuls (2 n^3 FLOPs each) over ~`seconds`."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up: kernels chosen, clocks up
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        for _ in range(4):
            a @ b
        iters += 4
        sync()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return 2.0 * n ** 3 * iters / dt


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The cached measured peak of `device` in `dtype`, measuring it on first use."""
    path = cache_file()
    key = device_key(device, dtype)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    value = measure_matmul_flops(device, dtype)
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still gets a measured value, just not cached
    return value
