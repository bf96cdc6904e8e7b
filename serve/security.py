"""Request security: bearer tokens and the URI allow-list.

Every URI a request names (identity, audio, output) must lie under one of
`ServeConfig.allowed_uris` after normalisation: `..` segments are refused
outright (no traversal), local paths are made absolute with symlinks
resolved, and prefixes match whole path components (`s3://b/data` does not
admit `s3://b/data2/x`).
"""
from __future__ import annotations

import hmac
import os
import posixpath
from urllib.parse import urlparse

from dheads.platform import storage


class UriForbidden(PermissionError):
    pass


def normalise(uri: str) -> str:
    """Canonical form of a URI; raises UriForbidden for traversal or bad URIs."""
    if not uri or "\x00" in uri:
        raise UriForbidden("empty or malformed URI")
    if "://" in uri and not storage.is_s3(uri):
        raise UriForbidden(f"unsupported URI scheme in {uri!r} (local paths and s3:// only)")
    if storage.is_s3(uri):
        parsed = urlparse(uri)
        key = parsed.path.lstrip("/")
        if not parsed.netloc or any(p in ("..", ".") for p in key.split("/")):
            raise UriForbidden(f"path traversal or empty bucket in {uri!r}")
        return f"s3://{parsed.netloc}/{posixpath.normpath(key) if key else ''}".rstrip("/")
    if any(p == ".." for p in uri.replace("\\", "/").split("/")):
        raise UriForbidden(f"path traversal in {uri!r}")
    return os.path.realpath(os.path.expanduser(uri))


def _under(uri: str, prefix: str) -> bool:
    return uri == prefix or uri.startswith(prefix.rstrip("/") + "/")


class UriPolicy:
    def __init__(self, allowed: list[str]):
        self.allowed = [normalise(a) for a in allowed]

    def check(self, uri: str) -> str:
        """The normalised URI if allowed, else UriForbidden (→ HTTP 403)."""
        norm = normalise(uri)
        if not any(_under(norm, a) for a in self.allowed):
            raise UriForbidden(f"{uri!r} is outside the allowed locations")
        return norm


def token_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())
