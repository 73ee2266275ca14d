"""Frozen, validated stage configs with a stable content hash that names their artifacts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict


def canonical_json(obj: Any) -> str:
    """The one canonical JSON text of plain data (sorted keys, no whitespace): what every hash is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_json(obj: Any) -> str:
    """Hex sha256 of `canonical_json(obj)`: the stable content hash of a config or a stage key."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


class StageConfig(BaseModel):
    """Base of every stage config: immutable, unknown keys rejected, hashable by content."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def canonical(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (defaults included), used for hashing and provenance."""
        return self.model_dump(mode="json")

    def stable_hash(self, length: int = 12) -> str:
        """Hex sha256 of the canonical JSON (sorted keys, no whitespace), truncated to `length`."""
        return sha256_json(self.canonical())[:length]
