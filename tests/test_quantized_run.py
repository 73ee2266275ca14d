"""`rac run` with quantization (data/configs/tiny-gptq.yaml: GPTQ W4A16 and joint 2:4 + W4A16): every stage of a
pruning run (prune, evaluation, per-token error, proxies, report) runs on the compressed-tensors folders, the
index records them, and what transformers serves from a folder is its packed codes times its scales."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from rac.models.loading import load_causal_lm
from rac.store.index import Index

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "data" / "configs" / "tiny-gptq.yaml"
JOBS = ("prompt-gptq-w4g32", "rac-gptq-w4g32", "prompt-sparsegpt-2of4-w4g32", "rac-sparsegpt-2of4-w4g32")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from prefect.testing.utilities import prefect_test_harness

    from rac_prefect.flows.prune import rac_prune

    work = tmp_path_factory.mktemp("gptq")
    with prefect_test_harness(server_startup_timeout=120):
        state = rac_prune(config_path=str(CONFIG), run_id="q", work_dir=str(work), return_state=True)
        yield {"work": work, "result": state.result()}


def _unpacked(folder: Path, module: str) -> torch.Tensor:
    """q * scale [out, in] from the folder's packed int4 words, decoded here by hand (4 bits per field, offset 8)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    names = [f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_shape"]
    with safe_open(str(folder / index["weight_map"][names[0]]), framework="pt") as f:
        words, scale, shape = (f.get_tensor(n) for n in names)
    out, cols = (int(v) for v in shape)
    j = torch.arange(cols)
    codes = ((words[:, j // 8] >> (4 * (j % 8))) & 0xF) - 8  # [out, cols]
    width = cols // scale.shape[1]
    return codes.float() * scale.float().repeat_interleave(width, dim=1)[:out]


def test_every_stage_runs_on_the_quantized_folders(run: dict[str, Any]) -> None:
    work = run["work"]
    idx = Index(work)
    assert idx.get_run("q")["status"] == "done"  # type: ignore[index]
    names = {s["name"]: s for s in idx.run_stages("q")}
    for stage in ("prune", "eval", "tokerror", "proxies"):
        for job in JOBS:
            assert names[f"{stage}/{job}"]["status"] == "done", f"{stage}/{job}"
    proxies = {r["label"]: r for r in idx.proxies("q")}
    assert set(proxies) == set(JOBS)
    assert all(r["pruned_nll"] > 0 and 0 <= r["top1_agreement"] <= 1 for r in proxies.values())
    report = Path(run["result"]["report"]).read_text()
    assert all(job in report for job in JOBS)


@pytest.mark.parametrize("job", JOBS)
def test_served_weights_are_the_packed_codes_times_scales(run: dict[str, Any], job: str) -> None:
    work = run["work"]
    idx = Index(work)
    key = {s["name"]: s for s in idx.run_stages("q")}[f"prune/{job}"]["stage_key"]
    folder = work / "stages" / "prune" / key / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    prov = json.loads((folder / "rac_provenance.json").read_text())
    assert prov["quantization"]["scheme"] == "w4g32" and prov["quantization"]["dense_linears"] == ["lm_head"]
    model = load_causal_lm(folder, torch.float32)  # decompressed at load
    modules = dict(model.named_modules())
    rows = idx.layer_rows(key)
    assert len(rows) == 2 * 7
    for r in rows:
        served = modules[r["linear"]].weight.detach()
        assert torch.equal(served, _unpacked(folder, r["linear"])), r["linear"]
        assert r["sparsity"] == pytest.approx(float((served == 0).float().mean()), abs=1e-6), r["linear"]
        if "2of4" in job:
            assert int((served != 0).reshape(served.shape[0], -1, 4).sum(-1).max()) <= 2, r["linear"]
