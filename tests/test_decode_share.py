"""How much decode is enough (docs/decode-share.md): a prune entry's segment weights reach the engine's H
(against a brute-force X_s^T X_s of the dense model), change the stage key and the label only when given, and
are checked in one line; a `decode_share` calibration is exact at its budget, and refuses what it cannot meet."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from engine_support import random_sequences, write_calib
from transformers import AutoModelForCausalLM

import rac.engine.prune_step as prune_step
from rac.data.calib import CalibConfig, DecodeShareError, build_calibration
from rac.data.segments import SEGMENT_IDS
from rac.engine import compress
from rac.models.assets import tiny_model
from rac.reporting.compare import _setting
from rac.reporting.export import PrunedModel
from rac.runs.run_config import RunConfigError, load_run_config, parse_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "data/configs"
P, D = SEGMENT_IDS["prompt"], SEGMENT_IDS["decode"]


def _run(*entries: dict[str, Any], calibrations: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": "tiny-llama", "prompts": {"source": "gsm8k", "n": 4},
            "calibrations": calibrations or {"prompt": {"kind": "prompt"}, "rac": {"kind": "rac"}},
            "compress": {"act_dtype": "float32", "compute_dtype": "float32", "batch_tokens": 48},
            "prune": [{"method": "sparsegpt", "sparsity": 0.5}, *entries]}


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(RunConfigError) as err:
        parse_run_config(data)
    return [line[4:] for line in str(err.value).splitlines()[1:]]


def _brute_hessian(model_dir: Path, seqs: list[tuple[list[int], list[int]]], weights: dict[str, float]) -> torch.Tensor:
    """sum_s w_s X_s^T X_s of the input of layer 0's q_proj, in float64, one full-model forward per sequence."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs: list[torch.Tensor] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0][0]))
    H = torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for ids, seg in seqs:
            model(input_ids=torch.tensor([ids]), use_cache=False)
            x, labels = inputs.pop().double(), torch.tensor(seg)  # [L, d], [L]
            for name, w in weights.items():
                xs = x[labels == SEGMENT_IDS[name]]  # [T_s, d]
                H += w * xs.T @ xs
    hook.remove()
    return H


@pytest.mark.parametrize("weights", [{"prompt": 1.0, "decode": 0.0}, {"prompt": 0.0, "decode": 1.0},
                                     {"prompt": 1.0, "decode": 3.0}])
def test_entry_weights_reach_the_hessian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         weights: dict[str, float]) -> None:
    """The override of a parsed prune entry is the H the engine hands the pruner for layer 0's first group:
    1:0 is the prompt tokens' X^T X alone, 0:1 the decode tokens', 1:3 their weighted sum."""
    *_, job = parse_run_config(_run({"method": "sparsegpt", "sparsity": 0.5, "segment_weights": weights,
                                     "calibrations": ["rac"]})).jobs
    assert job.compress.segment_weights == weights and job.calibration == "rac"
    assert job.label == f"rac-sparsegpt-50pct-p{weights['prompt']:g}d{weights['decode']:g}"
    model_dir = tiny_model("llama")
    seqs = random_sequences(5, 500, [12, 16, 20], seed=7)
    seen: list[tuple[str, torch.Tensor]] = []
    real = prune_step.prune_linear

    def spy(run: Any, prefix: str, rel: str, H: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((prefix + rel, H.detach().clone()))
        return real(run, prefix, rel, H, *args, **kwargs)

    monkeypatch.setattr(prune_step, "prune_linear", spy)
    compress(model_dir, write_calib(tmp_path / "c.parquet", seqs), tmp_path / "out", job.compress, tmp_path / "work")
    name, H = seen[0]
    assert name == "model.layers.0.self_attn.q_proj"
    want = _brute_hessian(model_dir, seqs, weights)
    torch.testing.assert_close(H.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    other = {"prompt": weights["decode"], "decode": weights["prompt"]}  # the other weighting differs
    assert not torch.allclose(H.double(), _brute_hessian(model_dir, seqs, other), rtol=1e-2)


def test_weightings_are_distinct_jobs_and_plain_entries_keep_their_keys() -> None:
    cfg = load_run_config(CONFIGS / "tiny-decode-share.yaml")
    by = {j.label: j for j in cfg.jobs}
    assert list(by) == ["prompt-sparsegpt-50pct", "rac-sparsegpt-50pct", "rac-d25-sparsegpt-50pct",
                        "rac-d50-sparsegpt-50pct", "rac-sparsegpt-50pct-p1d0", "rac-sparsegpt-50pct-p1d3",
                        "rac-sparsegpt-50pct-p0d1"]
    hashes = {label: j.compress.stable_hash() for label, j in by.items()}
    # the prune stage's config hash of an entry without override, as before per-entry weights (tiny.yaml's)
    assert hashes["rac-sparsegpt-50pct"] == hashes["prompt-sparsegpt-50pct"] == "4c52c814012d"
    assert load_run_config(CONFIGS / "tiny.yaml").jobs[0].compress.stable_hash() == "4c52c814012d"
    assert len({hashes[k] for k in hashes if k.endswith(("p1d0", "p1d3", "p0d1"))} | {"4c52c814012d"}) == 4
    assert by["rac-sparsegpt-50pct-p1d3"].compress.canonical()["segment_weights"] == {"prompt": 1.0, "decode": 3.0}
    assert by["rac-sparsegpt-50pct-p1d3"].compress.prune == by["rac-sparsegpt-50pct"].compress.prune
    assert parse_run_config(cfg.canonical()) == cfg  # the stored form resumes to the same grid
    plain = load_run_config(CONFIGS / "tiny.yaml").canonical()["prune"]
    assert all("segment_weights" not in e and "calibrations" not in e for e in plain)  # run fingerprints unchanged
    qwen = load_run_config(CONFIGS / "results/qwen-gptq.yaml")  # entries without override: keys as before the switch
    assert [j.compress.stable_hash() for j in qwen.jobs][::3] == ["074c8e63f27f", "33af6ed74218"]  # (grid: qmax)
    assert {k: c.stable_hash() for k, c in qwen.calibrations.items()} == {
        "generic": "f5d98425b394", "prompt": "6542d474ea54", "rac": "ee8b0e62ae53"}
    shared = load_run_config(CONFIGS / "results/qwen-decode-share.yaml")  # runs in qwen-grid's / qwen-owl's work dir
    for other in ("qwen-grid", "qwen-owl"):  # qwen-grid's data and evaluation ...
        base = load_run_config(CONFIGS / f"results/{other}.yaml")
        assert {k: shared.calibrations[k] for k in ("prompt", "rac")} == {k: base.calibrations[k] for k in ("prompt", "rac")}
        assert (shared.prompts, shared.generate, shared.eval, shared.eval_prompts) == (
            base.prompts, base.generate, base.eval, base.eval_prompts)
    plain = {j.label: j.compress for j in base.jobs if j.label in ("prompt-sparsegpt-50pct", "rac-sparsegpt-50pct")}
    assert {j.label: j.compress for j in shared.jobs if j.label in plain} == plain  # ... and qwen-owl's prune stages
    assert shared.proxies == base.proxies and shared.jobs[0].compress.compute_dtype == "float32"
    assert [j.label for j in shared.jobs][:3] == [
        "rac-sparsegpt-50pct-p1d0", "rac-sparsegpt-50pct-p0d1", "rac-sparsegpt-50pct-p1d3"]  # new models first
    assert len(shared.jobs) == 7


def test_settings_show_the_weighting() -> None:
    row = {"calibration": "rac", "sparsity": 0.5, "prune_cfg": {"nm": None}}
    assert _setting({**row, "segment_weights": {"prompt": 1.0, "decode": 3.0}}) == "50% p1d3"
    assert _setting({**row, "segment_weights": {"prompt": 1.0, "decode": 1.0, "other": 1.0}}) == "50%"
    assert _setting(row) == "50%"  # not recorded: the default
    owl = {**row, "prune_cfg": {"nm": None, "allocation": {"kind": "owl"}}, "segment_weights": {"decode": 1.0}}
    assert _setting(owl) == "50% owl d1"
    model = PrunedModel("rac-sparsegpt-50pct-p0.5d1", "rac", "sparsegpt", 0.5, None, "k", Path("."), None,  # type: ignore[arg-type]
                        None, segment_weights={"prompt": 0.5, "decode": 1.0})
    assert model.setting == "50% p0.5d1"


@pytest.mark.parametrize("weights,fragment", [
    ({"prompt": -1, "decode": 1}, "prune[1].segment_weights = {'prompt': -1, 'decode': 1}: segment_weights must be "
                                  "finite, >= 0 and not all 0, got {'prompt': -1.0, 'decode': 1.0}"),
    ({"prompt": 0, "decode": 0}, "not all 0"),
    ({"sleep": 1}, "prune[1].segment_weights = {'sleep': 1}: unknown segment(s) ['sleep'] in segment_weights; known:"),
    ({"prompt": float("nan")}, "must be finite"),
    ({"prompt": "lots"}, "prune[1].segment_weights.prompt = 'lots': Input should be a valid number"),
    ([1, 3], "prune[1].segment_weights = [1, 3]: Input should be a valid dictionary"),
])
def test_bad_weights_are_one_line(weights: Any, fragment: str) -> None:
    problems = _problems(_run({"method": "sparsegpt", "sparsity": 0.5, "segment_weights": weights}))
    assert len(problems) == 1 and fragment in problems[0], problems


def test_entry_calibrations_and_weights_against_the_kind() -> None:
    (why,) = _problems(_run({"method": "sparsegpt", "sparsity": 0.5, "segment_weights": {"decode": 1}}))
    assert why.startswith("prune[1].segment_weights = {'decode': 1.0} with calibrations.prompt "
                          "(prompt-sparsegpt-50pct-d1): a 'prompt' set holds only ['prompt'] tokens")
    (why,) = _problems(_run({"method": "sparsegpt", "sparsity": 0.6, "calibrations": ["rac", "nope"]}))
    assert why == "prune[1].calibrations: unknown calibration(s) ['nope']; the calibrations are ['prompt', 'rac']"
    (why,) = _problems(_run({"method": "sparsegpt", "sparsity": 0.6, "calibrations": "rac"}))
    assert why.startswith("prune[1].calibrations = 'rac': expected a non-empty list")
    (why,) = _problems(_run({"method": "sparsegpt", "sparsity": 0.6, "bogus": 1}))
    assert why.startswith("unknown key 'prune[1].bogus'; known keys in prune[1]: ") and "calibrations" in why
    every = parse_run_config(_run({"method": "sparsegpt", "sparsity": 0.6, "calibrations": ["rac", "prompt"]}))
    assert "calibrations" not in every.canonical()["prune"][1] and len(every.jobs) == 4  # all of them: no selector
    one = parse_run_config(_run({"method": "sparsegpt", "sparsity": 0.6, "calibrations": ["rac"]}))
    assert [j.label for j in one.jobs] == ["prompt-sparsegpt-50pct", "rac-sparsegpt-50pct", "rac-sparsegpt-60pct"]
    assert parse_run_config(one.canonical()) == one


# ------------------------------------------------------------------ decode_share calibrations
@pytest.fixture()
def sources(tmp_path: Path) -> tuple[Path, Path]:
    """prompts.parquet (N prompts of 6-14 tokens) and a cots folder (one CoT of 20-59 tokens per prompt)."""
    g, n = torch.Generator().manual_seed(0), 30
    plen = [int(x) for x in torch.randint(6, 15, (n,), generator=g)]
    clen = [int(x) for x in torch.randint(20, 60, (n,), generator=g)]
    prompts = [[100 + i] * k for i, k in enumerate(plen)]
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(n)], "input_ids": prompts}), str(tmp_path / "p.parquet"))
    (tmp_path / "cots").mkdir()
    cots = pa.table({"cot_id": [f"p{i}/0" for i in range(n)], "prompt_id": [f"p{i}" for i in range(n)],
                     "prompt_ids": prompts, "completion_ids": [[200 + i] * n for i, n in enumerate(clen)]})
    meta = {b"rac.cots": json.dumps({"template": None}).encode()}
    pq.write_table(cots.replace_schema_metadata(meta), str(tmp_path / "cots" / "part-00000.parquet"))
    return tmp_path / "p.parquet", tmp_path / "cots"


def _build(sources: tuple[Path, Path], out: Path, **kw: Any) -> Any:
    cfg = CalibConfig(kind="rac", max_seq_len=256, min_decode_share=0.0, **kw)
    return build_calibration(cfg, tiny_model("llama"), out, prompts_path=sources[0], cots_dir=sources[1])


@pytest.mark.parametrize("share,budget", [(0.25, 200), (0.5, 200), (0.333, 201), (0.6, 151)])
def test_decode_share_is_exact_at_the_budget(sources: tuple[Path, Path], tmp_path: Path, share: float,
                                             budget: int) -> None:
    s = _build(sources, tmp_path / "c.parquet", token_budget=budget, decode_share=share)
    rows = pq.read_table(tmp_path / "c.parquet").to_pylist()
    n_decode = sum(r["segment"].count(D) for r in rows)
    assert s.n_tokens == budget == sum(len(r["input_ids"]) for r in rows) and not s.exhausted
    assert n_decode == math.floor(share * budget + 0.5) and abs(s.decode_share - share) <= 0.5 / budget
    prompts = dict(zip(*pq.read_table(sources[0]).to_pydict().values(), strict=True))
    cots = [r for r in rows if r["source"].startswith("cot:")]
    alone = [r for r in rows if r["source"].startswith("prompt:")]
    with_cot = {r["source"][4:].split("/")[0] for r in cots}
    for r in cots:  # the whole prompt, then the CoT's first tokens (all of them but for the last CoT)
        p = prompts[r["source"][4:].split("/")[0]]
        assert r["input_ids"][: len(p)] == p and r["segment"] == [P] * len(p) + [D] * (len(r["input_ids"]) - len(p))
    assert not with_cot & {r["source"][7:] for r in alone}  # a prompt with a CoT in the set is not there twice
    assert all(r["input_ids"] == prompts[r["source"][7:]] for r in alone[:-1])  # whole, but for the last one
    assert read_share(tmp_path / "c.parquet") == s.decode_share


def read_share(path: Path) -> float:
    from rac.data.calib import read_calibration_meta

    meta = read_calibration_meta(path)
    assert meta["config"]["decode_share"] is not None
    return float(meta["decode_share"])


def test_decode_share_refuses_what_it_cannot_meet(sources: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(DecodeShareError, match=r"decode_share = 0.9 of token_budget = 5000 needs 4500 decode tokens "
                                               r"but the 30 CoTs hold \d+"):
        _build(sources, tmp_path / "a.parquet", token_budget=5000, decode_share=0.9)
    with pytest.raises(DecodeShareError, match=r"come with \d+ prompt tokens, more than the 10 it leaves .* lower "
                                               "decode_share"):
        _build(sources, tmp_path / "b.parquet", token_budget=200, decode_share=0.95)
    with pytest.raises(DecodeShareError, match=r"needs 1500 prompt tokens but the CoTs' prompts and the other \d+ "
                                               r"prompts hold \d+; use more prompts"):
        _build(sources, tmp_path / "c.parquet", token_budget=2000, decode_share=0.25)
    assert not any((tmp_path / n).exists() for n in ("a.parquet", "b.parquet", "c.parquet"))
    with pytest.raises(ValueError, match="needs prompts_path"):
        build_calibration(CalibConfig(kind="rac", decode_share=0.3, min_decode_share=0.0), tiny_model("llama"),
                          tmp_path / "d.parquet", cots_dir=sources[1])


def test_decode_share_config_hashes_only_when_set() -> None:
    plain = CalibConfig(kind="rac", token_budget=4000, max_seq_len=1024, min_decode_share=0.02)
    assert plain.stable_hash() == "a49cedbf060d" and "decode_share" not in plain.canonical()  # tiny.yaml's rac
    mixed = CalibConfig(kind="rac", token_budget=4000, max_seq_len=1024, min_decode_share=0.02, decode_share=0.25)
    assert mixed.canonical()["decode_share"] == 0.25 and mixed.stable_hash() != plain.stable_hash()
    assert mixed.one_shot() == mixed
    for kw, msg in [({"kind": "prompt", "decode_share": 0.3}, "needs kind 'rac', got kind 'prompt'"),
                    ({"decode_share": 0.25}, "below min_decode_share = 0.5: set min_decode_share to at most 0.25"),
                    ({"decode_share": 0.0}, "greater than 0"), ({"decode_share": 1.0}, "less than 1")]:
        with pytest.raises(ValueError, match=msg):
            CalibConfig(**kw)  # type: ignore[arg-type]


def test_preflight_checks_decode_share_against_prompts_and_cot_caps() -> None:
    from rac.runs.preflight import PreflightError, check_calibrations, check_model, check_prompts

    data = yaml.safe_load((CONFIGS / "tiny-decode-share.yaml").read_text())
    folder, _ = check_model(data["model"])
    for d25, msg in [({"token_budget": 20000}, r"calibrations.rac-d25: decode_share = 0.25 leaves 15000 prompt tokens "
                                               r"of token_budget = 20000 but the 12 prompts hold at most \d+"),
                     ({"token_budget": 9000, "decode_share": 0.9}, r"decode_share = 0.9 needs 8100 decode tokens of "
                                                                    r"token_budget = 9000 but even with every CoT at "
                                                                    r"its cap the CoT stage gives at most \d+")]:
        bad = {**data, "calibrations": {**data["calibrations"], "rac-d25": {**data["calibrations"]["rac-d25"], **d25}}}
        cfg = parse_run_config(bad)
        with pytest.raises(PreflightError, match=msg):
            check_calibrations(cfg, folder, check_prompts("prompts", cfg.prompts, gold=False))
    cfg = load_run_config(CONFIGS / "tiny-decode-share.yaml")
    check_calibrations(cfg, folder, check_prompts("prompts", cfg.prompts, gold=False))  # the shipped one passes
