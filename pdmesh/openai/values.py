"""Typed, range-checked reads of request fields; each failure is a 400 naming the field."""

from __future__ import annotations

from typing import Any, Optional

from pdmesh.openai.errors import bad


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_text(s: str, param: str) -> str:
    """Text that can travel as UTF-8 and through C strings."""
    if "\x00" in s:
        raise bad(f"'{param}' contains a NUL character", param)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"'{param}' contains an unpaired UTF-16 surrogate", param) from None
    return s


def number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not is_number(v):
        raise bad(f"'{key}' must be a number", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}]; got {v}", key)
    return float(v)


def integer(body: dict, key: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return default
    if not is_int(v):
        raise bad(f"'{key}' must be an integer", key)
    if v < lo or v > hi:
        raise bad(f"'{key}' must be in [{lo}, {hi}]; got {v}", key)
    return v


def boolean(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean", key)
    return v


def string(body: dict, key: str) -> Optional[str]:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad(f"'{key}' must be a string", key)
    return check_text(v, key)


def obj(body: dict, key: str) -> dict:
    v = body.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad(f"'{key}' must be an object", key)
    return v


def token_ids(body: dict, key: str, vocab_size: int) -> tuple[int, ...]:
    """A list of token ids below ``vocab_size`` (0: unchecked)."""
    v = body.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(is_int(t) for t in v):
        raise bad(f"'{key}' must be a list of token ids", key)
    if any(t < 0 or (vocab_size and t >= vocab_size) for t in v):
        raise bad(f"'{key}': token ids must be in [0, {vocab_size})", key)
    return tuple(v)
