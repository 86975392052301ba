"""Quota accounting: pure bookkeeping of usage and limits, no I/O.

Accounts exist per vfolder and per quota scope; an operation charges the vfolder's account and,
if it has one, its scope's.  The protocol, on the event loop:

    res = ledger.reserve(keys, max_bytes, max_inodes)   # before the first await: EDQUOT here
    ... run the native syscalls ...
    ledger.commit(res, actual_bytes, actual_inodes)     # or ledger.refund(res) on failure

`reserve` counts what is already reserved by operations in flight, so two concurrent writes can
never both pass a check that only one of them fits.  `commit` applies what really changed (which
may be less than reserved, or negative); decreases (unlink) go through `apply` and are never
refused.  Usage is allocated bytes (st_blocks * 512, as du counts) and inodes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field


class QuotaExceeded(Exception):
    """The operation would take an account past its limit (EDQUOT)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"quota of {key} exceeded")
        self.key = key


@dataclass
class Account:
    limit_bytes: int = 0  # 0: unlimited
    limit_inodes: int = 0
    used_bytes: int = 0
    used_inodes: int = 0
    reserved_bytes: int = 0
    reserved_inodes: int = 0
    dirty: bool = False  # usage changed since it was last persisted

    def room_bytes(self) -> int | None:
        if not self.limit_bytes:
            return None
        return max(0, self.limit_bytes - self.used_bytes - self.reserved_bytes)

    def room_inodes(self) -> int | None:
        if not self.limit_inodes:
            return None
        return max(0, self.limit_inodes - self.used_inodes - self.reserved_inodes)


@dataclass
class Reservation:
    accounts: tuple[Account, ...]
    bytes: int
    inodes: int
    done: bool = field(default=False)


class QuotaLedger:
    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}

    def account(self, key: str) -> Account:
        acc = self.accounts.get(key)
        if acc is None:
            acc = self.accounts[key] = Account()
        return acc

    def reserve(self, keys: Iterable[str], nbytes: int, inodes: int) -> Reservation:
        """Hold room for up to nbytes/inodes of growth on every account, or raise QuotaExceeded."""
        keys = tuple(keys)
        accounts = tuple(self.account(k) for k in keys)
        nbytes, inodes = max(0, nbytes), max(0, inodes)
        for key, acc in zip(keys, accounts, strict=True):
            if (
                nbytes
                and acc.limit_bytes
                and acc.used_bytes + acc.reserved_bytes + nbytes > acc.limit_bytes
            ):
                raise QuotaExceeded(key)
            if (
                inodes
                and acc.limit_inodes
                and acc.used_inodes + acc.reserved_inodes + inodes > acc.limit_inodes
            ):
                raise QuotaExceeded(key)
        for acc in accounts:
            acc.reserved_bytes += nbytes
            acc.reserved_inodes += inodes
        return Reservation(accounts, nbytes, inodes)

    def commit(self, res: Reservation, nbytes: int, inodes: int) -> None:
        """Release the reservation and apply what the operation really changed."""
        self.refund(res)
        for acc in res.accounts:
            acc.used_bytes += nbytes
            acc.used_inodes += inodes
            if nbytes or inodes:
                acc.dirty = True

    def refund(self, res: Reservation) -> None:
        if res.done:
            return
        res.done = True
        for acc in res.accounts:
            acc.reserved_bytes -= res.bytes
            acc.reserved_inodes -= res.inodes

    def apply(self, keys: Iterable[str], nbytes: int, inodes: int) -> None:
        """Apply a change that needs no check (a decrease, or a correction)."""
        for key in keys:
            acc = self.account(key)
            acc.used_bytes += nbytes
            acc.used_inodes += inodes
            if nbytes or inodes:
                acc.dirty = True

    def set_usage(self, key: str, nbytes: int, inodes: int) -> None:
        acc = self.account(key)
        acc.used_bytes, acc.used_inodes, acc.dirty = nbytes, inodes, True


SIZE_RE = re.compile(r" *([0-9]{1,19}) *([kmgtpe]?)(?:i?b)? *", re.IGNORECASE)
SIZE_UNITS = {
    "": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
COUNT_RE = re.compile(r" *([0-9]{1,19}) *([km]?) *", re.IGNORECASE)
COUNT_UNITS = {"": 1, "k": 1000, "m": 1000_000}  # counts take decimal thousands


def _parse_limit(
    text: str | bytes | int, pattern: re.Pattern[str], units: dict[str, int], usage: str
) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("a limit cannot be negative")
        if text >= 1 << 63:
            raise ValueError(f"limit {text} is too large (at most 2^63 - 1)")
        return text
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    # at most 19 digits: int() of thousands of digits is slow (and refused past 4300)
    m = pattern.fullmatch(text) if isinstance(text, str) and len(text) <= 40 else None
    if not m:
        raise ValueError(f"bad limit {str(text)[:40]!r}: {usage}")
    value = int(m.group(1)) * units[m.group(2).lower()]
    if value >= 1 << 63:
        raise ValueError(f"limit {text!r} is too large")
    return value


def parse_size(text: str | bytes | int) -> int:
    """Byte limits: '10G', '512M', '4k', '1GiB', '0' (binary units); ValueError if not."""
    return _parse_limit(
        text, SIZE_RE, SIZE_UNITS, "use a whole number with an optional K, M, G, T or P"
    )


def parse_count(text: str | bytes | int) -> int:
    """Inode limits: whole numbers, with K or M for thousands and millions."""
    return _parse_limit(text, COUNT_RE, COUNT_UNITS, "use a whole number (K and M allowed)")
