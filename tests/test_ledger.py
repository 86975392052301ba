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
