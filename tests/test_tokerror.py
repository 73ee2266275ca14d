"""Per-token reconstruction error against brute force and a hand-computed layer input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from rac.data.segments import CALIB_META_KEY, CALIB_SCHEMA
from rac.eval.tokerror import layer_matrix, sequence_errors, served_weights, token_error_heatmap
from rac.models.assets import tiny_model
from rac.pruners.error import per_token_error

TARGET = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the tiny model where only layer 1's q_proj is magnitude-pruned to 50%."""
    dense = tiny_model("llama")
    out = tmp_path_factory.mktemp("pruned") / "model"
    shutil.copytree(dense, out)
    sd = load_file(str(out / "model.safetensors"))
    w = sd[TARGET]
    sd[TARGET] = w * (w.abs() > w.abs().flatten().median())
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return dense, out


def test_sequence_errors_use_the_dense_layer_inputs(pruned: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    dense, out = pruned
    model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    ids = list(range(5, 25))
    errs = sequence_errors(model, served_weights(out), ids)
    assert all(float(e.abs().max()) == 0 for n, e in errs.items() if not n.startswith("model.layers.1.self_attn.q"))
    with torch.no_grad():  # independent: layer 1's q_proj input = its input norm of layer 0's output
        h = model.model.embed_tokens(torch.tensor([ids]))
        pos = torch.arange(len(ids))[None]
        emb = model.model.rotary_emb(h, pos)
        h0 = model.model.layers[0](h, position_embeddings=emb, attention_mask=None, position_ids=pos)
        h0 = h0[0] if isinstance(h0, tuple) else h0
        x = model.model.layers[1].input_layernorm(h0)[0]  # [T, hidden]
    w = model.model.layers[1].self_attn.q_proj.weight
    want = per_token_error(w, load_file(str(out / "model.safetensors"))[TARGET], x)
    torch.testing.assert_close(errs["model.layers.1.self_attn.q_proj"], want, rtol=1e-4, atol=1e-7)
    mat = layer_matrix(errs)  # [L, T]
    n_lin = sum(n.startswith("model.layers.1.") for n in errs)
    torch.testing.assert_close(mat[1], want / n_lin, rtol=1e-4, atol=1e-7)
    assert mat.shape == (2, len(ids)) and float(mat[0].abs().max()) == 0


def test_heatmap_png_and_prompt_decode_split(pruned: tuple[Path, Path], tmp_path: Path) -> None:
    dense, out = pruned
    seg = [0] * 12 + [1] * 20
    table = pa.table({"seq_id": [0, 1], "source": ["generic", "cot:x/0"],
                      "input_ids": [list(range(3, 35)), list(range(40, 72))],
                      "segment": [[2] * 32, seg]}, schema=CALIB_SCHEMA)
    calib = tmp_path / "calib.parquet"
    pq.write_table(table.replace_schema_metadata({CALIB_META_KEY: json.dumps({"kind": "rac"})}), calib)
    s = token_error_heatmap(dense, out, calib, tmp_path / "fig" / "heat.png", n_seqs=2)
    png = (tmp_path / "fig" / "heat.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert s.seq_ids == [1, 0] and s.n_tokens == 64
    assert s.prompt_mean > 0 and s.decode_mean > 0 and len(s.layer_prompt_mean) == 2
    assert s.layer_prompt_mean[0] == 0 and s.layer_decode_mean[1] > 0
