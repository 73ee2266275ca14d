"""Engine I/O: activation store, batch plan, shard streaming, HF output writer, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_support import random_sequences, write_calib
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import rac.engine.sequential as seqmod
from rac.engine import CompressConfig, compress
from rac.engine.actstore import ActStore
from rac.engine.batches import CalibrationError, plan_batches
from rac.engine.output import plan_shards, write_hf_folder, write_safetensors_stream
from rac.models.assets import tiny_model
from rac.models.streaming import ShardError, WeightFiles
from rac.pruners import PruneConfig

CFG = CompressConfig(prune=PruneConfig(method="magnitude", sparsity=0.5), batch_tokens=64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_actstore_round_trip(tmp_path: Path, dtype: str) -> None:
    x = torch.randn(37, 24)
    store = ActStore.create(tmp_path / "a.bin", 37, 24, dtype)
    for start, stop in [(0, 10), (10, 11), (11, 37)]:
        store.write(start, x[start:stop])
    with pytest.raises(ValueError, match="not found"):
        ActStore.open(tmp_path / "a.bin")  # not committed yet
    store.commit()
    back = ActStore.open(tmp_path / "a.bin")
    expect = x.to(torch.bfloat16) if dtype == "bfloat16" else x
    assert torch.equal(back.read(0, 37), expect) and torch.equal(back.read(5, 3), expect[5:8])
    assert (tmp_path / "a.bin").stat().st_size == 37 * 24 * (2 if dtype == "bfloat16" else 4)
    with pytest.raises(ValueError, match=r"rows \[30, 40\)"):
        back.read(30, 10)
    with pytest.raises(ValueError, match="read-only"):
        back.write(0, x[:1])
    with pytest.raises(ValueError, match="'float16'"):
        ActStore.create(tmp_path / "b.bin", 1, 1, "float16")


def test_batch_plan_covers_every_token_once() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 200).tolist()
    order, batches = plan_batches(lengths, batch_tokens=64)
    assert order == sorted(range(200), key=lambda r: (lengths[r], r))  # by length, stable
    seen, start = [], 0
    for b in batches:
        assert b.start == start and list(b.lengths) == [lengths[r] for r in b.rows]
        assert len(b.rows) * b.seq_len <= 64 or len(b.rows) == 1  # padded size within budget
        mask = b.mask()
        assert mask.shape == (len(b.rows), b.seq_len) and mask.sum(1).tolist() == list(b.lengths)
        start += b.n_tokens
        seen.extend(b.rows)
    assert seen == order and start == sum(lengths)
    for a, b in zip(batches, batches[1:], strict=False):  # greedy: the next sequence did not fit
        assert (len(a.rows) + 1) * b.lengths[0] > 64


def test_weight_files_multi_shard(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    files = WeightFiles(tmp_path / "m")
    assert len(set(files.weight_map.values())) > 2
    state = model.state_dict()
    loaded = files.load(files.names())
    assert loaded.keys() == {k for k in state if k in files.weight_map}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert files.fingerprint() == WeightFiles(tmp_path / "m").fingerprint()


def _shards(tmp_path: Path) -> tuple[Path, list[Path]]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"))
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    src = tiny_model("qwen3")
    for f in src.iterdir():  # tokenizer files too
        if not (tmp_path / "m" / f.name).exists() and not f.name.endswith(".safetensors"):
            (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    return tmp_path / "m", sorted((tmp_path / "m").glob("*.safetensors"))


@pytest.mark.parametrize("damage", ["missing", "truncated", "header"])
def test_damaged_shard_is_named_and_nothing_written(tmp_path: Path, damage: str) -> None:
    model_dir, shards = _shards(tmp_path)
    victim = shards[1]
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) - 1000])
    else:
        data = victim.read_bytes()
        victim.write_bytes(data[:8] + b"{not json" + data[17:])
    calib = write_calib(tmp_path / "c.parquet", random_sequences(2, 500, [8]))
    with pytest.raises(ShardError, match=victim.name):
        compress(model_dir, calib, tmp_path / "out", CFG, tmp_path / "w")
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()


@pytest.mark.parametrize("bad,match", [
    ("vocab", "token id 512 at position 3 is outside the vocabulary"),
    ("length", "length 40 exceeds the model's context length 32"),
    ("segment", "segment label 7"),
    ("empty", "no sequences"),
])
def test_bad_calibration_is_named_and_nothing_written(tmp_path: Path, bad: str, match: str) -> None:
    model_dir = tiny_model("qwen3", max_position_embeddings=32)
    seqs = random_sequences(3, 500, [8], seed=1)
    if bad == "vocab":
        seqs[1][0][3] = 512  # vocab_size of the tiny models is 512
    elif bad == "length":
        seqs[2] = ([1] * 40, [1] * 40)
    elif bad == "segment":
        seqs[0][1][2] = 7
    calib = write_calib(tmp_path / "c.parquet", [] if bad == "empty" else seqs)
    with pytest.raises(CalibrationError, match=match):
        compress(model_dir, calib, tmp_path / "out", CFG, tmp_path / "w")
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    model_dir = tiny_model("qwen3")
    calib = write_calib(tmp_path / "c.parquet", random_sequences(2, 500, [8]))
    with pytest.raises(ValueError, match=r"start_at=\(2, 1\)"):
        compress(model_dir, calib, tmp_path / "out", CFG, tmp_path / "w", start_at=(2, 1))
    with pytest.raises(ValueError, match="cannot resume"):
        compress(model_dir, calib, tmp_path / "out", CFG, tmp_path / "w", start_at=(1, 0))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        compress(model_dir, calib, tmp_path / "full", CFG, tmp_path / "w")
    with pytest.raises(ValueError, match="'sleep'"):
        CompressConfig(prune=PruneConfig(sparsity=0.5), segment_weights={"sleep": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        CompressConfig(prune=PruneConfig(sparsity=0.5), segment_weights={"prompt": 0.0})


def test_at_most_one_layer_materialised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live: set[int] = set()
    peak = {"n": 0}
    real_mat, real_rel = seqmod.materialize, seqmod.release

    def mat(module: torch.nn.Module, *a: object, **k: object) -> None:
        real_mat(module, *a, **k)  # type: ignore[arg-type]
        live.add(id(module))
        peak["n"] = max(peak["n"], len(live))

    def rel(module: torch.nn.Module) -> None:
        real_rel(module)
        live.discard(id(module))

    monkeypatch.setattr(seqmod, "materialize", mat)
    monkeypatch.setattr(seqmod, "release", rel)
    calib = write_calib(tmp_path / "c.parquet", random_sequences(3, 500, [8]))
    compress(tiny_model("llama", num_hidden_layers=3), calib, tmp_path / "out", CFG, tmp_path / "w")
    assert peak["n"] == 1 and not live


def test_streaming_writer_round_trip(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "d": torch.randn(2, 2, 2).half()}
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16"}
    specs = [(k, names[v.dtype], list(v.shape)) for k, v in tensors.items()]
    write_safetensors_stream(tmp_path / "x.safetensors", specs, tensors.__getitem__, {"k": "v"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="'a'"):
        write_safetensors_stream(tmp_path / "y.safetensors", [("a", "F16", [3, 5])], tensors.__getitem__)


def test_hf_folder_sharded_and_atomic(tmp_path: Path) -> None:
    src = tiny_model("llama")
    files = WeightFiles(src)
    state = files.load(files.names())
    shards = plan_shards(files.specs, max_shard_bytes=60_000)
    assert len(shards) > 3 and sorted(n for s in shards for n in s) == sorted(files.specs)
    out = write_hf_folder(src, tmp_path / "out", files.specs, state.__getitem__, {"p": 1}, max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(shards)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)
    assert json.loads((out / "rac_provenance.json").read_text()) == {"p": 1}

    def broken(name: str) -> torch.Tensor:
        if name == "model.norm.weight":
            raise OSError("disk gone")
        return state[name]

    with pytest.raises(OSError, match="disk gone"):
        write_hf_folder(src, tmp_path / "out2", files.specs, broken, {})
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # no half-written folder, no temp left behind
    (tmp_path / ".out3.tmp-killed").mkdir()  # what a killed run leaves beside its output
    write_hf_folder(src, tmp_path / "out3", files.specs, state.__getitem__, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out3"]
