"""Storage URIs: a local path or `s3://bucket/prefix`, through pyarrow.fs.

Every job takes URIs of this one kind. S3 credentials come from the standard
AWS chain (env, ~/.aws, instance role); `StorageConfig.endpoint_url` points
at any S3-compatible endpoint (moto_server in tests, MinIO, R2, ...).
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dheads.platform.config import StorageConfig


class StorageError(IOError):
    """A URI that cannot be read or written; the message says which and why.
    `transient`: the store could not be reached or asked to slow down (worth
    another attempt later), as opposed to a missing object or bucket, a
    denied access or a full disk, which another attempt would not change."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


# pyarrow's S3 error names (and curl's) for the store being away or overloaded
_TRANSIENT_S3 = ("NETWORK_CONNECTION", "curlCode", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                 "THROTTLING", "REQUEST_TIMEOUT", "HTTP status 500", "HTTP status 502", "HTTP status 503",
                 "HTTP status 504")
_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT}


def _failure(verb: str, uri: str, e: OSError, storage: StorageConfig | None) -> StorageError:
    """A StorageError for `verb uri`, with a hint when the endpoint is unreachable."""
    text = " ".join(str(e).split())
    transient = e.errno in _TRANSIENT_ERRNO or (is_s3(uri) and any(p in text for p in _TRANSIENT_S3))
    if is_s3(uri) and ("NETWORK_CONNECTION" in text or "curlCode" in text):
        endpoint = (storage.endpoint_url if storage else None) or "AWS's default endpoint"
        text += f" (is {endpoint} reachable? set storage.endpoint_url)"
    return StorageError(display_name(f"cannot {verb} {uri}: {text}"), transient=transient)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(uri).joinpath(*parts))


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_s3(uri) else Path(uri).name


def resolve(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it)."""
    storage = storage or StorageConfig()
    if is_s3(uri):
        parsed = urlparse(uri)
        kwargs: dict = {"region": storage.region}
        if storage.endpoint_url:
            ep = urlparse(storage.endpoint_url)
            kwargs["endpoint_override"] = ep.netloc or storage.endpoint_url
            kwargs["scheme"] = ep.scheme or "https"
        # Environment credentials are picked up by the AWS SDK's default chain.
        fs = pafs.S3FileSystem(**kwargs)
        return fs, f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def list_files(uri: str, suffixes: tuple[str, ...] = (), storage: StorageConfig | None = None,
               recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under `uri` whose names end with one of `suffixes`.

    Hidden names and `_tmp*` leftovers are skipped. Local names that are not
    valid UTF-8 come back as Python does (undecodable bytes as surrogates,
    `os.fsdecode`): usable as paths, but not as Arrow/JSON text until the
    caller escapes them (`display_name`).
    """
    keep = tuple(s.lower() for s in suffixes)

    def wanted(name: str) -> bool:
        return not (name.startswith(".") or name.startswith("_tmp")) and \
            (not keep or name.lower().endswith(keep))

    if not is_s3(uri):
        # pyarrow's local listing dies on the first non-UTF-8 name (UnicodeDecodeError)
        return sorted(_list_local(Path(uri).expanduser().resolve(), recursive, wanted))
    fs, path = resolve(uri, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise _failure("list", uri, e, storage) from e
    return sorted(to_uri(fs, i.path) for i in infos if i.type == pafs.FileType.File and wanted(i.base_name))


def _list_local(root: Path, recursive: bool, wanted) -> list[str]:
    """Files under `root`, following symlinks as pyarrow does; a directory
    that is its own ancestor (a symlink loop) is not entered again."""
    out: list[str] = []

    def walk(d: str, ancestors: frozenset) -> None:
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in ancestors:
                return
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StorageError(f"cannot list {display_name(d)}: {e.strerror or e}") from e
        inner = ancestors | {(st.st_dev, st.st_ino)}
        for e in entries:
            try:
                if e.is_dir():
                    if recursive:
                        walk(e.path, inner)
                elif e.is_file() and wanted(e.name):
                    out.append(e.path)
            except OSError:   # vanished, or a dangling symlink
                continue

    walk(str(root), frozenset())
    return out


def display_name(uri: str) -> str:
    """`uri` as valid UTF-8 text: undecodable bytes of a local name written
    as `\\xNN` (the same escape for the same name, every time)."""
    return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    if not is_s3(uri):   # Python's own I/O: any local name, UTF-8 or not
        return os.path.exists(os.path.expanduser(uri))
    fs, path = resolve(uri, storage)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _failure("stat", uri, e, storage) from e


def size(uri: str, storage: StorageConfig | None = None) -> int:
    if not is_s3(uri):
        return os.path.getsize(os.path.expanduser(uri))
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).size


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    try:
        if not is_s3(uri):
            with open(os.path.expanduser(uri), "rb") as f:
                return f.read()
        fs, path = resolve(uri, storage)
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise _failure("read", uri, e, storage) from e


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write atomically: a temporary name next to the target, then a move.

    Readers never see a half-written object: locally `os.replace`, on S3 the
    temporary key is copied onto the final key (S3 objects appear whole).
    Locally the write is also durable: the file is fsynced before the rename
    and its directory after it (and every directory this write created), so
    after a crash the name holds either the old bytes or all the new ones.
    """
    if not is_s3(uri):
        try:
            _durable_replace(Path(uri).expanduser().resolve(), lambda f: f.write(data))
        except OSError as e:
            raise _failure("write", uri, e, storage) from e
        return
    _s3_replace(uri, storage, lambda f: f.write(data))


def _s3_replace(uri: str, storage: StorageConfig | None, write) -> None:
    """`write(stream)` into a temporary key beside `uri`, then move it onto
    `uri` (S3 objects appear whole); the temporary is removed on failure."""
    fs, path = resolve(uri, storage)
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f"_tmp.{uuid.uuid4().hex}.{name}")
    try:
        with fs.open_output_stream(tmp) as f:
            write(f)
        fs.move(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise _failure("write", uri, e, storage) from e


def upload_file(local_path: str | Path, uri: str, storage: StorageConfig | None = None) -> None:
    """Copy a local file to `uri` atomically (and durably when `uri` is local)."""
    if not is_s3(uri):
        with open(local_path, "rb") as src:
            try:
                _durable_replace(Path(uri).expanduser().resolve(),
                                 lambda f: shutil.copyfileobj(src, f, 1 << 20))
            except OSError as e:
                raise _failure("write", uri, e, storage) from e
        return
    with open(local_path, "rb") as src:  # streamed, never held whole
        _s3_replace(uri, storage, lambda f: shutil.copyfileobj(src, f, 1 << 20))


def _durable_replace(dst: Path, write) -> None:
    """`write(file)` into a temporary next to `dst`, fsync it, rename it onto
    `dst`, fsync the directory. On failure the temporary is removed."""
    created = _makedirs(dst.parent)
    tmp = dst.with_name(f"_tmp.{uuid.uuid4().hex}.{dst.name}")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dst.parent)          # the new name
    for d in created:               # each directory this write created, in its parent
        _fsync_dir(d.parent)


def _makedirs(path: Path) -> list[Path]:
    """mkdir -p; returns the directories it created, deepest first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete(uri: str, storage: StorageConfig | None = None) -> None:
    fs, path = resolve(uri, storage)
    with contextlib.suppress(FileNotFoundError):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


class TooLarge(StorageError):
    """An input over the size limit its caller set (the message names the
    sizes, not the URI: callers say which input it is)."""


def check_size(uri: str, max_bytes: int | None, storage: StorageConfig | None = None) -> int:
    """`uri`'s size in bytes; TooLarge over `max_bytes` (None: no limit)."""
    try:
        n = size(uri, storage)
    except OSError as e:
        raise _failure("stat", uri, e, storage) from e
    if n is None:
        raise StorageError(f"cannot read {uri}: no such file")
    if max_bytes is not None and n > max_bytes:
        raise TooLarge(f"the file is {n / 2**20:.3g} MB, over the limit of {max_bytes / 2**20:.3g} MB")
    return n


@contextlib.contextmanager
def local_path(uri: str, storage: StorageConfig | None = None, suffix: str = "",
               max_bytes: int | None = None) -> Iterator[str]:
    """A local file path holding `uri`'s bytes: S3 objects are streamed to a
    temporary file in 1 MiB chunks (memory stays flat in the object's size);
    TooLarge over `max_bytes`, checked from the size before reading and
    counted while streaming."""
    if not is_s3(uri):
        if not os.path.exists(uri):
            raise StorageError(f"cannot read {uri}: no such file")
        check_size(uri, max_bytes, storage)
        yield uri
        return
    check_size(uri, max_bytes, storage)
    fs, path = resolve(uri, storage)
    with tempfile.NamedTemporaryFile(suffix=suffix or Path(urlparse(uri).path).suffix, delete=False) as f:
        name = f.name
        try:
            with fs.open_input_stream(path) as src:
                total = 0
                while chunk := src.read(1 << 20):
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise TooLarge(f"the file grew past the limit of {max_bytes / 2**20:.3g} MB "
                                       "while it was read")
                    f.write(chunk)
        except OSError as e:
            f.close()
            os.unlink(name)
            if isinstance(e, StorageError):
                raise
            raise _failure("read", uri, e, storage) from e
    try:
        yield name
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def download_dir(uri: str, local_dir: str | Path, storage: StorageConfig | None = None,
                 names: tuple[str, ...] | None = None) -> str:
    """A local folder holding the folder `uri` (every file under it, or only
    `names`): a local `uri` is returned as it is; an S3 prefix is streamed
    into `local_dir` file by file in 1 MiB chunks (the one downloader of
    folders: training checkpoints, model checkpoints)."""
    if not is_s3(uri):
        return uri
    fs, root = resolve(uri, storage)
    try:
        if names is None:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            files = [posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File]
        else:
            files = list(names)
        for rel in files:
            dst = Path(local_dir, rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(posixpath.join(root, rel)) as src, open(dst, "wb") as f:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise _failure("read", uri, e, storage) from e
    return str(local_dir)


def s3_env(storage: StorageConfig) -> dict[str, str]:
    """Environment for child processes (Ray workers) to reach the same endpoint."""
    env = {}
    if storage.endpoint_url:
        env["AWS_ENDPOINT_URL"] = storage.endpoint_url
        env["AWS_ENDPOINT_URL_S3"] = storage.endpoint_url
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env
