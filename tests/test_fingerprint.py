"""The model fingerprint covers weights and tokenizer content; its file-hash cache never hands out a stale hash.

Every test works on a private copy of the tiny model and a private hash cache (`cache_path` points into
tmp_path). `RACY_WINDOW_NS` is cut to 50 ms and `_settle` sleeps past it, so freshly copied files become
cacheable without waiting the default 2 s. Out of scope (see rac.models.file_hashes): a change that restores
size, mtime and ctime alike (a system clock set back, raw block-device edits).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rac.models import file_hashes
from rac.models.assets import tiny_model
from rac.models.streaming import ShardError, model_revision
from rac.store import artifacts

WINDOW_NS = 50_000_000
# the counted files the tiny model ships (transformers' save_pretrained + rac's tokenizer)
TINY_COUNTED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja"}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "hash-cache" / file_hashes.CACHE_NAME
    db.parent.mkdir()
    monkeypatch.setattr(file_hashes, "cache_path", lambda: db)
    monkeypatch.setattr(file_hashes, "RACY_WINDOW_NS", WINDOW_NS)
    return db


@pytest.fixture
def model(tmp_path: Path, cache: Path) -> Path:
    """A private copy of the tiny llama, old enough (past the racy window) to be cached."""
    out = Path(shutil.copytree(tiny_model("llama"), tmp_path / "model"))
    _settle()
    return out


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files whose bytes were hashed (every call of rac.store.artifacts.sha256_file)."""
    calls: list[str] = []
    real = artifacts.sha256_file

    def counting(path: Path | str) -> str:
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(artifacts, "sha256_file", counting)
    return calls


def _settle() -> None:
    time.sleep(2 * WINDOW_NS / 1e9)


def _flip_weight_byte(shard: Path) -> None:
    """Flip one byte in the tensor data of a safetensors file, in place (same inode and size)."""
    with open(shard, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        pos = 8 + n + (shard.stat().st_size - 8 - n) // 2
        fh.seek(pos)
        byte = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ino) == (b.st_size, b.st_mtime_ns, b.st_ino)


def test_counted_files_and_path_independence(model: Path, tmp_path: Path, hashed: list[str]) -> None:
    rev = model_revision(model)
    assert set(hashed) == TINY_COUNTED  # every counted file of the folder is hashed, nothing else
    other = Path(shutil.copytree(model, tmp_path / "elsewhere"))
    assert model_revision(other) == rev  # the fingerprint is of the content, not of the folder's path


def test_weights_changed_in_place_change_the_revision(model: Path, hashed: list[str]) -> None:
    shard = model / "model.safetensors"
    rev = model_revision(model)
    before = shard.stat()
    _flip_weight_byte(shard)
    after = shard.stat()
    assert (after.st_size, after.st_ino) == (before.st_size, before.st_ino)  # same shapes, same file
    hashed.clear()
    assert model_revision(model) != rev
    assert hashed == ["model.safetensors"]  # only the changed file is read again
    _flip_weight_byte(shard)  # flipped back: the old content, the old revision
    _settle()
    assert model_revision(model) == rev


def test_in_place_write_that_restores_mtime_still_misses(model: Path) -> None:
    """size, mtime and inode all restored: ctime (which user space cannot set) still tells."""
    shard = model / "model.safetensors"
    rev = model_revision(model)
    before = shard.stat()
    _flip_weight_byte(shard)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _same_stat(shard.stat(), before)
    assert model_revision(model) != rev


def test_replaced_file_with_same_size_and_mtime_misses(tmp_path: Path, cache: Path) -> None:
    """A cache row whose size and mtime match but whose file is a new one (new inode) is not used."""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 4096)
    _settle()
    assert file_hashes.sha256_cached(f) == artifacts.sha256_file(f)
    old = f.stat()
    new = tmp_path / "weights.new"
    new.write_bytes(b"b" * 4096)
    os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(new, f)
    st = f.stat()
    assert (st.st_size, st.st_mtime_ns) == (old.st_size, old.st_mtime_ns) and st.st_ino != old.st_ino
    assert file_hashes.sha256_cached(f) == hashlib.sha256(b"b" * 4096).hexdigest()


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                  "generation_config.json", "config.json"])
def test_tokenizer_or_config_change_changes_the_revision(model: Path, name: str) -> None:
    rev = model_revision(model)
    with open(model / name, "a") as fh:
        fh.write("\n")  # whitespace only: still the same JSON, but other bytes
    assert model_revision(model) != rev


@pytest.mark.parametrize("name", ["special_tokens_map.json", "merges.txt", "vocab.json", "added_tokens.json",
                                  "additional_chat_templates/tool_use.jinja", "modeling_custom.py"])
def test_a_new_tokenizer_file_changes_the_revision(model: Path, name: str) -> None:
    rev = model_revision(model)
    (model / name).parent.mkdir(exist_ok=True)
    (model / name).write_text("{}\n")
    assert model_revision(model) != rev


@pytest.mark.parametrize("name", ["README.md", "rac_provenance.json", "rac_asset.json", "notes.txt"])
def test_files_outside_the_model_do_not_count(model: Path, name: str, hashed: list[str]) -> None:
    rev = model_revision(model)
    (model / name).write_text("written after the first fingerprint\n")
    assert model_revision(model) == rev
    (model / name).write_text("and changed again\n")
    assert model_revision(model) == rev
    assert name not in hashed


def test_second_call_reads_no_file_bytes(model: Path, hashed: list[str]) -> None:
    rev = model_revision(model)
    assert sorted(hashed) == sorted(TINY_COUNTED)
    hashed.clear()
    assert model_revision(model) == rev
    assert hashed == []  # all six from the cache


def test_fresh_files_are_not_cached(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                    hashed: list[str]) -> None:
    """Within the racy window a second same-size write could keep every stat field: such a file is hashed
    but not stored, so the next call reads it again; once it is older than the window it is cached."""
    monkeypatch.setattr(file_hashes, "RACY_WINDOW_NS", 10**9)
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"x" * 100)
    file_hashes.sha256_cached(f)
    file_hashes.sha256_cached(f)
    assert hashed == ["fresh.bin", "fresh.bin"]
    monkeypatch.setattr(file_hashes, "RACY_WINDOW_NS", WINDOW_NS)
    _settle()
    file_hashes.sha256_cached(f)
    file_hashes.sha256_cached(f)
    assert hashed == ["fresh.bin"] * 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-table", "directory"])
def test_a_damaged_cache_is_ignored_and_rebuilt(model: Path, cache: Path, damage: str, hashed: list[str]) -> None:
    rev = model_revision(model)
    hashed.clear()
    if damage == "garbage":
        cache.write_bytes(b"not a sqlite database at all " * 100)
    elif damage == "truncated":
        data = cache.read_bytes()
        cache.write_bytes(data[: len(data) // 2 + 100])
    elif damage == "other-table":
        cache.unlink()
        with sqlite3.connect(cache) as conn:
            conn.execute("CREATE TABLE file_hashes (path TEXT PRIMARY KEY, sha256 TEXT)")
    else:
        cache.unlink()
        cache.mkdir()
    assert model_revision(model) == rev
    if damage == "directory":  # cannot be replaced by a file: hashed without a cache, correctly
        assert sorted(hashed) == sorted(TINY_COUNTED)
        return
    assert sorted(hashed) == sorted(TINY_COUNTED)  # nothing was taken from the damaged file
    hashed.clear()
    assert model_revision(model) == rev and hashed == []  # rebuilt, and used again
    with sqlite3.connect(cache) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("bad", ["", "zz" * 32, "0" * 63, None])
def test_a_malformed_row_is_not_trusted(model: Path, cache: Path, bad: str | None, hashed: list[str]) -> None:
    rev = model_revision(model)
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE file_hashes SET sha256 = ? WHERE path LIKE '%model.safetensors'",
                     (bad if bad is not None else 12345,))
    hashed.clear()
    assert model_revision(model) == rev
    assert hashed == ["model.safetensors"]


def test_concurrent_processes_share_the_cache(model: Path, cache: Path) -> None:
    code = (
        "import sys\nfrom pathlib import Path\nfrom rac.models import file_hashes\n"
        "file_hashes.RACY_WINDOW_NS = 0\n"
        "db = Path(sys.argv[1])\nfile_hashes.cache_path = lambda: db\n"
        "files = sorted(p for p in Path(sys.argv[2]).iterdir() if p.is_file())\n"
        "for _ in range(20):\n    out = file_hashes.sha256_files(files)\nprint(','.join(out))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache), str(model)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    expect = ",".join(artifacts.sha256_file(p) for p in sorted(q for q in model.iterdir() if q.is_file()))
    assert {o.strip() for o, _ in outs} == {expect}
    with sqlite3.connect(cache) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM file_hashes").fetchone() == (len(list(model.iterdir())),)


def test_required_files_and_truncated_shards(model: Path) -> None:
    shard = model / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(ShardError, match="truncated"):
        model_revision(model)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        model_revision(model)
    (model / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_revision(model)


def test_stages_are_recomputed_after_the_weights_change(model: Path, tmp_path: Path) -> None:
    """prompts -> prompt calibration, without Prefect: reused on an unchanged model; recomputed under new
    keys once the weights change in place (same shapes, same sizes)."""
    from rac.runs.run_config import load_run_config
    from rac.runs.stages import calib_step, prompts_step
    from rac.runs.workdir import RunRef
    from rac.store.index import Index

    cfg = load_run_config(Path(__file__).resolve().parent.parent / "data" / "configs" / "tiny.yaml")
    work = tmp_path / "work"
    work.mkdir()
    quiet: Callable[[str], None] = lambda _msg: None  # noqa: E731

    def run(run_id: str) -> tuple[RunRef, list[tuple[str, bool]]]:
        env = RunRef(str(work), run_id, str(model), model_revision(model))
        Index(work).create_run(run_id, "t", {}, {}, "", 1)
        prompts = prompts_step(env, cfg.prompts, log=quiet)
        calib = calib_step(env, "prompt", cfg.calibrations["prompt"], prompts, None, log=quiet)
        return env, [(s.stage_key, s.reused) for s in (prompts, calib)]

    env1, first = run("r1")
    assert [reused for _, reused in first] == [False, False]
    env2, again = run("r2")
    assert env2.model_revision == env1.model_revision
    assert again == [(key, True) for key, _ in first]  # unchanged model: both reused, same keys
    _flip_weight_byte(model / "model.safetensors")
    env3, changed = run("r3")
    assert env3.model_revision != env1.model_revision
    assert [reused for _, reused in changed] == [False, False]  # recomputed ...
    assert not {key for key, _ in changed} & {key for key, _ in first}  # ... under new keys
    rows = {r["name"]: (r["stage_key"], r["reused"]) for r in Index(work).run_stages("r3")}
    assert rows == {"prompts": (changed[0][0], False), "calib/prompt": (changed[1][0], False)}
