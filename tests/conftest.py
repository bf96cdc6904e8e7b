"""Shared fixtures: one local Ray instance per session, and an S3 endpoint
(moto_server over HTTP on 127.0.0.1) started and killed by the tests."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_BENCH_MODULES: dict = {}


def bench_file(name: str):
    """`bench/<name>.py` as a module, imported once: the helpers the tests
    share with the benchmarks (`_paths`, `_dubbing`) are written there only."""
    if name not in _BENCH_MODULES:
        spec = importlib.util.spec_from_file_location(f"bench_shared_{name.lstrip('_')}", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _BENCH_MODULES[name] = module
    return _BENCH_MODULES[name]


# The benchmark set sits beside the work tree (../shared/benchmark); a clone
# elsewhere finds it through DHEADS_BENCHMARK or the workplace's /work/shared.
_CANDIDATES = bench_file("_paths").candidates()
BENCHMARK = bench_file("_paths").find_benchmark() or _CANDIDATES[0].resolve()


# The slow tier: what starts a Ray cluster beyond the one session, Serve, a
# training run or a benchmark (`make test-fast` leaves it out; `make test`
# runs everything). Paths relative to tests/; a file, or a folder with "/".
SLOW = ("serve/", "infra/", "bench/test_smoke.py", "jobs/test_dub.py", "jobs/test_dub_bad_inputs.py",
        "jobs/test_preprocess_kill.py", "jobs/test_preprocess_bad_inputs.py", "jobs/test_train.py",
        "jobs/test_train_gpu.py", "model/test_overfit.py", "platform/test_cluster.py", "platform/test_submit.py", "test_layout.py")


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).resolve().parent
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(root).as_posix()
        if any(rel.startswith(p) if p.endswith("/") else rel == p for p in SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a free TCP port of 127.0.0.1 (the one helper
    for every test and benchmark that starts a server: `bench/_dubbing.py`)."""
    return bench_file("_dubbing").free_port


@pytest.fixture(scope="session")
def copy_clips():
    """`copy_clips(split_dir, dest, n)`: the first n clips of a benchmark split
    copied into dest, their manifest rows returned (`bench/_paths.py`)."""
    return bench_file("_paths").copy_clips


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by the whole test session, started with
    retries: on a loaded host the raylet can miss Ray's fixed 30 s
    registration deadline."""
    import ray

    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for it
            ray.shutdown()
            if attempt == 2:
                raise
    # Ray Data's console log handler binds to the sys.stderr of the moment it
    # is imported; imported here (session setup, outside any test's capsys)
    # it never writes into a capture that a finished test has closed.
    import ray.data  # noqa: F401
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto_server on a free port of 127.0.0.1; yields its endpoint URL."""
    port = bench_file("_dubbing").free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env_keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(env_keys)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield endpoint
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto endpoint: yields (bucket name, StorageConfig)."""
    import uuid

    import boto3

    from dheads.platform.config import StorageConfig

    name = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name, StorageConfig(endpoint_url=s3_server)


@pytest.fixture(scope="session")
def benchmark_dir() -> Path:
    if not (BENCHMARK / "val" / "manifest.jsonl").exists():
        # a missing data set must not turn the suite green by skipping
        pytest.fail(f"benchmark set not found (looked in {[str(p) for p in _CANDIDATES]}); "
                    "set DHEADS_BENCHMARK")
    return BENCHMARK


@pytest.fixture(scope="session")
def val_clip(benchmark_dir):
    """`val_clip(stem) -> (frames [T, H, W, 3] uint8, ground-truth JSON dict)`
    of a benchmark val clip, decoded once per session."""
    import json
    from functools import lru_cache

    from dheads.platform.media import read_video

    @lru_cache(maxsize=None)
    def load(stem: str):
        base = benchmark_dir / "val" / stem
        frames = read_video(base.with_suffix(".mp4"), require_audio=False).frames
        return frames, json.loads(base.with_suffix(".json").read_text())
    return load


def make_video(path, n_frames: int = 30, fps: float = 25.0, size: tuple[int, int] = (64, 64),
               audio_rate: int | None = 16000, channels: int = 1, video: bool = True,
               vfr: bool = False, codec: str = "libx264", container: str | None = None):
    """Write a small real media file with PyAV: moving-gradient frames whose
    brightness encodes the frame index, and a tone. `vfr` jitters the frame
    intervals (time base 1/1000). Returns the frames written `[T, H, W, 3]`."""
    from fractions import Fraction

    import av
    import numpy as np

    w, h = size
    rate = Fraction(fps).limit_denominator(1001)
    gx = np.broadcast_to((np.arange(w) * 255 // max(w - 1, 1)).astype(np.uint8)[None, :], (h, w))
    gy = np.broadcast_to((np.arange(h) * 255 // max(h - 1, 1)).astype(np.uint8)[:, None], (h, w))
    frames = None
    if video:
        frames = np.empty((n_frames, h, w, 3), np.uint8)
        for i in range(n_frames):
            frames[i, ..., 0] = gx + np.uint8(7 * i % 256)
            frames[i, ..., 1] = gy
            frames[i, ..., 2] = (i * 37) % 256
    with av.open(str(path), mode="w", format=container) as out:
        vs = None
        if video:
            vs = out.add_stream(codec, rate=1000 if vfr else rate)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            if codec == "libx264":
                vs.options = {"preset": "ultrafast"}
        a_s = None
        if audio_rate:
            a_s = out.add_stream("aac" if not str(path).endswith(".mp3") else "libmp3lame", rate=audio_rate)
            a_s.layout = "mono" if channels == 1 else "stereo"
        if video:
            rng = np.random.default_rng(0)
            t_ms = 0
            for i in range(n_frames):
                vf = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
                if vfr:
                    vf.pts, vf.time_base = t_ms, Fraction(1, 1000)
                    t_ms += int(rng.integers(20, 60))
                else:
                    vf.pts, vf.time_base = i, 1 / rate
                for pkt in vs.encode(vf):
                    out.mux(pkt)
            for pkt in vs.encode():
                out.mux(pkt)
        if a_s is not None:
            dur = n_frames / fps
            n = int(dur * audio_rate)
            t = np.arange(n) / audio_rate
            pcm = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
            fs = a_s.codec_context.frame_size or 1152
            fmt = a_s.codec_context.format.name
            for start in range(0, n, fs):
                chunk = pcm[start:start + fs]
                data = np.repeat(chunk[None], channels, 0)
                if not fmt.endswith("p"):
                    data = data.T.reshape(1, -1)
                if fmt.startswith("s32"):
                    data = data * (2 ** 31 - 1)
                elif fmt.startswith("s16"):
                    data = data * (2 ** 15 - 1)
                dtype = {"s32": np.int32, "s16": np.int16}.get(fmt[:3], np.float32)
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.astype(dtype)), format=fmt,
                                                layout="mono" if channels == 1 else "stereo")
                af.sample_rate, af.pts, af.time_base = audio_rate, start, Fraction(1, audio_rate)
                for pkt in a_s.encode(af):
                    out.mux(pkt)
            for pkt in a_s.encode():
                out.mux(pkt)
    return frames


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Six `dheads synth` clips (64 px) made once per session."""
    from dheads.jobs import synth
    from dheads.platform.config import compose

    out = tmp_path_factory.mktemp("synth")
    synth.run(compose("synth", [f"out={out}", "n=6", "seed=3", "image_size=64", "workers=2"]))
    return out


@pytest.fixture(scope="session")
def video_factory():
    """`make_video(path, ...)` (above) for tests that build their own media files."""
    return make_video


# ------------------------------------------------------------ dubbing inputs
def tiny_checkpoint(path, image_size: int = 16, channels: int | None = 16, seed: int = 0) -> str:
    """bench/_dubbing.py's `tiny_checkpoint` (a random-init shrunk `tiny` model)."""
    return bench_file("_dubbing").tiny_checkpoint(path, image_size, channels, seed)


def speech(seconds: float, seed: int = 0, sample_rate: int = 16000):
    """bench/_dubbing.py's `speech` (speech-like audio with pauses, dheads synth's voice)."""
    return bench_file("_dubbing").speech(seconds, seed, sample_rate)


_AUDIO_CODECS = {".wav": ("wav", "pcm_s16le", "s16"), ".flac": ("flac", "flac", "s16"),
                 ".m4a": ("mp4", "aac", "fltp"), ".mp3": ("mp3", "libmp3lame", "fltp")}


def write_audio(path, audio, sample_rate: int = 16000) -> None:
    """Encode mono float32 audio by the file's extension (.wav .flac .m4a .mp3)."""
    from fractions import Fraction

    import av
    import numpy as np

    fmt, codec, sample_fmt = _AUDIO_CODECS[Path(path).suffix.lower()]
    pcm = np.clip(np.asarray(audio, np.float32), -1, 1)
    if sample_fmt == "s16":
        pcm = (pcm * 32767).astype(np.int16)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sample_rate)
        stream.layout = "mono"
        for start in range(0, len(pcm), 1024):
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + 1024], format=sample_fmt,
                                               layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            frame.time_base = Fraction(1, sample_rate)
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)


@pytest.fixture(scope="session")
def dub_inputs():
    """Synthetic dubbing inputs: `tiny_checkpoint(path, ...)`, `face_image(id, size)`
    (a procedural face), `speech(seconds, seed)`, `write_audio(path, audio)`."""
    from types import SimpleNamespace

    from dheads.jobs.synthface import still_face

    return SimpleNamespace(tiny_checkpoint=tiny_checkpoint, face_image=still_face, speech=speech,
                           write_audio=write_audio)
