"""What the control API hands in, checked before anything changes: vfolder ids, scopes,
limits, grants.  Pure functions; a refusal is a RegistryError carrying the HTTP status and the
error code the API answers with (SPEC §6: 4xx JSON errors, nothing changed)."""

from __future__ import annotations

import re
from typing import Any

from vfusefs.domain import access
from vfusefs.domain.quota import parse_count, parse_size


class RegistryError(Exception):
    """A refusal: the HTTP status and error code the API answers with, and one line saying why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def strict_uuid(text: Any) -> str | None:
    """text as a canonical (lowercase, hyphenated) UUID, or None if it is not one."""
    if isinstance(text, str) and UUID_RE.fullmatch(text):
        return text.lower()
    return None


def canonical_uuid(text: Any) -> str:
    vfid = strict_uuid(text)
    if vfid is None:
        raise RegistryError(
            400,
            "bad_id",
            f"bad vfolder id {str(text)[:80]!r}: expected a UUID "
            f"like 6f1c2a3e-0000-4000-8000-00000000d3e0",
        )
    return vfid


def parse_scope(text: Any) -> str:
    if text is None or text == "":
        return ""
    if isinstance(text, str):
        kind, sep, value = text.partition(":")
        scope_id = strict_uuid(value)
        if sep and kind in ("user", "project") and scope_id is not None:
            return f"{kind}:{scope_id}"
    raise RegistryError(
        400, "bad_scope", f"bad scope {str(text)[:80]!r}: use user:<uuid> or project:<uuid>"
    )


def parse_limits(quota_bytes: Any, quota_inodes: Any) -> tuple[int | None, int | None]:
    """Limits from the API: ints or strings like "10G"; None leaves a limit unchanged."""
    try:
        qb = None if quota_bytes is None else parse_size(quota_bytes)
        qi = None if quota_inodes is None else parse_count(quota_inodes)
    except (ValueError, TypeError) as exc:
        raise RegistryError(400, "bad_quota", str(exc)) from None
    return qb, qi


def parse_grants(grants: Any) -> dict[str, str]:
    if not isinstance(grants, list):
        raise RegistryError(400, "bad_grant", "grants must be a list of {principal, mode}")
    out: dict[str, str] = {}
    for g in grants:
        if not isinstance(g, dict) or set(g) != {"principal", "mode"}:
            raise RegistryError(
                400, "bad_grant", f"bad grant {g!r}: needs exactly principal and mode"
            )
        try:
            out[access.parse_principal(g["principal"])] = access.canonical_mode(g["mode"])
        except access.BadGrant as exc:
            raise RegistryError(400, "bad_grant", str(exc)) from None
    return out


OWNER_RE = re.compile(r"([0-9]{1,10}):([0-9]{1,10})")
MODE_RE = re.compile(r"(?:0o?)?([0-7]{3,4})")


def parse_owner(text: Any) -> tuple[int, int] | None:
    """A vfolder root's owner, "uid:gid" (None: not given, the default 0:0)."""
    if text is None:
        return None
    m = OWNER_RE.fullmatch(text) if isinstance(text, str) else None
    if not m or int(m.group(1)) >= 1 << 32 or int(m.group(2)) >= 1 << 32:
        raise RegistryError(
            400, "bad_owner", f"bad owner {str(text)[:40]!r}: expected UID:GID, e.g. 1000:1000"
        )
    return int(m.group(1)), int(m.group(2))


def parse_mode(text: Any) -> int | None:
    """A vfolder root's permission bits as an octal string ("0755", "2775"; None: not given,
    the default 0755)."""
    if text is None:
        return None
    m = MODE_RE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise RegistryError(
            400,
            "bad_mode",
            f'bad mode {str(text)[:40]!r}: expected an octal string such as "0755" or "2775"',
        )
    return int(m.group(1), 8)
