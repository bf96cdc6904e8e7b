"""Request security: tenants and their bearer tokens, and the URI allow-list.

Tenants: `serve.tokens_file` holds one `tenant: token` line per tenant (a
mounted Kubernetes Secret, say); without it the one token of
`DHEADS_API_TOKEN` / `serve.token` is the tenant `default`. A job belongs to
the tenant whose token submitted it: other tenants get 404 for it. Tokens
are compared in constant time (`hmac.compare_digest`, against every token,
so the time does not say which one nearly matched); the scheme word
`Bearer` is case-insensitive (RFC 7235); a token shorter than
`MIN_TOKEN_CHARS` is refused when the service starts.

URIs: every URI a request names (identity, audio, output) must lie under one
of `ServeConfig.allowed_uris` after normalisation, and never under the
service's own state (the job store, the uploads folder): `..` segments are
refused outright, local paths are made absolute with symlinks resolved, and
prefixes match whole path components (`s3://b/data` does not admit
`s3://b/data2/x`). `{tenant}` in an allowed prefix is the caller's tenant
name, for per-tenant storage. With more than one tenant every allowed
prefix, and `serve.output_dir`, must contain `{tenant}` (the service refuses
to start otherwise: tenants would read and probe each other's outputs);
`serve.shared_uris` lists prefixes that every tenant may read but none may
write (a shared library of voices or faces, say).

Outputs (`UriPolicy.check_output`) must also be `.mp4` files, and never lie
inside the served checkpoint or a folder that holds a checkpoint (a training
run's `step_*/.metadata`, an export's `model.safetensors`): with
`overwrite: true` a request could otherwise replace the model it is served by.
"""
from __future__ import annotations

import hmac
import os
import posixpath
import re
from pathlib import Path
from urllib.parse import urlparse

from dheads.platform import storage
from dheads.platform.config import ConfigError

MIN_TOKEN_CHARS = 32
TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_TENANT = "default"


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


def under(uri: str, prefix: str) -> bool:
    return uri == prefix or uri.startswith(prefix.rstrip("/") + "/")


# Files whose presence marks a folder as a checkpoint (DCP training step, export).
CHECKPOINT_MARKERS = (".metadata", "model.safetensors")


class UriPolicy:
    """`allowed` prefixes minus `state` (the service's own files); outputs
    also minus `protected` (the served checkpoint) and checkpoint folders."""

    def __init__(self, allowed: list[str], state: list[str] = (), protected: list[str] = (),
                 shared: list[str] = ()):
        self.state = [normalise(s) for s in state if s]
        self.protected = [normalise(p) for p in protected if p]
        self.allowed = list(allowed)
        self.shared = [normalise(s) for s in shared]
        for a in list(allowed) + list(shared):
            norm = normalise(a.replace("{tenant}", DEFAULT_TENANT))
            inside = [s for s in self.state if under(norm, s)]
            if inside:
                raise ConfigError(f"serve.allowed_uris: {a!r} lies inside the service's own state "
                                  f"({inside[0]}); allow a location outside it")

    def check(self, uri: str, tenant: str = DEFAULT_TENANT, write: bool = False) -> str:
        """The normalised URI if allowed (for reading, or with `write` for
        writing: never under `shared`), else UriForbidden (→ HTTP 403)."""
        norm = normalise(uri)
        for s in self.state:
            if under(norm, s):
                raise UriForbidden(f"{uri!r} is the service's own state (job store / uploads); "
                                   "it is never readable or writable through the API")
        if any(under(norm, normalise(a.replace("{tenant}", tenant))) for a in self.allowed):
            return norm
        if any(under(norm, s) for s in self.shared):
            if write:
                raise UriForbidden(f"{uri!r} lies under serve.shared_uris, which every tenant reads; "
                                   "outputs go to the caller's own locations")
            return norm
        raise UriForbidden(f"{uri!r} is outside the allowed locations")

    def check_output(self, uri: str, tenant: str = DEFAULT_TENANT) -> str:
        """`check`, and the URI names an .mp4 outside every checkpoint."""
        norm = self.check(uri, tenant, write=True)
        if not norm.lower().endswith(".mp4"):
            raise UriForbidden(f"output {uri!r}: outputs are .mp4 files")
        for p in self.protected:
            if under(norm, p):
                raise UriForbidden(f"output {uri!r} lies inside the served checkpoint {p}")
        if not storage.is_s3(norm):  # local: look for a checkpoint in the folders above it
            folder = os.path.dirname(norm)
            while folder and folder != os.path.dirname(folder):
                if any(os.path.exists(os.path.join(folder, m)) for m in CHECKPOINT_MARKERS):
                    raise UriForbidden(f"output {uri!r} lies inside a checkpoint folder ({folder})")
                folder = os.path.dirname(folder)
        return norm


def check_tenant_isolation(tenants: list[str], allowed: list[str], output_dir: str) -> None:
    """ConfigError when several tenants would share storage: every allowed
    prefix and the output folder must then contain `{tenant}`."""
    if len(tenants) < 2:
        return
    shared = [a for a in list(allowed) + [output_dir] if "{tenant}" not in a]
    if shared:
        raise ConfigError(
            f"{len(tenants)} tenants ({', '.join(sorted(tenants))}) but {shared[0]!r} (serve.allowed_uris / "
            "serve.output_dir) has no {tenant}: each tenant could read and probe the others' outputs. "
            "Put {tenant} in every allowed prefix and in serve.output_dir; list read-only prefixes "
            "all tenants share in serve.shared_uris")


# ---------------------------------------------------------------- tokens
def _check_token(tenant: str, token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: the token of tenant {tenant!r} is {len(token)} characters; "
                          f"tokens must be at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -base64 32`)")


def parse_tokens(text: str, where: str) -> dict[str, str]:
    """`tenant: token` lines (blank lines and `#` comments ignored) -> {tenant: token}."""
    tokens: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, token = (part.strip() for part in line.partition(":"))
        if not sep or not token:
            raise ConfigError(f"{where} line {n}: expected `tenant: token`")
        if not TENANT.match(tenant):
            raise ConfigError(f"{where} line {n}: tenant {tenant!r} must match {TENANT.pattern}")
        if tenant in tokens:
            raise ConfigError(f"{where} line {n}: tenant {tenant!r} appears twice")
        _check_token(tenant, token, f"{where} line {n}")
        if token in tokens.values():
            raise ConfigError(f"{where} line {n}: two tenants share one token")
        tokens[tenant] = token
    if not tokens:
        raise ConfigError(f"{where}: no `tenant: token` lines")
    return tokens


def load_tokens(tokens_file: str | None, single: str | None, where: str) -> dict[str, str]:
    """The tenants' tokens: from `tokens_file`, else `single` as the tenant `default`."""
    if tokens_file:
        path = Path(tokens_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"serve.tokens_file {tokens_file}: no such file")
        return parse_tokens(path.read_text(), f"serve.tokens_file {tokens_file}")
    if not single:
        raise ConfigError(f"no API token: set {where} or serve.tokens_file (the service never runs open)")
    _check_token(DEFAULT_TENANT, single, where)
    return {DEFAULT_TENANT: single}


def bearer(header: str | None) -> str | None:
    """The credentials of `Authorization: Bearer <token>` (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def tenant_of(header: str | None, tokens: dict[str, str]) -> str | None:
    """The tenant whose token the header carries, else None; every token is
    compared (constant time each), whichever matches."""
    given = bearer(header)
    if given is None:
        return None
    found = None
    for tenant, token in tokens.items():
        if hmac.compare_digest(given.encode(), token.encode()):
            found = tenant
    return found


def token_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    return tenant_of(header, {DEFAULT_TENANT: token}) is not None
