"""What every config module shares: the error type and the bound check."""

from __future__ import annotations


class ConfigError(ValueError):
    """A params file or override that does not fit the schema; the message names the key."""


def check_bounds(where: str, minimum: float, **values: float) -> None:
    """``ConfigError`` naming the first ``where.key`` whose value is below ``minimum``."""
    for key, value in values.items():
        if value < minimum:
            raise ConfigError(f"{where}.{key}: must be >= {minimum:g}, got {value}")
