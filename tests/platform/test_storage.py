import os
from pathlib import Path

import pytest

from dheads.platform import storage


def test_local_roundtrip_atomic(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.list_files(str(tmp_path)) == [uri]  # no temporary left behind


def test_s3_roundtrip(s3_bucket):
    bucket, cfg = s3_bucket
    uri = f"s3://{bucket}/x/y z é.bin"
    storage.write_bytes(uri, b"abc", cfg)
    assert storage.exists(uri, cfg)
    assert storage.read_bytes(uri, cfg) == b"abc"
    assert storage.list_files(f"s3://{bucket}/x", (".bin",), cfg) == [uri]
    with storage.local_path(uri, cfg) as p:
        assert open(p, "rb").read() == b"abc"
    storage.delete(uri, cfg)
    assert not storage.exists(uri, cfg)


def test_s3_inputs_are_size_checked_and_streamed_in_flat_memory(s3_bucket, tmp_path):
    import json
    import os
    import subprocess
    import sys

    import pytest

    bucket, cfg = s3_bucket
    big = tmp_path / "big.bin"
    # 128 MB, written without holding it: big enough that reading it whole
    # would show in the peak RSS (the bound below is 48 MB), small enough for
    # the S3 server to take quickly
    with open(big, "wb") as f:
        for _ in range(128):
            f.write(os.urandom(1 << 20))
    uri = f"s3://{bucket}/in/big.bin"
    storage.upload_file(big, uri, cfg)
    assert storage.size(uri, cfg) == 128 << 20
    with pytest.raises(storage.TooLarge, match="the file is 128 MB, over the limit of 64 MB"):
        with storage.local_path(uri, cfg, max_bytes=64 << 20):
            raise AssertionError("opened")
    # the whole object through local_path (and the upload above) in a fresh
    # process: peak RSS beside the same process reading a 1 MB object
    storage.write_bytes(f"s3://{bucket}/in/small.bin", os.urandom(1 << 20), cfg)
    code = ("import json, os, resource, sys\nfrom dheads.platform import storage\n"
            "from dheads.platform.config import StorageConfig\n"
            "cfg = StorageConfig(endpoint_url=sys.argv[2])\n"
            "with storage.local_path(sys.argv[1], cfg) as p:\n    n = os.path.getsize(p)\n"
            "print(json.dumps([n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))")

    def peak(u):
        out = subprocess.run([sys.executable, "-c", code, u, cfg.endpoint_url], check=True,
                             capture_output=True, text=True, env={**os.environ, **storage.s3_env(cfg)})
        return json.loads(out.stdout)

    (n, rss), (_, base) = peak(uri), peak(f"s3://{bucket}/in/small.bin")
    assert n == 128 << 20
    assert rss - base < 48, (rss, base)     # MB, for a 128 MB object


# ---------------------------------------------------------------- durability
def _write_both(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"model")
    storage.write_bytes(str(tmp_path / "new" / "dir" / "a.bin"), b"hello")
    storage.upload_file(src, str(tmp_path / "new" / "dir" / "b.bin"))


def test_local_writes_fsync_the_file_before_and_the_directory_after_the_rename(tmp_path, monkeypatch):
    """The real os calls, recorded in order: fsync(tmp) < rename(tmp -> dst) <
    fsync(dst's directory), and the directories the write created are synced
    into their parents."""
    import os
    from pathlib import Path

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).resolve()))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", Path(a).resolve(), Path(b).resolve()))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _write_both(tmp_path)
    d = (tmp_path / "new" / "dir").resolve()
    for name in ("a.bin", "b.bin"):
        i = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == d / name)
        tmp = events[i][1]
        assert tmp.parent == d and tmp.name.startswith("_tmp.")
        assert ("fsync", tmp) in events[:i]
        assert ("fsync", d) in events[i + 1:]
    assert ("fsync", d.parent) in events and ("fsync", d.parent.parent) in events
    assert (d / "a.bin").read_bytes() == b"hello" and (d / "b.bin").read_bytes() == b"model"
    assert sorted(p.name for p in d.iterdir()) == ["a.bin", "b.bin"]


def test_local_writes_fsync_as_seen_by_the_kernel(tmp_path):
    """The same order observed with strace: no Python-level stand-ins."""
    import re
    import shutil
    import subprocess
    import sys

    import pytest

    if not shutil.which("strace"):
        pytest.skip("strace not installed")
    code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); "
            "from test_storage import _write_both; _write_both(pathlib.Path(sys.argv[2]))")
    log = tmp_path / "strace.txt"
    proc = subprocess.run(["strace", "-f", "-y", "-qq", "-o", str(log),
                           "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                           sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"ptrace not permitted here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    calls = [ln.split(None, 1)[1] for ln in log.read_text().splitlines() if "(" in ln]
    d = str((tmp_path / "new" / "dir").resolve())
    for name in ("a.bin", "b.bin"):
        i = next(i for i, c in enumerate(calls) if c.startswith("rename") and f'{d}/{name}"' in c)
        tmp = re.search(r'"([^"]*_tmp\.[^"]*)"', calls[i]).group(1)
        assert any(c.startswith("fsync(") and f"<{tmp}>" in c for c in calls[:i]), calls
        assert any(c.startswith("fsync(") and f"<{d}>" in c for c in calls[i + 1:]), calls


def test_a_folder_is_downloaded_whole_or_by_name_and_a_missing_file_fails_with_its_uri(s3_bucket, tmp_path):
    bucket, cfg = s3_bucket
    files = {"job.json": b"{}", ".metadata": b"m" * 3, "__0_0.distcp": os.urandom(3 << 20)}
    for name, data in files.items():
        storage.write_bytes(f"s3://{bucket}/run/step_1/{name}", data, cfg)
    storage.write_bytes(f"s3://{bucket}/run/step_1/sub/x.bin", b"nested", cfg)
    storage.write_bytes(f"s3://{bucket}/run/step_10/job.json", b"another step", cfg)
    whole = storage.download_dir(f"s3://{bucket}/run/step_1", tmp_path / "whole", cfg)
    got = {str(p.relative_to(whole)): p.read_bytes() for p in Path(whole).rglob("*") if p.is_file()}
    assert got == {**files, "sub/x.bin": b"nested"}           # a prefix is a folder, not step_10 too
    some = storage.download_dir(f"s3://{bucket}/run/step_1", tmp_path / "some", cfg, names=("job.json",))
    assert [p.name for p in Path(some).iterdir()] == ["job.json"]
    assert storage.download_dir(str(tmp_path / "whole"), tmp_path / "unused") == str(tmp_path / "whole")
    with pytest.raises(storage.StorageError, match="step_1/model.safetensors"):
        storage.download_dir(f"s3://{bucket}/run/step_1", tmp_path / "x", cfg, names=("model.safetensors",))
