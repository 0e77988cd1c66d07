"""Checks for the per-transport fields of a peer's descriptor (data from a stranger).

A transport declares what it publishes as :class:`Field` rows (``Transport.segment_fields``,
``Transport.buffer_fields``); :func:`check_fields` runs them inside the one descriptor validator
(:func:`mooncake.metadata.base.validate_descriptor`) before any transport sees the fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "check_fields", "FieldError"]


class FieldError(ValueError):
    """A field of a descriptor is missing or out of its allowed range (message names both)."""


@dataclass(frozen=True)
class Field:
    """One published field: ``kind`` is ``"int"``, ``"str"`` or ``"bool"``.

    ints lie in ``[lo, hi]``; strings are at most ``max_len`` characters and, with ``pattern``,
    match it completely.  ``required`` fields must be present.
    """

    kind: str
    lo: int = 0
    hi: int = (1 << 64) - 1
    max_len: int = 256
    pattern: str | None = None
    required: bool = True

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if self.kind == "int":
            if type(value) is not int:
                return f"must be an integer, got {type(value).__name__}"
            if not self.lo <= value <= self.hi:
                return f"{value} is outside {self.lo}..{self.hi}"
        elif self.kind == "str":
            if type(value) is not str:
                return f"must be a string, got {type(value).__name__}"
            if len(value) > self.max_len:
                return f"is longer than {self.max_len} characters"
            if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
                return f"{value[:80]!r} does not match {self.pattern!r}"
        elif self.kind == "bool":
            if type(value) is not bool:
                return f"must be true or false, got {type(value).__name__}"
        return None


def check_fields(fields: Any, spec: dict[str, Field], where: str) -> None:
    """Raise :class:`FieldError` naming ``where.field`` when ``fields`` breaks ``spec``.
    Fields not in ``spec`` are left alone (a newer peer may publish more)."""
    if not isinstance(fields, dict):
        raise FieldError(f"{where} must be an object, got {type(fields).__name__}")
    for name, f in spec.items():
        if name not in fields:
            if f.required:
                raise FieldError(f"{where} lacks the field {name!r}")
            continue
        why = f.check(fields[name])
        if why:
            raise FieldError(f"{where}.{name} {why}")
