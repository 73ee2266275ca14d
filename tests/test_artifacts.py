"""Artifact hashing and crash-safe writes, checked against hashlib and the file system directly."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rac.store.artifacts import (
    TEMP_MARK,
    ArtifactError,
    ArtifactRef,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    file_uri,
    sha256_file,
    sha256_tree,
    sweep_temp,
    uri_path,
)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_tree_hash_is_content_addressed(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "sub").mkdir(parents=True)
        (root / "x.txt").write_text("x")
        (root / "sub" / "y.txt").write_text("yy")
    (b / f".z.txt{TEMP_MARK}123").write_text("torn")  # temp files are not content
    sha_a, size_a = sha256_tree(a)
    sha_b, size_b = sha256_tree(b)
    assert sha_a == sha_b and size_a == size_b == 3
    # independent recomputation of the documented rule
    digest = hashlib.sha256()
    for rel, body in (("sub/y.txt", b"yy"), ("x.txt", b"x")):
        digest.update(f"{rel}\0{len(body)}\0{hashlib.sha256(body).hexdigest()}\n".encode())
    assert sha_a == digest.hexdigest()
    (b / "x.txt").write_text("X")
    assert sha256_tree(b)[0] != sha_a
    (b / "x.txt").write_text("x")
    os.rename(b / "sub" / "y.txt", b / "sub" / "w.txt")  # renames change the hash
    assert sha256_tree(b)[0] != sha_a


def test_tree_patterns_select_files(tmp_path: Path) -> None:
    (tmp_path / "part-00000.parquet").write_bytes(b"p0")
    (tmp_path / "notes.txt").write_bytes(b"n")
    sha, size = sha256_tree(tmp_path, ("part-*.parquet",))
    only = tmp_path / "only"
    only.mkdir()
    (only / "part-00000.parquet").write_bytes(b"p0")
    assert (sha, size) == sha256_tree(only)


def test_ref_verify_detects_corruption(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    ref = ArtifactRef.of(p, kind="blob")
    assert ref.path == p.resolve() and ref.bytes == 5 and ref.check() is None
    assert ArtifactRef.from_json(ref.to_json()) == ref
    p.write_bytes(b"hellO")
    with pytest.raises(ArtifactError, match="sha256"):
        ref.verify()
    p.unlink()
    assert "does not exist" in (ref.check() or "")


def test_uri_roundtrip_and_bad_scheme(tmp_path: Path) -> None:
    p = tmp_path / "with space" / "f.txt"
    assert uri_path(file_uri(p)) == p.resolve()
    with pytest.raises(ValueError, match="s3"):
        uri_path("s3://bucket/key")


def test_atomic_write_replaces_and_cleans_up(tmp_path: Path) -> None:
    p = tmp_path / "d" / "f.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert p.read_bytes() == b"new"  # old content kept, temp removed
    assert os.listdir(p.parent) == ["f.json"]


def test_atomic_dir_publishes_whole_folder(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("died")
    assert sorted(os.listdir(dest)) == ["a"]
    with atomic_dir(dest) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(os.listdir(dest)) == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_killed_writer_leaves_only_temp_which_is_swept(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    code = (
        "import os, signal, sys\n"
        "from rac.store.artifacts import atomic_path\n"
        f"with atomic_path({str(target)!r}) as t:\n"
        "    t.write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert target.read_bytes() == b"old"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "out.bin"]
    assert len(leftovers) == 1 and TEMP_MARK in leftovers[0].name
    assert sweep_temp(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
