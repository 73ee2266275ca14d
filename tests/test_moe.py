"""Mixture-of-experts models (issue 15) on tiny random Qwen3-MoE, Mixtral and DeepSeek-V3: per-expert Hessians
against brute force over the routed tokens, the streamed engine against an in-memory reference (routing
included), exact sparsity of every expert linear, low-token treatment, a kill mid-layer resumed bit-identically,
the pruned folder reloaded by transformers, coverage in the index (`expert_tokens`) and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
import torch
from engine_support import random_sequences, write_calib
from moe_reference import reference_prune_moe
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rac.engine import CompressConfig, StepRecord, compress
from rac.engine.experts import ExpertConfig, ExpertStats, expert_treatment
from rac.engine.layer import SegmentPlan
from rac.models.adapters import ADAPTERS, MoeSpec, select_groups
from rac.models.assets import tiny_model
from rac.models.moe import layer_candidates, materialize_layer
from rac.models.streaming import WeightFiles, build_skeleton, load_config
from rac.pruners import PruneConfig
from rac.pruners.magnitude import magnitude
from rac.pruners.masks import n_pruned
from rac.reporting.coverage import coverage_table, expert_coverage, plot_expert_coverage
from rac.store.index import Index
from rac.store.schema import SCHEMA, SCHEMA_VERSION

ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")
WEIGHTS = {"prompt": 0.5, "decode": 1.0, "other": 1.0}
BLOCK = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe", "deepseek_v3": "mlp"}  # checkpoint block names
TESTS = Path(__file__).resolve().parent


def _cfg(**kw: Any) -> CompressConfig:
    base: dict[str, Any] = dict(prune=PruneConfig(method="sparsegpt", sparsity=0.5), act_dtype="float32",
                                compute_dtype="float32", batch_tokens=48, segment_weights=WEIGHTS,
                                moe=ExpertConfig(min_expert_tokens=1))
    base.update(kw)
    return CompressConfig(**base)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    return out


def _seqs() -> list[tuple[list[int], list[int]]]:
    return random_sequences(7, 500, [12, 16, 20], seed=1)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[StepRecord], Path]]:
    """One streamed run per arch (group order): (output folder, step records, calibration file)."""
    root = tmp_path_factory.mktemp("moe")
    calib = write_calib(root / "calib.parquet", _seqs())
    out = {}
    for arch in ARCHS:
        records: list[StepRecord] = []
        compress(tiny_model(arch), calib, root / arch, _cfg(), root / f"work-{arch}", on_step=records.append)
        out[arch] = (root / arch, records, calib)
    return out


# ---------------------------------------------------------------------------------------------- adapters
def test_layer_candidates_expand_experts_and_follow_the_files() -> None:
    ds = ADAPTERS["deepseek_v3"]
    files = WeightFiles(tiny_model("deepseek_v3"))
    cand = layer_candidates(ds, 2, files.names())
    assert cand[0][0] == ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")  # q LoRA: no q_proj
    assert cand[0][4:] == [("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]  # layer 0 is dense
    experts = [f"mlp.experts.{e}.{n}" for e in range(8) for n in ("gate_proj", "up_proj")]
    assert cand[1][4] == ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", *experts)
    assert cand[1][5] == ("mlp.shared_experts.down_proj", *(f"mlp.experts.{e}.down_proj" for e in range(8)))
    for arch in ARCHS:  # every 2-D decoder weight but the router is a candidate, every candidate a tensor
        adapter, names = ADAPTERS[arch], WeightFiles(tiny_model(arch)).names()
        listed = {adapter.layer_prefix(i) + n + ".weight" for i, groups in enumerate(layer_candidates(adapter, 2, names))
                  for g in groups for n in g}
        shapes = WeightFiles(tiny_model(arch)).specs
        matrices = {n for n in names if n.startswith("model.layers.") and len(shapes[n][1]) == 2}
        assert listed == matrices - {f"model.layers.{i}.{BLOCK[arch]}.gate.weight" for i in range(2)}, arch
    spec = ADAPTERS["mixtral"].moe
    assert spec is not None and spec.parse("block_sparse_moe.experts.7.w3") == (7, "up")
    assert spec.parse("block_sparse_moe.gate") is None and spec.module_path("block_sparse_moe.gate") == "mlp.gate"
    assert MoeSpec().expert_name(3, "down") == "mlp.experts.3.down_proj"
    with pytest.raises(ValueError, match="needs the per-layer candidates"):
        select_groups(ds, 2)
    table = select_groups(ds, 2, ["*.experts.*"], (), cand)
    assert [sum(map(len, t)) for t in table] == [0, 24]  # only routed experts: 8 x (gate, up, down) in layer 1


@pytest.mark.parametrize("arch", ARCHS)
def test_materialize_fuses_like_transformers(arch: str) -> None:
    """The streamed layer equals the layer transformers' own checkpoint conversion loads."""
    model_dir = tiny_model(arch)
    config, adapter = load_config(model_dir)
    skeleton = build_skeleton(config)
    assert adapter.moe is not None
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    for i in range(2):
        layer = skeleton.model.layers[i]
        materialize_layer(layer, adapter.layer_prefix(i), WeightFiles(model_dir), adapter.moe, torch.float32, "cpu")
        for k, v in layer.state_dict().items():
            assert torch.equal(v, full[f"model.layers.{i}.{k}"]), k


# ---------------------------------------------------------------------------------------------- statistics
def _route(arch: str, config: Any, files: dict[str, torch.Tensor], prefix: str,
           x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force routing of x # [T, H] -> (top-k experts, their weights) # [T, k], from the config's rule."""
    logits = x @ files[prefix + BLOCK[arch] + ".gate.weight"].T  # [T, E]
    k = config.num_experts_per_tok
    if arch == "deepseek_v3":  # sigmoid scores, group-limited top-k with the correction bias
        scores = logits.sigmoid()
        choice = scores + files[prefix + "mlp.gate.e_score_correction_bias"]
        n_exp, n_group = choice.shape[1], config.n_group
        group_score = choice.view(-1, n_group, n_exp // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(config.topk_group, dim=-1).indices, True)
        index = choice.masked_fill(~keep.repeat_interleave(n_exp // n_group, dim=1), float("-inf")).topk(k).indices
        w = scores.gather(1, index)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) if config.norm_topk_prob else w
        return index, w * config.routed_scaling_factor
    w, index = logits.softmax(dim=-1).topk(k, dim=-1)
    normalise = arch == "mixtral" or config.norm_topk_prob
    return index, (w / w.sum(-1, keepdim=True) if normalise else w)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weighting", ["unweighted", "routing"])
def test_expert_hessian_is_brute_force_over_routed_tokens(arch: str, weighting: str) -> None:
    model_dir = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    files = _tensors(model_dir)
    layer, prefix, spec = model.model.layers[1], "model.layers.1.", ADAPTERS[arch].moe
    assert spec is not None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, model.config.hidden_size, generator=gen)  # [B, L, H] block input
    seg = torch.randint(0, 3, (2, 9), generator=gen)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 6:] = False
    plan = SegmentPlan.build({"prompt": 0.5, "decode": 1.0, "other": 0.0}, ["prompt", "decode", "other"],
                             torch.device("cpu"))
    members = {0: {e: (spec.expert_name(e, "gate"), spec.expert_name(e, "up")) for e in range(8)},
               1: {e: (spec.expert_name(e, "down"),) for e in range(8)}}
    stats = ExpertStats(layer, spec, members, plan, weighting)
    handle = stats.attach(lambda: None)
    stats.start_batch(seg, pad)
    with torch.no_grad():
        layer.mlp(x)
    handle.remove()
    flat, seg_f, pad_f = x.reshape(-1, x.shape[-1]).double(), seg.reshape(-1), pad.reshape(-1)
    index, weights = _route(arch, model.config, files, prefix, flat.float())
    for e in range(8):
        routed = (index == e).any(dim=-1)
        for s, name in enumerate(("prompt", "decode", "other")):
            assert stats.segment_tokens(e)[name] == int((routed & pad_f & (seg_f == s)).sum())
        kept = routed & pad_f & (seg_f < 2)  # "other" has weight 0: not in any Hessian
        g, u, d = (files[prefix + spec.expert_name(e, r) + ".weight"].double() for r in ("gate", "up", "down"))
        scale = (weights * (index == e)).sum(-1).double() if weighting == "routing" else torch.ones(len(flat))
        inputs = {0: flat, 1: torch.nn.functional.silu(flat @ g.T) * (flat @ u.T)}  # [T, H], [T, I]
        accs = {0: stats.accs[(0, e)], 1: stats.accs[(1, e)]}
        for group, acc in accs.items():
            assert acc.tokens() == int(kept.sum())
            for slot, name in enumerate(acc.segments):
                rows = kept & (seg_f == {"prompt": 0, "decode": 1}[name])
                X = inputs[group][rows] * scale[rows, None]  # [T_e, d]
                torch.testing.assert_close(acc.hessians[slot].double(), X.T @ X, rtol=1e-5, atol=1e-5,
                                           msg=f"{arch} expert {e} group {group} {name}")
        assert d.shape[1] == inputs[1].shape[1]
    assert sum(stats.counts.sum(dim=0).tolist()) == model.config.num_experts_per_tok * int(pad_f.sum())
    held = sum(a.hessians.numel() * a.hessians.element_size() for a in stats.accs.values())
    assert held == 8 * (64**2 + 32**2) * 4 * 2  # E x (H^2 + I^2) x float32 x 2 kept segment slots (docs/SCALING.md)


# ---------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("arch,sequential", [("qwen3_moe", "group"), ("qwen3_moe", "layer"), ("mixtral", "group"),
                                             ("deepseek_v3", "group")])
def test_streamed_equals_in_memory_reference(tmp_path: Path, arch: str, sequential: str,
                                             pruned: dict[str, tuple[Path, list[StepRecord], Path]]) -> None:
    if sequential == "group":
        out, records, _ = pruned[arch]
    else:
        records = []
        calib = write_calib(tmp_path / "c.parquet", _seqs())
        out = tmp_path / "out"
        compress(tiny_model(arch), calib, out, _cfg(sequential=sequential), tmp_path / "w", on_step=records.append)
    got, dense = _tensors(out), _tensors(tiny_model(arch))
    ref = reference_prune_moe(tiny_model(arch), arch, _seqs(), _cfg().prune, sequential, WEIGHTS)
    assert set(ref) == {lin.name + ".weight" for r in records for lin in r.linears}
    assert sum(".experts." in n for n in ref) == 24 * (1 if arch == "deepseek_v3" else 2)
    for name, w in ref.items():
        assert torch.equal(got[name] == 0, w == 0), name  # same masks
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5, msg=name)
    for name in set(got) - set(ref):  # router, norms, embeddings, LM head: untouched
        assert torch.equal(got[name], dense[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_every_expert_linear_at_exact_sparsity(arch: str, pruned: dict[str, tuple[Path, list[StepRecord], Path]]) -> None:
    out, records, _ = pruned[arch]
    got = _tensors(out)
    experts = [n for n in got if ".experts." in n]
    assert len(experts) == 24 * (1 if arch == "deepseek_v3" else 2)
    for name in experts:
        W = got[name]  # [out, in]
        # SparseGPT's default mask is chosen per block over all rows: the count is exact per matrix
        assert int((W == 0).sum()) == n_pruned(0.5, W.numel()), name
    prov = json.loads((out / "rac_provenance.json").read_text())
    assert prov["achieved_sparsity"] == pytest.approx(0.5)
    assert {(r["layer"], r["expert"]) for r in prov["experts"]["experts"]} == \
        {(x, e) for x in ((1,) if arch == "deepseek_v3" else (0, 1)) for e in range(8)}
    assert prov["experts"]["low_token_experts"] == []  # min_expert_tokens=1 and every expert was reached


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_folder_reloads_and_generates(arch: str, pruned: dict[str, tuple[Path, list[StepRecord], Path]]) -> None:
    out, _, _ = pruned[arch]
    got = _tensors(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    spec = ADAPTERS[arch].moe
    assert spec is not None
    for i in range(2):
        experts = getattr(model.model.layers[i].mlp, "experts", None)
        for e in range(8 if experts is not None else 0):  # transformers fused exactly the pruned matrices
            names = [f"model.layers.{i}.{spec.expert_name(e, r)}.weight" for r in ("gate", "up", "down")]
            assert torch.equal(experts.gate_up_proj[e], torch.cat([got[names[0]], got[names[1]]]))
            assert torch.equal(experts.down_proj[e], got[names[2]])
    ids = torch.tensor([[5, 17, 42, 7]])
    seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert seq.shape == (1, 10) and torch.equal(seq[:, :4], ids)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model(arch), dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert torch.isfinite(a).all() and not torch.allclose(a, b)  # the experts it runs are the pruned ones


def test_coverage_counts_every_routed_token(pruned: dict[str, tuple[Path, list[StepRecord], Path]]) -> None:
    """Per layer and segment the experts' counts sum to top-k x the calibration's tokens of that segment."""
    _, records, _ = pruned["qwen3_moe"]
    seqs = _seqs()
    per_segment = {name: sum(s.count(i) for _, s in seqs) for i, name in enumerate(("prompt", "decode", "other"))}
    for rec in records:
        if rec.experts:
            totals = {name: sum(x.segment_tokens[name] for x in rec.experts) for name in per_segment}
            assert totals == {k: 2 * v for k, v in per_segment.items()}, (rec.layer, rec.group)
            assert all(x.tokens == x.segment_tokens["prompt"] + x.segment_tokens["decode"] for x in rec.experts)


def test_experts_per_pass_is_exact(tmp_path: Path, pruned: dict[str, tuple[Path, list[StepRecord], Path]]) -> None:
    out, _, calib = pruned["qwen3_moe"]
    compress(tiny_model("qwen3_moe"), calib, tmp_path / "out", _cfg(moe=ExpertConfig(min_expert_tokens=1,
             experts_per_pass=3)), tmp_path / "w")
    whole, chunked = _tensors(out), _tensors(tmp_path / "out")
    assert whole.keys() == chunked.keys()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_low_token_experts_get_the_recorded_treatment(tmp_path: Path,
                                                      pruned: dict[str, tuple[Path, list[StepRecord], Path]]) -> None:
    _, _, calib = pruned["mixtral"]
    model_dir = tiny_model("mixtral")
    dense = _tensors(model_dir)
    cfg = _cfg(moe=ExpertConfig(min_expert_tokens=10**6))  # no expert has that many: all get magnitude
    compress(model_dir, calib, tmp_path / "mag", cfg, tmp_path / "w1")
    got = _tensors(tmp_path / "mag")
    for name in (n for n in got if ".experts." in n):
        assert torch.equal(got[name], magnitude(dense[name], cfg.prune).weight), name
    low = json.loads((tmp_path / "mag" / "rac_provenance.json").read_text())["experts"]["low_token_experts"]
    assert {(r["layer"], r["group"], r["expert"], r["treatment"]) for r in low} == \
        {(x, g, e, "magnitude") for x in range(2) for g in (2, 3) for e in range(8)}
    records: list[StepRecord] = []
    damped = _cfg(moe=ExpertConfig(min_expert_tokens=10**6, low_tokens="damp", low_token_damp=0.5))
    compress(model_dir, calib, tmp_path / "damp", damped, tmp_path / "w2", on_step=records.append)
    lins = {lin.name: lin for r in records for lin in r.linears}
    assert {lin.damp for n, lin in lins.items() if ".experts." in n} == {0.5}
    assert {lin.damp for n, lin in lins.items() if ".experts." not in n} == {0.01}
    assert {x.treatment for r in records for x in r.experts} == {"damp=0.5"}
    assert expert_treatment(0, damped.moe, damped.prune)[1] == "magnitude"  # H = 0 cannot be damped


def test_expert_config_errors() -> None:
    with pytest.raises(ValueError, match="low_tokens='damp' needs a damped solver"):
        _cfg(prune=PruneConfig(method="wanda", sparsity=0.5), moe=ExpertConfig(low_tokens="damp"))
    with pytest.raises(ValueError, match="experts_per_pass=4 needs sequential='group'"):
        _cfg(sequential="layer", moe=ExpertConfig(experts_per_pass=4))
    with pytest.raises(ValueError, match="min_expert_tokens must be >= 0, got -1"):
        ExpertConfig(min_expert_tokens=-1)
    plain = CompressConfig(prune=PruneConfig(method="sparsegpt", sparsity=0.5))
    assert "moe" not in plain.canonical()  # dense stage keys are what they were
    assert _cfg().canonical()["moe"]["min_expert_tokens"] == 1


# ---------------------------------------------------------------------------------------------- kill + resume
def prune_in(work: str, calib: str, cfg_json: str) -> list[str]:
    """The pipeline's prune stage (index-verified resume) on tiny Qwen3-MoE; returns its log lines."""
    from rac.models.streaming import model_revision
    from rac.runs.memo import StageOutput
    from rac.runs.run_config import PruneJob
    from rac.runs.stages import prune_step
    from rac.runs.workdir import RunRef
    from rac.store.artifacts import ArtifactRef
    from rac.store.index import Index

    model = tiny_model("qwen3_moe")
    env = RunRef(work, "r1", str(model), model_revision(model))
    if Index(work).get_run("r1") is None:
        Index(work).create_run("r1", "test", {}, {}, "", 1)
    stage = StageOutput("calib/t", "calib", "ck", (ArtifactRef.of(Path(calib), "calibration"),))
    log: list[str] = []
    prune_step(env, PruneJob("t-sparsegpt-50pct", "t", CompressConfig.model_validate_json(cfg_json)), stage,
               log=log.append)
    return log


@pytest.mark.parametrize("crash,resumed", [
    ("prune.row:1:2", "resuming at layer 1, group 3"),  # layer 1's expert gate/up step recorded, its down not
    pytest.param("prune.step:0:3", "resuming at layer 0, group 3", marks=pytest.mark.slow),  # persisted, unrecorded
])
def test_kill_mid_layer_resumes_bit_identical(tmp_path: Path, crash: str, resumed: str,
                                              pruned: dict[str, tuple[Path, list[StepRecord], Path]]) -> None:
    out, records, calib = pruned["qwen3_moe"]
    cfg_json = _cfg().model_dump_json()
    work = tmp_path / "work"
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_moe import prune_in; " \
           f"prune_in({str(work)!r}, {str(calib)!r}, {cfg_json!r})"
    env = {**os.environ, "RAC_CRASH_AT": crash, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stdout + child.stderr  # SIGKILLed at the crash point
    log = prune_in(str(work), str(calib), cfg_json)
    assert any(resumed in line for line in log), log
    folder = next((work / "stages" / "prune").glob("*/model"))
    a, b = _tensors(folder), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with duckdb.connect(str(work / "rac.duckdb"), read_only=True) as con:
        rows = set(con.execute("select layer, expert, segment, tokens from expert_tokens").fetchall())
    want = {(r.layer, x.expert, s, n) for r in records for x in r.experts for s, n in x.segment_tokens.items()}
    assert rows == want


# ---------------------------------------------------------------------------------------------- index + report
def test_expert_tokens_table_migration_and_forget(tmp_path: Path) -> None:
    with duckdb.connect(str(tmp_path / "rac.duckdb")) as con:  # a file of the schema before expert_tokens
        con.execute(SCHEMA)
        con.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    index = Index(tmp_path)
    assert index.query("select value, (select count(*) from expert_tokens) from meta where name = 'schema_version'"
                       )[1] == [(str(SCHEMA_VERSION), 0)]
    for layer in range(3):
        index.record_step("r", "k", layer, 2, [], [], [(e, seg, 10 * layer + e) for e in range(2)
                                                    for seg in ("prompt", "decode")])
    assert index.expert_tokens("k")[-1] == {"layer": 2, "expert": 1, "segment": "prompt", "tokens": 21}
    index.forget_steps("k", (1, 3))  # resume mid-layer 1: its expert rows stay (a later step rewrites the same)
    assert sorted({r["layer"] for r in index.expert_tokens("k")}) == [0, 1]
    index.forget_steps("k", (1, 0))
    assert sorted({r["layer"] for r in index.expert_tokens("k")}) == [0]
    index.forget_steps("k")
    assert index.expert_tokens("k") == []


def test_coverage_table_and_heatmap(tmp_path: Path) -> None:
    index = Index(tmp_path)
    counts = {"prompt": [[5, 0, 7], [3, 3, 0]], "decode": [[1, 4, 0], [0, 2, 9]], "other": [[0] * 3] * 2}
    for layer in range(2):
        index.record_step("r", "k1", layer, 2, [], [], [(e, seg, counts[seg][layer][e]) for seg in counts
                                                         for e in range(3)])
    stages = [{"stage": "prune", "stage_key": "k1", "name": "prune/rac-sparsegpt-50pct"},
              {"stage": "eval", "stage_key": "k2", "name": "eval/dense"}]
    coverage = expert_coverage(index, stages)
    assert list(coverage) == ["rac-sparsegpt-50pct"]
    assert coverage["rac-sparsegpt-50pct"]["decode"].tolist() == [[1, 4, 0], [0, 2, 9]]
    row = coverage_table(coverage).splitlines()[2]
    # totals [[6, 4, 7], [3, 5, 9]]: fewest 3; no prompt token: (0, 1), (1, 2); no decode token: (0, 2), (1, 0);
    # decode shares 1/6, 1, 0, 0, 2/5, 1 -> min 0, median (1/6 + 2/5) / 2 = 0.28, max 1
    assert row == "| rac-sparsegpt-50pct | 2 | 6 | 3 | 2 | 2 | 0.00 / 0.28 / 1.00 |"
    png = plot_expert_coverage(coverage, tmp_path / "expert_tokens.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rac_run_answers_expert_tokens_sql(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rac run` on the tiny MoE config, then `rac sql` on expert_tokens: per stage, layer and segment the
    experts' tokens sum to top-2 x the calibration's tokens of that segment (its provenance)."""
    import yaml
    from prefect.testing.utilities import prefect_test_harness

    from rac_prefect.flows.cli import EXIT_OK, main

    data = yaml.safe_load((TESTS.parent / "data" / "configs" / "tiny-moe.yaml").read_text())
    for key in ("eval", "eval_dense"):
        data.pop(key)
    cfg = tmp_path / "tiny-moe.yaml"
    cfg.write_text(yaml.safe_dump(data))
    work = tmp_path / "work"
    with prefect_test_harness(server_startup_timeout=120):
        assert main(["--work-dir", str(work), "run", str(cfg), "--run-id", "moe"]) == EXIT_OK
    capsys.readouterr()
    assert main(["--work-dir", str(work), "sql", "select layer, expert, segment, tokens from expert_tokens"]) == EXIT_OK
    out = capsys.readouterr().out
    head = [c.strip() for line in out.splitlines() if "┃" in line for c in line.strip().strip("┃").split("┃")]
    body = [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines() if "│" in line]
    assert head == ["layer", "expert", "segment", "tokens"]
    assert len(body) == 2 * 2 * 8 * 3  # calibrations (prompt, rac) x layers x experts x segments
    with duckdb.connect(str(work / "rac.duckdb"), read_only=True) as con:
        sums = con.execute("select stage_key, layer, segment, sum(tokens) from expert_tokens group by all").fetchall()
    assert len(sums) == 2 * 2 * 3
    for key, layer, segment, total in sums:
        prov = json.loads((work / "stages" / "prune" / key / "model" / "rac_provenance.json").read_text())
        assert total == 2 * prov["calibration"]["segment_tokens"].get(segment, 0), (key, layer, segment)
    report = (work / "runs" / "moe" / "report" / "report.md").read_text()
    assert "## Expert coverage (mixture of experts)" in report
    assert (work / "runs" / "moe" / "report" / "expert_tokens.png").is_file()
