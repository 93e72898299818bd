"""The one size parser, ``_units.parse_size``: GNU coreutils' rules, written out here."""

from __future__ import annotations

import pytest

from warmpool._units import format_bytes, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("4096B", 4096), (" 12 b ", 12), (7, 7),
    ("64K", 64 * KiB), ("64k", 64 * KiB), ("64KiB", 64 * KiB), ("64KB", 64_000), ("64kb", 64_000),
    ("16M", 16 * MiB), ("16MiB", 16 * MiB), ("16MB", 16_000_000),
    ("8G", 8 * GiB), ("1.5G", 3 * GiB // 2), ("2GiB", 2 * GiB), ("1.7GB", 1_700_000_000), (".5G", GiB // 2),
    ("1T", TiB), ("1TB", 10**12),
])
def test_binary_without_b_decimal_with_b(text, expected):
    assert parse_size(text) == expected


def test_percent_of_a_total():
    assert parse_size("80%", total=1000) == 800
    with pytest.raises(ValueError, match="percentage"):
        parse_size("150%", total=1000)
    with pytest.raises(ValueError, match="not a size"):
        parse_size("80%")  # no total: not a size


@pytest.mark.parametrize("text", ["lots", "", "G", "B", "64iB", "1GiBB", "-1G", "1.2.3", "5 X", "1 E"])
def test_anything_else_is_a_value_error_naming_it(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_bytes_is_binary():
    assert [format_bytes(n) for n in (12, 3 * MiB // 2, 2 * GiB)] == ["12 B", "1.50 MiB", "2.00 GiB"]
