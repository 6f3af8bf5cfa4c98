"""Settings dataclasses built from plain mappings (YAML, JSON, env_config), with one clear error."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from autodfp.errors import AutoDFPError


def check_choice(value, choices, what: str) -> None:
    """One clear line unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise AutoDFPError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def from_mapping(cls, data, what: str):
    """``cls(**data)``, naming unknown keys and wrong arguments in one line."""
    if not isinstance(data, dict):
        raise AutoDFPError(f"{what} must be a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AutoDFPError(f"unknown {what} key(s): {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        _check_type(value, hints[name], f"{what} {name}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise AutoDFPError(f"bad {what}: {exc}") from None


_NAMES = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false",
          dict: "a mapping", list: "a list", type(None): "null"}


def _check_type(value, hint, what: str) -> None:
    """Plain JSON/YAML types against a field's annotation (nested dataclasses check their own
    fields); a number that is NaN or infinite is refused too."""
    options = (typing.get_args(hint)
               if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,))
    for option in options:
        option = typing.get_origin(option) or option
        if option not in _NAMES:
            return  # a nested settings class or anything richer: its own checks apply
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return
        elif option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        elif option is type(None) and value is None:
            return
        elif option not in (int, float, type(None)) and isinstance(value, option):
            return
    wanted = " or ".join(_NAMES[typing.get_origin(o) or o] for o in options)
    raise AutoDFPError(f"{what} must be {wanted}, got {value!r}")
