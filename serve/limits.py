"""Request bodies read under their limits while they stream in, never after.

- `read_json_job`: a JSON job body, counted in bytes and in items as the
  chunks arrive; past either limit the read stops with a 413 before anything
  is parsed (a 1 GB body or 200k items costs one chunk of memory).
- `read_uploads`: a multipart job, parsed as it streams
  (`python_multipart.MultipartParser`): each file part goes straight to a
  temporary file with a running byte count, and the read stops with a 413 as
  soon as the files pass the limit; fields are small and few.
- `image_header` / `audio_seconds`: what a file's header says (pixels,
  duration), read without decoding, for the checks at submission.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Optional

from python_multipart.multipart import MultipartParser, parse_options_header

from dheads.platform import storage
from dheads.platform.config import StorageConfig

MAX_FIELD_BYTES = 1024           # a multipart form field (item_id, output, ...)
MAX_HEADER_BYTES = 8192          # one header of a multipart part
MAX_PARTS = 8


class BodyTooLarge(Exception):
    """A request over one of its limits: HTTP 413, the message names the limit."""


class BadBody(Exception):
    """A malformed request body: HTTP 422."""


# --------------------------------------------------------------------- JSON
_STRUCTURE = re.compile(rb'[\\"{}\[\]]')


class ItemCounter:
    """Counts the items of a JSON job body as its bytes arrive: the objects
    directly inside the top-level list (`[{...}, ...]`) or inside a list that
    is a value of the top-level object (`{"items": [{...}, ...]}`). Strings
    and escapes are skipped; nothing is parsed."""

    def __init__(self):
        self.items = 0
        self._stack: list[int] = []    # b"{"[0] / b"["[0]
        self._in_string = False
        self._escaped = False           # the chunk ended on a backslash inside a string

    def feed(self, chunk: bytes) -> int:
        skip = 0 if not self._escaped else 1
        self._escaped = False
        if skip and chunk:
            chunk = chunk[1:]
        pos_skip = -1
        for m in _STRUCTURE.finditer(chunk):
            i = m.start()
            if i == pos_skip:
                continue
            c = chunk[i]
            if self._in_string:
                if c == 0x5C:                       # backslash: the next byte is escaped
                    if i + 1 == len(chunk):
                        self._escaped = True
                    pos_skip = i + 1
                elif c == 0x22:
                    self._in_string = False
                continue
            if c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):                 # { [
                if c == 0x7B and self._stack and self._stack[-1] == 0x5B and len(self._stack) <= 2 \
                        and (len(self._stack) == 1 or self._stack[0] == 0x7B):
                    self.items += 1
                self._stack.append(c)
            elif c in (0x7D, 0x5D) and self._stack:
                self._stack.pop()
        return self.items


async def read_json_job(stream: AsyncIterator[bytes], max_bytes: int, max_items: int) -> bytes:
    """The whole body, or BodyTooLarge as soon as it passes `max_bytes` or
    holds more than `max_items` items."""
    counter, chunks, total = ItemCounter(), [], 0
    async for chunk in stream:
        total += len(chunk)
        if counter.feed(chunk) > max_items:
            raise BodyTooLarge(f"more than {max_items} items, over the limit of {max_items} per job "
                               "(serve.max_items_per_job); stopped reading the body there")
        if total > max_bytes:
            raise BodyTooLarge(f"request body is over the limit of {max_bytes} bytes "
                               f"(serve.max_body_kb); stopped reading at {total} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- multipart
@dataclass
class Upload:
    name: str                   # form field
    filename: str
    path: str                   # local temporary file
    size: int = 0


@dataclass
class Uploads:
    """The parts of a multipart job: files in `tmpdir`, fields as text."""
    tmpdir: str
    files: dict[str, Upload] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class _Parts:
    """python-multipart callbacks: headers and fields bounded, files to disk."""

    def __init__(self, out: Uploads, max_file_bytes: int, file_fields: tuple[str, ...]):
        self.out, self.max_file_bytes, self.file_fields = out, max_file_bytes, file_fields
        self.total, self.parts = 0, 0
        self._name = self._value = b""
        self._disposition = b""
        self._file = None
        self._upload: Optional[Upload] = None
        self._field: Optional[str] = None
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BodyTooLarge(f"more than {MAX_PARTS} parts in the multipart body")
        self._disposition, self._field, self._upload, self._data = b"", None, None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]
        if len(self._name) > MAX_HEADER_BYTES:
            raise BodyTooLarge(f"a part header is over {MAX_HEADER_BYTES} bytes")

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        if len(self._value) > MAX_HEADER_BYTES:
            raise BodyTooLarge(f"a part header is over {MAX_HEADER_BYTES} bytes")

    def on_header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition = self._value
        self._name = self._value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadBody('a multipart part has no Content-Disposition "name"')
        name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if name not in self.file_fields or name in self.out.files:
                raise BadBody(f"unexpected file part {name!r} (expected one each of {list(self.file_fields)})")
            filename = options[b"filename"].decode("utf-8", "replace")
            suffix = Path(filename).suffix.lower()[:16]
            path = os.path.join(self.out.tmpdir, f"{name}{suffix}")
            self._upload = Upload(name, filename, path)
            self._file = open(path, "wb")
            self.out.files[name] = self._upload
        else:
            self._field = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._upload is not None:
            self.total += n
            if self.total > self.max_file_bytes:
                raise BodyTooLarge(f"uploads are over the limit of {self.max_file_bytes} bytes "
                                   f"(serve.max_upload_mb); stopped reading at {self.total} bytes")
            self._file.write(data[start:end])
            self._upload.size += n
        else:
            if len(self._data) + n > MAX_FIELD_BYTES:
                raise BodyTooLarge(f"form field {self._field!r} is over {MAX_FIELD_BYTES} bytes")
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._field is not None:
            self.out.fields[self._field] = self._data.decode("utf-8", "replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# What a multipart body may carry beyond its files: boundaries, part headers,
# form fields, and whatever follows the closing boundary.
ENVELOPE_BYTES = 64 * 1024


async def read_uploads(stream: AsyncIterator[bytes], content_type: str, max_file_bytes: int,
                       file_fields: tuple[str, ...] = ("identity", "audio")) -> Uploads:
    """Parse a multipart body as it streams; files land in a temporary folder
    (the caller moves them and calls `cleanup`). BodyTooLarge past the limit
    (files over `max_file_bytes`, or the whole body over it plus
    ENVELOPE_BYTES: bytes after the closing boundary count too), BadBody for
    a malformed body; the temporary folder is gone then."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadBody("multipart body without a boundary")
    out = Uploads(tempfile.mkdtemp(prefix="dheads-upload-"))
    parts = _Parts(out, max_file_bytes, file_fields)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        seen, body_limit = 0, max_file_bytes + ENVELOPE_BYTES
        async for chunk in stream:
            parser.write(chunk)  # first: files over their own limit say so
            seen += len(chunk)
            if seen > body_limit:
                raise BodyTooLarge(f"the multipart body is over {body_limit} bytes (serve.max_upload_mb "
                                   f"+ {ENVELOPE_BYTES} for its envelope); stopped reading at {seen} bytes")
        parser.finalize()
    except (BodyTooLarge, BadBody):
        parts.close()
        out.cleanup()
        raise
    except Exception as e:   # the parser's own errors: a malformed body
        parts.close()
        out.cleanup()
        raise BadBody(f"malformed multipart body ({type(e).__name__}: {e})") from e
    return out


# ------------------------------------------------------------------ headers
def image_header(uri: str, storage_cfg: StorageConfig | None) -> Optional[tuple[int, int]]:
    """(width, height) from an image's header (nothing decoded); None if unreadable."""
    import warnings

    from PIL import Image

    try:
        fs, path = storage.resolve(uri, storage_cfg) if storage.is_s3(uri) else (None, uri)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fs is None:
                with Image.open(path) as im:
                    return im.size
            with fs.open_input_file(path) as f, Image.open(f) as im:
                return im.size
    except Exception:  # noqa: BLE001 - unreadable: the item fails with the media layer's reason
        return None


def audio_seconds(uri: str, storage_cfg: StorageConfig | None) -> Optional[float]:
    """Audio duration from the container header (reads only what PyAV needs);
    None when unknown or unreadable (decoding then stops at the limit)."""
    from dheads.platform import media

    try:
        if storage.is_s3(uri):
            fs, path = storage.resolve(uri, storage_cfg)
            f = fs.open_input_file(path)
        else:
            f = open(uri, "rb")
        with f, media.open_container(f) as c:
            if not c.streams.audio:
                return None
            a = c.streams.audio[0]
            if a.duration is not None and a.time_base is not None:
                return float(a.duration * a.time_base)
            return c.duration / 1e6 if c.duration else None
    except Exception:  # noqa: BLE001 - any failure here is reported when the item runs
        return None
