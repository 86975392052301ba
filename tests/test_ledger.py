"""The quota ledger on its own (SPEC §4): reservations, scopes, size parsing; no I/O, no mount."""

from __future__ import annotations

import pytest

from vfusefs.domain.quota import QuotaExceeded, QuotaLedger, parse_count, parse_size


def test_reservations_cover_operations_in_flight() -> None:
    ledger = QuotaLedger()
    ledger.account("vf:a").limit_bytes = 100
    r1 = ledger.reserve(["vf:a"], 60, 0)
    with pytest.raises(QuotaExceeded):
        ledger.reserve(["vf:a"], 60, 0)  # both would pass a check that only one fits
    ledger.commit(r1, 10, 0)  # it really allocated less
    r2 = ledger.reserve(["vf:a"], 60, 0)
    ledger.refund(r2)
    ledger.refund(r2)  # idempotent
    acc = ledger.account("vf:a")
    assert (acc.used_bytes, acc.reserved_bytes) == (10, 0)


def test_scope_and_vfolder_are_both_checked() -> None:
    ledger = QuotaLedger()
    ledger.account("scope:s").limit_inodes = 3
    ledger.commit(ledger.reserve(["vf:a", "scope:s"], 0, 2), 0, 2)
    with pytest.raises(QuotaExceeded) as exc:
        ledger.reserve(["vf:b", "scope:s"], 0, 2)
    assert exc.value.key == "scope:s"
    assert ledger.account("vf:b").reserved_inodes == 0  # nothing held after a refusal
    ledger.apply(["vf:a", "scope:s"], 0, -2)  # decreases are never refused
    ledger.reserve(["vf:b", "scope:s"], 0, 2)


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", 0),
        ("10G", 10 << 30),
        ("512M", 512 << 20),
        ("4k", 4096),
        ("1GiB", 1 << 30),
        ("7", 7),
        (" 3T ", 3 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.5G", "10Q", "G", "10 G B x"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
    with pytest.raises(ValueError):
        parse_count(text)


def leased(ledger: QuotaLedger, key: str, lease_bytes: int, lease_inodes: int = 0) -> None:
    acc = ledger.set_limits(key, 1000, 10, shared=True)
    acc.lease_held = acc.lease_open = True
    acc.lease_bytes, acc.lease_inodes = lease_bytes, lease_inodes


def test_a_leased_account_is_checked_against_its_lease_not_its_limit() -> None:
    ledger = QuotaLedger()
    leased(ledger, "vf:a", 100, 2)
    r1 = ledger.reserve(["vf:a"], 60, 1)
    with pytest.raises(QuotaExceeded) as exc:
        ledger.reserve(["vf:a"], 60, 0)  # the limit (1000) has room; the lease has 40 left
    assert (exc.value.leased, exc.value.short_bytes, exc.value.short_inodes) == (True, 20, 0)
    ledger.commit(r1, 50, 1)  # spent from the lease as it is charged
    acc = ledger.account("vf:a")
    assert (acc.lease_bytes, acc.lease_inodes, acc.used_bytes) == (50, 1, 50)
    ledger.apply(["vf:a"], -30, -1)  # what is freed goes back to the lease
    assert (acc.lease_bytes, acc.lease_inodes) == (80, 2)
    ledger.shift(["vf:a"], 500, 0)  # another node's writes: nothing of this node's is spent
    assert (acc.lease_bytes, acc.used_bytes) == (80, 520)


def test_a_closed_lease_refuses_growth_but_not_frees() -> None:
    ledger = QuotaLedger()
    leased(ledger, "vf:a", 100)
    ledger.account("vf:a").lease_open = False  # not renewed within lease_ttl
    with pytest.raises(QuotaExceeded) as exc:
        ledger.reserve(["vf:a"], 1, 0)
    assert exc.value.leased
    ledger.commit(ledger.reserve(["vf:a"], 0, 0), -10, 0)  # a removal still goes through


def test_limits_decide_whether_an_account_is_leased() -> None:
    ledger = QuotaLedger()
    assert not ledger.set_limits("vf:a", 10, 0, shared=False).leased  # one node
    assert not ledger.set_limits("vf:a", 0, 0, shared=True).leased  # unlimited
    acc = ledger.set_limits("vf:a", 0, 5, shared=True)
    assert acc.leased
    acc.lease_held = acc.lease_open = True
    acc.lease_inodes = 1
    ledger.reserve(["vf:a"], 1 << 40, 1)  # bytes are unlimited: only inodes are leased
    with pytest.raises(QuotaExceeded):
        ledger.reserve(["vf:a"], 0, 1)
    # growth before a lease is held is not spent from one (the store counts it when the
    # node starts its lease: SharedStore.acquire's fresh)
    other = ledger.set_limits("vf:b", 100, 0, shared=True)
    ledger.apply(["vf:b"], 40, 0)
    assert other.lease_bytes == 0
