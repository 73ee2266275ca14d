"""One section of a run config built into its stage config, every problem collected as one line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


def known_keys(cls: type[BaseModel], drop: tuple[str, ...] = (), also: tuple[str, ...] = ()) -> str:
    """The keys a section takes: the fields of `cls` less `drop`, plus the run-level keys `also`."""
    return ", ".join(sorted({*(k for k in cls.model_fields if k not in drop), *also}))


def build_section(cls: type[C], data: Any, where: str, problems: list[str], drop: tuple[str, ...] = (),
                  extra: Mapping[str, Any] | None = None, also: tuple[str, ...] = ()) -> C | None:
    """cls(**data, **extra), or None with one line per problem appended to `problems` (`also`: run-level keys
    the section takes besides the fields of `cls`, named in the known-keys hint)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
        return None
    try:
        return cls(**data, **(extra or {}))
    except ValidationError as err:
        for e in err.errors():
            loc = ".".join(str(x) for x in (where, *e["loc"]))
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown key {loc!r}; known keys in {where}: {known_keys(cls, drop, also)}")
            elif e["type"] == "missing":
                problems.append(f"missing key {loc!r}; known keys in {where}: {known_keys(cls, drop, also)}")
            else:
                problems.append(f"{loc} = {e.get('input')!r}: {e['msg']}")
    except (ValueError, TypeError) as err:
        problems.append(f"{where}: {err}")
    return None
