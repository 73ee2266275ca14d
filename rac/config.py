"""Frozen, validated stage configs with a stable content hash that names their artifacts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base of every stage config: immutable, unknown keys rejected, hashable by content."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def canonical(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (defaults included), used for hashing and provenance."""
        return self.model_dump(mode="json")

    def stable_hash(self, length: int = 12) -> str:
        """Hex sha256 of the canonical JSON (sorted keys, no whitespace), truncated to `length`."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:length]

    @classmethod
    def known_keys(cls) -> list[str]:
        return sorted(cls.model_fields)
