"""Argument validation shared by every public constructor and function.

Each helper raises ``ValueError`` or ``TypeError`` whose message names the
parameter and shows the offending value, so a user sees at once which argument
to fix. They return the validated value so constructors can write
``self.alpha = check_positive('alpha', alpha)``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Real
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "check_choice",
    "check_fraction",
    "check_non_negative_int",
    "check_number",
    "check_positive",
    "check_positive_int",
    "check_probabilities",
]


def check_number(name: str, value: Any) -> float:
    """Return ``value`` as a float after checking it is a finite real number.

    Args:
        name: Parameter name used in the error message.
        value: The value to check. ``bool`` is rejected even though it is an int.

    Returns:
        ``float(value)``.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float after checking it is finite and > 0."""
    value = check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` after checking it is an ``int`` >= 1."""
    return _check_int(name, value, 1)


def check_non_negative_int(name: str, value: Any) -> int:
    """Return ``value`` after checking it is an ``int`` >= 0."""
    return _check_int(name, value, 0)


def check_fraction(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = 1.0,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a float after checking it lies in an interval.

    Args:
        name: Parameter name used in the error message.
        value: The value to check.
        low: Lower bound of the interval.
        high: Upper bound of the interval.
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.

    Returns:
        ``float(value)``.
    """
    value = check_number(name, value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_choice(name: str, value: T, choices: Collection[T]) -> T:
    """Return ``value`` after checking it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(map(repr, choices))}, got {value!r}")
    return value


def check_probabilities(name: str, values: Any, length: int | None = None) -> list[float]:
    """Return ``values`` normalised to sum to 1 after checking they are valid weights.

    Args:
        name: Parameter name used in the error message.
        values: A sequence of non-negative finite weights, not all zero.
        length: The number of weights expected, if known.

    Returns:
        The weights divided by their sum.
    """
    try:
        weights = [check_number(name, v) for v in values]
    except TypeError as err:
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from err
    if length is not None and len(weights) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(weights)}: {values!r}")
    if any(w < 0 for w in weights):
        raise ValueError(f"{name} must be non-negative, got {values!r}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"{name} must not be all zero, got {values!r}")
    return [w / total for w in weights]
