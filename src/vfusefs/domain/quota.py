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

Many nodes (a shared store): a limited account is `leased`.  Its limit is then held by the
store, and this node may grow the account only by what it holds in a lease (`lease_bytes`,
`lease_inodes`: granted by the store, less what this node's operations have grown the account
by since; frees give back).  `reserve` checks a leased account against its lease and raises
QuotaExceeded with `leased` set and the shortfall, so the caller can ask the store for more and
try again; a lease that was not renewed in time is closed (`lease_open`) and refuses all growth.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field


class QuotaExceeded(Exception):
    """The operation would take an account past its limit (EDQUOT), or past this node's lease
    on it (`leased`: short_bytes/short_inodes more would have let it pass)."""

    def __init__(
        self, key: str, leased: bool = False, short_bytes: int = 0, short_inodes: int = 0
    ) -> None:
        super().__init__(f"quota of {key} exceeded")
        self.key = key
        self.leased = leased
        self.short_bytes = short_bytes
        self.short_inodes = short_inodes


@dataclass
class Account:
    limit_bytes: int = 0  # 0: unlimited
    limit_inodes: int = 0
    used_bytes: int = 0
    used_inodes: int = 0
    reserved_bytes: int = 0
    reserved_inodes: int = 0
    dirty: bool = False  # usage changed since it was last persisted
    # many nodes: the limit is held by the store and spent through leases (see the top)
    leased: bool = False
    lease_held: bool = False  # the store has a lease of this node's for it (figures below)
    lease_open: bool = False  # renewed in time: growth may spend the lease
    lease_bytes: int = 0
    lease_inodes: int = 0
    lease_used: bool = False  # a reservation spent from the lease since the keeper last looked

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
    keys: tuple[str, ...]
    accounts: tuple[Account, ...]
    bytes: int
    inodes: int
    done: bool = field(default=False)


class QuotaLedger:
    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.dirty: set[str] = set()  # accounts whose usage changed since take_dirty()

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
            if acc.leased:
                _check_lease(key, acc, nbytes, inodes)
                continue
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
            if acc.leased and (nbytes or inodes):
                acc.lease_used = True
        return Reservation(keys, accounts, nbytes, inodes)

    def commit(self, res: Reservation, nbytes: int, inodes: int) -> None:
        """Release the reservation and apply what the operation really changed."""
        self.refund(res)
        for acc in res.accounts:
            _grow(acc, nbytes, inodes)
        if nbytes or inodes:
            self.dirty.update(res.keys)

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
            _grow(self.account(key), nbytes, inodes)
            if nbytes or inodes:
                self.dirty.add(key)

    def set_limits(self, key: str, limit_bytes: int, limit_inodes: int, shared: bool) -> Account:
        """Set an account's limits; on a shared store a limited account is leased (an account
        that stops being leased keeps its lease until the keeper gives it back)."""
        acc = self.account(key)
        acc.limit_bytes, acc.limit_inodes = limit_bytes, limit_inodes
        acc.leased = shared and bool(limit_bytes or limit_inodes)
        return acc

    def set_usage(self, key: str, nbytes: int, inodes: int) -> None:
        acc = self.account(key)
        acc.used_bytes, acc.used_inodes, acc.dirty = nbytes, inodes, True
        self.dirty.add(key)

    def mark_dirty(self, key: str) -> None:
        """Usage of key must be persisted again (a flush that did not land)."""
        self.account(key).dirty = True
        self.dirty.add(key)

    def take_dirty(self) -> set[str]:
        """The accounts whose usage changed since the last call (their `dirty` flags say
        which still need persisting)."""
        out, self.dirty = self.dirty, set()
        return out

    def shift(self, keys: Iterable[str], nbytes: int, inodes: int) -> None:
        """Move usage by a count found elsewhere (a recount, another node's writes): nothing
        this node grew, so no lease is spent."""
        for key in keys:
            acc = self.account(key)
            acc.used_bytes += nbytes
            acc.used_inodes += inodes


def short_of(ledger: QuotaLedger, keys: Iterable[str], nbytes: int, inodes: int) -> str | None:
    """The first of keys' accounts without room for nbytes and inodes more (its limit minus
    what is used and reserved; the store's figures for a limit many nodes share), else None.
    A question asked ahead of a long operation (an upload's length); the operation's own
    reservations still decide."""
    for key in keys:
        acc = ledger.account(key)
        room_b, room_i = acc.room_bytes(), acc.room_inodes()
        if room_b is not None and nbytes > room_b or room_i is not None and inodes > room_i:
            return key
    return None


def _check_lease(key: str, acc: Account, nbytes: int, inodes: int) -> None:
    """Raise QuotaExceeded (leased) unless acc's lease covers what is reserved and this."""
    short_b = acc.reserved_bytes + nbytes - acc.lease_bytes if nbytes and acc.limit_bytes else 0
    short_i = acc.reserved_inodes + inodes - acc.lease_inodes if inodes and acc.limit_inodes else 0
    if (nbytes or inodes) and not acc.lease_open or short_b > 0 or short_i > 0:
        raise QuotaExceeded(key, True, max(0, short_b), max(0, short_i))


def _grow(acc: Account, nbytes: int, inodes: int) -> None:
    acc.used_bytes += nbytes
    acc.used_inodes += inodes
    if nbytes or inodes:
        acc.dirty = True
        if acc.lease_held:  # what grew is spent from the lease, what shrank goes back to it
            acc.lease_bytes -= nbytes
            acc.lease_inodes -= inodes


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
