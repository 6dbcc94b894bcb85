"""Decoding JSON into frozen dataclasses (the sections of ``manifest.py``), with precise errors.

Each section's JSON keys and types come from its dataclass fields (the annotation strings that
``from __future__ import annotations`` leaves), so the schema is written down once. Every key
is required except nullable ones (``X | None``), which may be absent. Errors are ``FieldError``
carrying the full JSON path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")

# A section's name (as its fields' annotations spell it) -> its dataclass.
Sections = Mapping[str, type]


class FieldError(ValueError):
    """An invalid value of one field; the caller prefixes the section path."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(v: object) -> int | None:
    return v if is_int(v) else None  # type: ignore[return-value]


def _check_float(v: object) -> float | None:
    return float(v) if _is_float(v) else None  # type: ignore[arg-type]


def _check_bool(v: object) -> bool | None:
    return v if isinstance(v, bool) else None


def _check_str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _check_list(item: Callable[[object], Any]) -> Callable[[object], tuple[Any, ...] | None]:
    def check(v: object) -> tuple[Any, ...] | None:
        if not isinstance(v, list):
            return None
        out = tuple(item(x) for x in v)
        return None if any(x is None for x in out) else out

    return check


def _check_str_map(v: object) -> dict[str, str] | None:
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        return None
    return dict(v)


# annotation string -> (JSON type name for messages, checker returning None when invalid)
_CHECKERS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "int": ("an integer", _check_int),
    "float": ("a number", _check_float),
    "bool": ("true or false", _check_bool),
    "str": ("a string", _check_str),
    "tuple[int, ...]": ("a list of integers", _check_list(_check_int)),
    "tuple[float, ...]": ("a list of numbers", _check_list(_check_float)),
    "tuple[str, ...]": ("a list of strings", _check_list(_check_str)),
    "Mapping[str, str]": ("an object of strings", _check_str_map),
}


def _decode_value(annotation: str, value: object, path: str, sections: Sections) -> Any:
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise FieldError(path, "must not be null")
    if base in sections:
        return parse_section(sections[base], value, path, sections)
    type_name, check = _CHECKERS[base]
    decoded = check(value)
    if decoded is None:
        raise FieldError(path, f"must be {type_name}, got {value!r}")
    return decoded


def parse_section(cls: type[T], data: object, path: str, sections: Sections) -> T:
    """Builds dataclass ``cls`` from a JSON object found at ``path`` (e.g. "limits"); fields
    annotated with a name in ``sections`` are parsed as those nested sections."""
    if not isinstance(data, dict):
        raise FieldError(path, f"must be an object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise FieldError(f"{path}.{unknown[0]}", "unknown key")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        sub = f"{path}.{f.name}"
        if f.name not in data:
            # Only nullable keys may be left out; a dataclass default is for code, not files.
            if not str(f.type).endswith(" | None"):
                raise FieldError(sub, "missing")
            continue
        kwargs[f.name] = _decode_value(str(f.type), data[f.name], sub, sections)
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise FieldError(f"{path}.{exc.name}", exc.message) from exc
