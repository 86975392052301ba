"""What the file API (files over HTTP, SPEC §8) is handed, checked before anything is asked of
storage: paths inside a vfolder, the token's path prefix, byte ranges, tus metadata, lifetimes.
Pure functions; a refusal is a RegistryError with the HTTP status and error code to answer.

A path is kept as a tuple of byte-string components.  A component is never empty, ".", ".."
or holding "/" or NUL once percent-decoded, so `%2e%2e`, `%2F` and friends are refused here,
and "is under the token's path" is a plain comparison of components.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from vfusefs.domain.validation import RegistryError

Path = tuple[bytes, ...]

MAX_PATH = 4096  # bytes of a decoded path (PATH_MAX)
MAX_NAME = 255  # bytes of one component (NAME_MAX)
MAX_RANGES = 32  # ranges one request may ask for


def _component(part: bytes, shown: str) -> bytes:
    if part in (b".", b"..") or b"/" in part or b"\0" in part:
        raise RegistryError(
            400, "bad_path", f"bad path {shown!r}: '.', '..', '/' and NUL may not be a name"
        )
    if len(part) > MAX_NAME:
        raise RegistryError(400, "bad_path", f"bad path {shown!r}: a name is over 255 bytes")
    return part


def split_path(raw: bytes) -> tuple[Path, bool]:
    """A percent-encoded path inside a vfolder (as it came in the URL) -> its components and
    whether it ended with "/" (a directory asked for as one).  Each component is decoded on
    its own, so an encoded "/" cannot join two of them."""
    shown = raw[:200].decode("ascii", "replace")
    if len(raw) > 3 * MAX_PATH:
        raise RegistryError(400, "bad_path", f"bad path {shown!r}...: longer than {MAX_PATH}")
    parts = tuple(_component(unquote_to_bytes(p), shown) for p in raw.split(b"/") if p)
    if sum(len(p) + 1 for p in parts) > MAX_PATH:
        raise RegistryError(400, "bad_path", f"bad path {shown!r}: longer than {MAX_PATH} bytes")
    return parts, raw.endswith(b"/") or not parts


def parse_path(text: object, what: str = "path") -> Path:
    """A plain (not percent-encoded) path inside a vfolder, as a JSON body or a token's claim
    or tus metadata gives it; a leading "/" means the vfolder's top and is optional."""
    if not isinstance(text, str):
        raise RegistryError(400, "bad_path", f"{what} must be a string")
    raw = os.fsencode(text)
    shown = text[:200]
    if len(raw) > MAX_PATH:
        raise RegistryError(400, "bad_path", f"bad {what} {shown!r}: longer than {MAX_PATH} bytes")
    return tuple(_component(p, shown) for p in raw.split(b"/") if p)


def show(parts: Path) -> str:
    """A path for messages and JSON: "/a/b" ("/" for the vfolder's top)."""
    return "/" + "/".join(os.fsdecode(p) for p in parts)


def covers(prefix: Path, parts: Path) -> bool:
    """Whether parts is prefix itself or inside it."""
    return parts[: len(prefix)] == prefix


class Range(NamedTuple):
    start: int
    end: int  # inclusive, as HTTP counts

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Unsatisfiable(Exception):
    """No range of the header falls inside the file (416)."""


_RANGE_RE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


def parse_ranges(header: str | None, size: int) -> list[Range] | None:
    """The ranges of a `Range` header, clipped to size and in the order asked; None when the
    header is absent or not a byte range set this server takes (the whole file is sent, as
    RFC 9110 allows); Unsatisfiable when none of them overlaps the file."""
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    pieces = spec.split(",")
    if len(pieces) > MAX_RANGES:
        return None
    ranges = []
    for piece in pieces:
        m = _RANGE_RE.fullmatch(piece)
        if m is None or not (m.group(1) or m.group(2)):
            return None
        first, last = m.group(1), m.group(2)
        if not first:  # a suffix: the last N bytes
            n = int(last)
            if n == 0 or size == 0:
                continue
            ranges.append(Range(max(0, size - n), size - 1))
            continue
        start = int(first)
        end = int(last) if last else max(start, size - 1)
        if end < start:
            return None
        if start >= size:
            continue
        ranges.append(Range(start, min(end, size - 1)))
    if not ranges:
        raise Unsatisfiable
    return ranges


def etag(ino: int, size: int, mtime_ns: int) -> str:
    """A strong validator for one version of a file: it changes with its content's size or
    mtime (and is never shared by two files of one vfolder)."""
    return f'"{ino:x}-{size:x}-{mtime_ns:x}"'


def encode_cursor(name: bytes) -> str:
    """A listing's `next`: the last name of a page, fit for a query string."""
    return base64.urlsafe_b64encode(name).decode().rstrip("=")


def decode_cursor(text: str) -> bytes:
    """The name a listing page starts after (ValueError if it is not a `next` value)."""
    if not text:
        return b""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(text) from None


def parse_metadata(header: str | None) -> dict[str, bytes]:
    """tus `Upload-Metadata`: comma-separated "key base64value" pairs (the value may be
    absent)."""
    found: dict[str, bytes] = {}
    for pair in (header or "").split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, value = pair.partition(" ")
        if not key or key in found or not key.isascii() or " " in value.strip():
            raise RegistryError(400, "bad_metadata", f"bad Upload-Metadata pair {pair[:80]!r}")
        try:
            found[key] = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise RegistryError(
                400, "bad_metadata", f"Upload-Metadata {key!r}: value is not base64"
            ) from None
    return found


def encode_metadata(meta: dict[str, bytes]) -> str:
    return ",".join(f"{k} {base64.b64encode(v).decode()}".rstrip() for k, v in meta.items())


_TTL_RE = re.compile(r"([0-9]{1,9})\s*([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL = 30 * 86400


def parse_ttl(value: object) -> int:
    """A token's lifetime: seconds, or "90s", "30m", "1h", "7d"; at most 30 days."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RegistryError(400, "bad_ttl", "ttl must be seconds or a string like '1h'")
    m = _TTL_RE.fullmatch(str(value).strip())
    if m is None:
        raise RegistryError(400, "bad_ttl", f"bad ttl {str(value)[:40]!r}: use 3600, '30m', '1h'")
    seconds = int(m.group(1)) * _TTL_UNITS[m.group(2)]
    if not 0 < seconds <= MAX_TTL:
        raise RegistryError(400, "bad_ttl", f"ttl must be between 1 s and {MAX_TTL // 86400} days")
    return seconds


def parse_length(value: str | None, header: str) -> int:
    """A non-negative decimal header value (Upload-Length, Upload-Offset)."""
    if value is None or not re.fullmatch(r"[0-9]{1,19}", value.strip()):
        raise RegistryError(400, "bad_header", f"{header} must be a non-negative integer")
    return int(value)
