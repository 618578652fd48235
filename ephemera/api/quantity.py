"""Kubernetes resource quantities (`500m`, `4Gi`, `1e3`), parsed for comparison."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# The same grammar as the CRD's pattern (no sign: quotas are never negative).
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)
_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(value: str | int) -> Decimal:
    """Return the quantity's value in base units; raise ValueError for anything Kubernetes refuses."""
    text = str(value).strip()
    if not _QUANTITY.match(text):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
    match = re.match(r"^([0-9.]+)(.*)$", text)
    assert match is not None  # guaranteed by the pattern above
    number, suffix = match.groups()
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * _SUFFIXES[suffix]
    except (InvalidOperation, KeyError) as err:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from err
