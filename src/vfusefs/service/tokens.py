"""File API tokens (SPEC §8): HS256 JWTs with the claims `host`, `vfolder`, `mode`, `path`
(optional prefix inside the vfolder) and `exp`, signed with the key in `files_secret_file`.

The daemon signs them for `POST /v1/hosts/{host}/vfolders/{id}/tokens` (and `vfusefs vfolder
token`); a manager holding the same key may sign its own, as a Backend.AI manager does for its
storage proxy.  PyJWT checks the signature, the algorithm (HS256 only: a token naming "none"
or another algorithm is refused) and `exp`; this module checks the claims' shapes.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

import jwt

from vfusefs.domain import files
from vfusefs.domain.access import BadGrant, Mode, parse_mode
from vfusefs.domain.validation import RegistryError, strict_uuid

ALGORITHM = "HS256"
MIN_KEY = 32  # bytes: HS256 wants a key at least as long as its hash (RFC 7518 §3.2)
LEEWAY = 5  # seconds of clock skew allowed between the signer and this node


class BadKey(ValueError):
    """The key file cannot be used; the message is one line for the operator."""


def read_key(path: str) -> bytes:
    """The signing key: the first line of path, which only its owner may read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            first = f.readline().strip()
    except OSError as exc:
        raise BadKey(f"daemon.files_secret_file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BadKey(
            f"daemon.files_secret_file {path}: readable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    if len(first) < MIN_KEY:
        raise BadKey(
            f"daemon.files_secret_file {path}: key must be at least {MIN_KEY} bytes "
            f"(e.g. `openssl rand -hex 32 > {path}`)"
        )
    return first


@dataclass(frozen=True)
class Claims:
    host: str
    vfolder: str
    mode: Mode
    path: files.Path
    exp: int


def _bad(message: str) -> RegistryError:
    return RegistryError(401, "bad_token", message)


class FileTokens:
    """The daemon's signer and checker; `key` is None until files_secret_file is set (a
    reload may set or change it: tokens signed with the old key stop working)."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key

    def sign(self, host: str, vfolder: str, mode: str, path: str, ttl: int) -> tuple[str, int]:
        """A token and its expiry (Unix seconds)."""
        if self.key is None:
            raise RegistryError(
                409, "not_configured", "daemon.files_secret_file is not set: no key to sign with"
            )
        exp = int(time.time()) + ttl
        claims = {"host": host, "vfolder": vfolder, "mode": mode, "exp": exp}
        if path:
            claims["path"] = path
        return jwt.encode(claims, self.key, algorithm=ALGORITHM), exp

    def verify(self, token: str) -> Claims:
        """The claims of a token this key signed and that has not expired; else 401."""
        if self.key is None:
            raise _bad("this daemon has no key to check tokens with")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "host", "vfolder", "mode"]},
                leeway=LEEWAY,
            )
        except jwt.ExpiredSignatureError:
            raise _bad("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _bad(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            raise _bad(f"bad token: {str(exc)[:120]}") from None
        host, vfolder = claims.get("host"), strict_uuid(claims.get("vfolder"))
        if not isinstance(host, str) or vfolder is None:
            raise _bad("bad token: 'host' must be a host name and 'vfolder' a UUID")
        try:
            mode = parse_mode(str(claims.get("mode")))
        except BadGrant:
            raise _bad("bad token: 'mode' must be ro, rw or rwd") from None
        try:
            path = files.parse_path(claims.get("path", ""), "token path")
        except RegistryError as exc:
            raise _bad(f"bad token: {exc.message}") from None
        return Claims(host, vfolder, mode, path, int(claims["exp"]))
