"""Settings dataclasses built from plain mappings (YAML, JSON, env_config), with one clear error."""

from __future__ import annotations

import dataclasses

from autodfp.errors import AutoDFPError


def from_mapping(cls, data, what: str):
    """``cls(**data)``, naming unknown keys and wrong arguments in one line."""
    if not isinstance(data, dict):
        raise AutoDFPError(f"{what} must be a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AutoDFPError(f"unknown {what} key(s): {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise AutoDFPError(f"bad {what}: {exc}") from None
