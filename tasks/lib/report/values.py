"""Small value helpers of the report: tolerant number/string access to documents a node wrote,
quantiles, and the formatting shared by report.md and the terminal."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tasks.lib import untrusted


def quantile(values: Iterable[Any], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation (numpy's default); non-numbers ignored."""
    data = sorted(v for v in (_number(x) for x in values) if v is not None)
    if not data:
        return None
    position = (len(data) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def _get(document: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(document, Mapping):
            return None
        document = document.get(key)
    return document


def _number(value: Any) -> float | None:
    return untrusted.finite_number(value)


def _integer(value: Any) -> int | None:
    """An int of a document or a digit string, bounded (a node's summary may hold anything)."""
    if isinstance(value, str):
        text = value.strip()
        return untrusted.int_text(text) if text.isascii() and text.isdigit() else None
    return untrusted.plain_int(value)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_int(value: int | None) -> str:
    return "?" if value is None else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _signed(value: float | None, unit: str) -> str:
    return "?" if value is None else f"{value:+.1f}{unit}"
