"""Artifact references (URI + sha256 + size) and crash-safe file writes.

Every file the pipeline produces is written to a temp file in the same folder, fsynced, and moved into
place with `os.replace`, so a reader sees either the old file or the complete new one, never a torn one.
Folders are published the same way (temp folder, rename). Stale temp files from a killed process carry
the marker `.tmp-` in their name and are removed by `sweep_temp`.

A folder's sha256 is the sha256 over its sorted (relative path, size, file sha256) lines, so it names the
folder's content independently of where it lives or of file timestamps.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

TEMP_MARK = ".tmp-"
_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """An artifact is missing or its content does not match its recorded sha256."""


def file_uri(path: Path | str) -> str:
    """`file://` URI of an absolute (resolved) path."""
    return Path(path).resolve().as_uri()


def uri_path(uri: str) -> Path:
    """Local path of a `file://` URI (or of a plain path); other schemes raise ValueError."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path)) if parsed.scheme else Path(uri)
    raise ValueError(f"artifact URI {uri!r} has scheme {parsed.scheme!r}; only file:// is supported")


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_files(folder: Path | str, patterns: tuple[str, ...] = ("*",)) -> list[Path]:
    """Regular files under `folder` (recursive, sorted) whose relative path matches one of `patterns`.

    Temp files (names containing `.tmp-`) are never part of a tree.
    """
    root = Path(folder)
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or TEMP_MARK in path.name:
            continue
        if any(fnmatch.fnmatch(rel, pat) for pat in patterns):
            out.append(path)
    return out


def sha256_tree(folder: Path | str, patterns: tuple[str, ...] = ("*",)) -> tuple[str, int]:
    """(hex sha256, total bytes) of the files of a folder selected by `patterns` (see module docstring)."""
    root = Path(folder)
    if not root.is_dir():
        raise ArtifactError(f"artifact folder {str(root)!r} does not exist")
    digest = hashlib.sha256()
    total = 0
    for path in tree_files(root, patterns):
        size = path.stat().st_size
        total += size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest(), total


def sha256_path(path: Path | str, patterns: tuple[str, ...] = ("*",)) -> tuple[str, int]:
    """(sha256, bytes) of a file, or of a folder's selected files."""
    p = Path(path)
    if p.is_dir():
        return sha256_tree(p, patterns)
    if not p.is_file():
        raise ArtifactError(f"artifact {str(p)!r} does not exist")
    return sha256_file(p), p.stat().st_size


@dataclass(frozen=True)
class ArtifactRef:
    """A produced file or folder: where it is, what it contains (sha256), how big, what it is."""

    uri: str
    sha256: str
    bytes: int
    kind: str = ""
    patterns: tuple[str, ...] = ("*",)

    @property
    def path(self) -> Path:
        return uri_path(self.uri)

    @classmethod
    def of(cls, path: Path | str, kind: str = "", patterns: tuple[str, ...] = ("*",)) -> ArtifactRef:
        """Hash an existing file or folder and reference it."""
        sha, size = sha256_path(path, patterns)
        return cls(uri=file_uri(path), sha256=sha, bytes=size, kind=kind, patterns=tuple(patterns))

    def check(self) -> str | None:
        """None when the artifact exists with its recorded sha256, else why not (a message)."""
        try:
            sha, _ = sha256_path(self.path, self.patterns)
        except ArtifactError as err:
            return str(err)
        if sha != self.sha256:
            return f"artifact {self.uri} has sha256 {sha[:12]}, recorded {self.sha256[:12]}"
        return None

    def verify(self) -> ArtifactRef:
        """Return self when the content matches, else raise ArtifactError saying what differs."""
        problem = self.check()
        if problem is not None:
            raise ArtifactError(problem)
        return self

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "bytes": self.bytes, "kind": self.kind,
                "patterns": list(self.patterns)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArtifactRef:
        return cls(uri=data["uri"], sha256=data["sha256"], bytes=int(data["bytes"]),
                   kind=data.get("kind", ""), patterns=tuple(data.get("patterns", ["*"])))


def fsync_file(path: Path | str) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Flush a folder's entries (renames, creations) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path | str) -> Path:
    """A fresh temp name in the same folder as `path` (same filesystem, so os.replace is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp file path; on success fsync it and move it onto `path`, on error remove it."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    try:
        yield tmp
        if not tmp.is_file():
            raise ArtifactError(f"nothing was written to the temp file for {str(dest)!r}")
        fsync_file(tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write bytes to `path` atomically (temp file, fsync, os.replace); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 text to `path` atomically."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    """Write an indented, key-sorted JSON document atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temp folder; on success fsync its files and rename it to `path` (replacing an old one)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
        for f in tree_files(tmp):
            fsync_file(f)
        if dest.exists():
            old = temp_sibling(dest)
            os.replace(dest, old)
            shutil.rmtree(old)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sweep_temp(folder: Path | str) -> list[Path]:
    """Remove temp files/folders left under `folder` by killed writers; returns what was removed."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.rglob(f"*{TEMP_MARK}*"), key=lambda p: len(p.parts), reverse=True):
        if not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed
