"""Flow wiring under `prefect_test_harness`, task bodies called directly, and whole runs through the CLI
(reuse, a mid-generation kill resumed to the identical model, two runs on one run id, a corrupted shard).

One Prefect test server serves the module; subprocess runs reach it through PREFECT_API_URL.
The tiny pipeline runs once into the module's reference work dir. Tests that only read it take `ref`
(which fails a test that changed anything in it); tests that add runs or damage files work on their own
copy (`work_copy`, made by tests/workdirs.copy_work_dir), so no test sees another's runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="rac-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from workdirs import copy_work_dir, index_rows, index_strings, path_rewriter, snapshot  # noqa: E402

from rac.models.assets import tiny_model  # noqa: E402
from rac.models.streaming import model_revision  # noqa: E402
from rac.runs.memo import StageOutput  # noqa: E402
from rac.runs.run_config import load_run_config  # noqa: E402
from rac.runs.workdir import RunLockedError, RunRef  # noqa: E402
from rac.store.index import Index  # noqa: E402
from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_OK, main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def reference(api_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run of tiny.yaml through the flow; tests use it through `ref` or `work_copy`."""
    from rac_prefect.flows.prune import rac_prune

    work = tmp_path_factory.mktemp("ref")
    state = rac_prune(config_path=str(TINY), run_id="ref", work_dir=str(work), return_state=True)
    return {"work": work, "result": state.result(), "flow_run_id": state.state_details.flow_run_id,
            "snapshot": snapshot(work)}


@pytest.fixture
def ref(reference: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The reference, read-only: the test fails when its work dir (files or index rows) changed."""
    yield reference
    assert snapshot(reference["work"]) == reference["snapshot"], "the test changed the shared reference work dir"


@pytest.fixture
def work_copy(ref: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the reference work dir, for tests that add runs or damage files."""
    return copy_work_dir(ref["work"], tmp_path / "work")


def models_of(work: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """Pruned model tensors of a run, by stage name."""
    out: dict[str, dict[str, Any]] = {}
    for row in Index(work).run_stages(run_id):
        if row["stage"] == "prune" and row["status"] == "done":
            folder = work / "stages" / "prune" / row["stage_key"] / "model"
            out[row["name"]] = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return out


def same_models(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m]) for m in a)


def test_flow_runs_every_stage_and_records_them(ref: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    work, result = ref["work"], ref["result"]
    idx = Index(work)
    assert idx.get_run("ref")["status"] == "done"  # type: ignore[index]
    names = {s["name"]: s for s in idx.run_stages("ref")}
    jobs = ("prompt-sparsegpt-50pct", "rac-sparsegpt-50pct")
    assert set(names) == {"prompts", "cots", "calib/prompt", "calib/rac", "prompts/eval", "eval/dense",
                          *(f"{stage}/{job}" for stage in ("prune", "eval", "tokerror", "proxies") for job in jobs)}
    assert all(s["status"] == "done" and not s["reused"] for s in names.values())
    evals = {e["label"]: e for e in idx.evals("ref")}
    assert set(evals) == {"dense", *jobs} and all(e["n_problems"] == 2 for e in evals.values())
    assert evals["rac-sparsegpt-50pct"]["calibration"] == "rac" and evals["dense"]["sparsity"] == 0.0
    _, eval_rows = idx.query("select count(*) from eval_rows")
    assert eval_rows == [(6,)]  # 3 models x 2 eval prompts
    models = models_of(work, "ref")
    for name in ("prune/prompt-sparsegpt-50pct", "prune/rac-sparsegpt-50pct"):
        rows = idx.layer_rows(names[name]["stage_key"])
        assert len(rows) == 2 * 7  # 2 layers x 7 linears
        for r in rows:  # the recorded sparsity is the share of zeros in the saved weight
            weight = models[name][f"{r['linear']}.weight"]
            assert r["sparsity"] == pytest.approx((weight == 0).float().mean().item(), abs=1e-6), r["linear"]
            assert r["sparsity"] == pytest.approx(0.5, abs=0.01)
    cots = sorted((work / "stages" / "cots" / names["cots"]["stage_key"]).glob("part-*.parquet"))
    lens = [n for f in cots for n in pq.read_table(f).column("completion_len").to_pylist()]
    summary = idx.done_stages(names["cots"]["stage_key"])[0]["summary"]
    _, agg = idx.query("select count(*), sum(completion_len) from cots")
    assert agg == [(len(lens), sum(lens))] and len(lens) == summary["n_rows"] == 6  # 3 prompts x 2 samples
    assert sum(lens) == summary["completion_tokens"]
    assert Path(result["report"]) == work / "runs" / "ref" / "report" / "report.md"
    assert Path(result["report"]).read_text().startswith("# rac run `ref`")
    assert not same_models({"a": models["prune/prompt-sparsegpt-50pct"]}, {"a": models["prune/rac-sparsegpt-50pct"]})


def test_copy_work_dir_relocates_the_index(ref: dict[str, Any], tmp_path: Path) -> None:
    import json

    from rac.store.artifacts import ArtifactRef

    src = Path(ref["work"]).resolve()
    assert any(str(src) in v for _, _, v in index_strings(src))  # there is something to rewrite
    dst = copy_work_dir(src, tmp_path / "copy")
    assert dst == (tmp_path / "copy").resolve()
    assert not [(t, c, v) for t, c, v in index_strings(dst) if str(src) in v]
    assert not list((dst / "runs").glob("*/prefect"))
    run_json = (dst / "runs" / "ref" / "run.json").read_text()
    assert str(src) not in run_json  # (tiny.yaml's run.json names no path inside the work dir)
    assert json.loads(run_json) == json.loads(path_rewriter(src, dst)((src / "runs" / "ref" / "run.json").read_text()))
    mine = Index(dst)
    n_outputs = 0
    for s in mine.run_stages("ref"):
        (row,) = mine.done_stages(s["stage_key"])
        for out in row["outputs"]:
            assert out.check() is None and dst in out.path.parents, out
            n_outputs += 1
    assert n_outputs == 19  # every output of every stage of the run verifies, in the copy
    # every artifact row keeps its verification status (checkpoints of finished prunes are gone in both)
    old = {r["uri"]: r for r in index_rows(src)["artifacts"]}
    new = index_rows(dst)["artifacts"]
    assert len(new) == len(old) > n_outputs
    for r in new:
        a = ArtifactRef(r["uri"], r["sha256"], r["bytes"], r["kind"])
        o = old[path_rewriter(dst, src)(r["uri"])]
        assert dst in a.path.parents and (a.sha256, a.bytes, a.kind) == (o["sha256"], o["bytes"], o["kind"])
        assert (a.check() is None) == (ArtifactRef(o["uri"], o["sha256"], o["bytes"], o["kind"]).check() is None)
        assert a.check() is None or r["kind"].startswith("ckpt-"), a.check()
    # the copy equals the reference up to the paths
    rel = {t: sorted(repr(sorted(r.items())) for r in rows) for t, rows in index_rows(dst).items()}
    back = path_rewriter(dst, src)
    assert {t: sorted(back(r) for r in rows) for t, rows in rel.items()} == ref["snapshot"]["index"]
    files = {k: v for k, v in ref["snapshot"]["files"].items() if not k.startswith("runs/ref/prefect/")}
    assert {k: v for k, v in snapshot(dst)["files"].items() if k != "runs/ref/run.json"} == \
        {k: v for k, v in files.items() if k != "runs/ref/run.json"}  # every other file copied byte for byte


def test_path_rewriter_matches_whole_path_components(tmp_path: Path) -> None:
    src, dst = tmp_path / "w", tmp_path / "w-copy"
    rewrite = path_rewriter(src, dst)
    assert rewrite(f"{src}/stages/a {src.as_uri()}/x \"{src}\"") == f"{dst}/stages/a {dst.as_uri()}/x \"{dst}\""
    assert rewrite(f"{src}2/a {src}.bak {src}-x") == f"{src}2/a {src}.bak {src}-x"  # siblings stay
    assert rewrite(str(dst)) == str(dst)
    odd_src, odd_dst = tmp_path / "with space", tmp_path / "other"  # URIs escape the space
    assert path_rewriter(odd_src, odd_dst)(f"{odd_src.as_uri()}/m") == f"{odd_dst.as_uri()}/m"


def test_proxies_rows_score_each_pruned_model_on_the_dense_eval_cots(ref: dict[str, Any]) -> None:
    from rac.eval.evaluate import eval_cots_dir
    from rac.eval.proxies import ProxyConfig, cot_proxies

    work = ref["work"]
    idx = Index(work)
    names = {s["name"]: s for s in idx.run_stages("ref")}
    dense_rows = work / "stages" / "eval" / names["eval/dense"]["stage_key"] / "rows.parquet"
    _, lens = idx.query(f"select sum(completion_len) from read_parquet('{dense_rows}')")
    proxies = {r["label"]: r for r in idx.proxies("ref")}
    assert set(proxies) == {"prompt-sparsegpt-50pct", "rac-sparsegpt-50pct"}
    for label, row in proxies.items():
        model = work / "stages" / "prune" / names[f"prune/{label}"]["stage_key"] / "model"
        direct = cot_proxies(Path(idx.get_run("ref")["fingerprint"]["model_dir"]), model,  # type: ignore[index]
                             eval_cots_dir(dense_rows), ProxyConfig(n_sequences=2, batch_size=2))
        assert row["n_positions"] == direct.n_positions == lens[0][0]  # every dense eval CoT token scored
        assert row["pruned_nll"] == pytest.approx(direct.pruned_nll, rel=1e-6)
        assert row["top1_agreement"] == pytest.approx(direct.top1_agreement)
        assert row["dense_nll"] == pytest.approx(direct.dense_nll) and row["calibration"] == label.split("-")[0]
        heat = idx.done_stages(names[f"tokerror/{label}"]["stage_key"])[0]["summary"]
        assert (row["recon_prompt"], row["recon_decode"]) == (heat["prompt_mean"], heat["decode_mean"])


def test_compare_joins_evals_proxies_and_problems(ref: dict[str, Any], tmp_path: Path) -> None:
    import json

    import numpy as np

    from rac.eval.proxies import ratio_interval
    from rac.reporting.compare import collect_cells, paired_rows
    from rac_prefect.flows.cli import main

    work = ref["work"]
    idx = Index(work)
    cells = {c.label: c for c in collect_cells(work)}
    assert set(cells) == {"dense", "prompt-sparsegpt-50pct", "rac-sparsegpt-50pct"}
    _, rows = idx.query("select stage_key, prompt_id, correct from eval_rows")
    evals = {e["label"]: e for e in idx.evals("ref")}
    for c in cells.values():
        assert c.eval_key == evals[c.label]["stage_key"]
        mine = {p: float(ok) for k, p, ok in rows if k == c.eval_key}
        assert c.per_problem == mine and len(mine) == 2
        assert c.get("accuracy") == pytest.approx(sum(mine.values()) / 2) == evals[c.label]["accuracy"]
    assert cells["dense"].setting == "dense" and cells["rac-sparsegpt-50pct"].setting == "50%"
    proxies = {r["label"]: r for r in idx.proxies("ref")}
    assert cells["dense"].proxies is None
    for label in ("rac-sparsegpt-50pct", "prompt-sparsegpt-50pct"):
        for name in ("top1_agreement", "pruned_nll", "nll_gap"):
            assert cells[label].get(name) == proxies[label][name], (label, name)
    pair = paired_rows(list(cells.values()), "rac", "prompt")[0]
    rac_q, prompt_q = (cells[f"{c}-sparsegpt-50pct"].get("pruned_nll") for c in ("rac", "prompt"))
    assert pair["nll_gap_diff"] == pytest.approx(rac_q - prompt_q)  # type: ignore[operator]
    per = {c: json.loads(proxies[f"{c}-sparsegpt-50pct"]["metrics"])["per_sequence"] for c in ("rac", "prompt")}
    n = np.asarray(per["rac"]["n"])
    d = np.asarray(per["rac"]["pruned_nll"]) - np.asarray(per["prompt"]["pruned_nll"])
    assert (pair["nll_gap_low"], pair["nll_gap_high"]) == ratio_interval(d[n > 0], n[n > 0], 10_000)
    assert pair["nll_gap_low"] <= pair["nll_gap_diff"] <= pair["nll_gap_high"]
    runaway = {c: cells[f"{c}-sparsegpt-50pct"].get("runaway_share") for c in ("rac", "prompt")}
    assert pair["runaway_diff"] == pytest.approx(runaway["rac"] - runaway["prompt"])  # type: ignore[operator]
    assert main(["--work-dir", str(work), "compare", "--out", str(tmp_path / "cmp"), "--base", "prompt"]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| sparsegpt | 50% | rac - prompt | 2 |" in md
    assert (tmp_path / "cmp" / "vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flow_publishes_prefect_artifacts(ref: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    keys = ["ref-report", "ref-generation", "ref-prune-rac-sparsegpt-50pct", "ref-eval-dense"]
    with get_client(sync_client=True) as client:  # only the reference flow run's (copies rerun run 'ref')
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=keys), flow_run_id=ArtifactFilterFlowRunId(any_=[ref["flow_run_id"]])))
    by_key = {a.key: a for a in arts}
    assert sorted(a.key for a in arts) == sorted(keys)  # one of each
    assert by_key["ref-report"].type == "markdown"
    from rac.reporting.report import report_markdown_for_artifact

    report = Path(ref["result"]["report"])  # the artifact is the file with its images inlined
    assert by_key["ref-report"].data == report_markdown_for_artifact(report) != report.read_text()
    assert "](data:image/png;base64," in str(by_key["ref-report"].data)
    for key in ("ref-prune-rac-sparsegpt-50pct", "ref-generation"):
        assert by_key[key].type == "progress" and float(by_key[key].data) == 100.0  # type: ignore[arg-type]
    dense = {e["label"]: e for e in Index(ref["work"]).evals("ref")}["dense"]
    assert by_key["ref-eval-dense"].type == "markdown"
    assert str(by_key["ref-eval-dense"].data).startswith(
        f"**dense**: accuracy {dense['accuracy']} (95% CI {dense['ci_low']}..{dense['ci_high']}), "
        f"mean CoT tokens {dense['mean_tokens']}, runaway share {dense['runaway_share']}")


def test_rerun_does_no_work_and_new_prune_config_reuses_cots(ref: dict[str, Any], work_copy: Path,
                                                             tmp_path: Path) -> None:
    from rac_prefect.flows.prune import rac_prune

    work = work_copy
    before = Index(work).run_stages("ref")
    rac_prune(config_path=str(TINY), run_id="ref", work_dir=str(work))  # same run again: nothing recomputed
    assert Index(work).run_stages("ref") == before  # no stage row rewritten (a recomputed one would be)
    assert Index(work).get_run("ref")["status"] == "done"  # type: ignore[index]
    again = rac_prune(config_path=str(TINY), run_id="second", work_dir=str(work))  # new run: index reuse
    assert set(again["stages"]) == {s["name"] for s in before}
    assert all(s["reused"] for s in again["stages"].values())
    assert {k: v["stage_key"] for k, v in again["stages"].items()} == {s["name"]: s["stage_key"] for s in before}
    assert same_models(models_of(work, "second"), models_of(ref["work"], "ref"))
    data = yaml.safe_load(TINY.read_text())
    data["prune"] = [{"method": "wanda", "sparsity": 0.5}]
    data["eval_pruned"] = ["rac-wanda-50pct"]  # the other model still gets its heatmap and proxies
    cfg_path = tmp_path / "wanda.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    third = rac_prune(config_path=str(cfg_path), run_id="wanda", work_dir=str(work))
    computed = sorted(k for k, v in third["stages"].items() if not v["reused"])
    assert computed == ["eval/rac-wanda-50pct", *(f"{stage}/{calib}-wanda-50pct" for stage in ("proxies", "prune", "tokerror")
                        for calib in ("prompt", "rac"))]  # prompts, CoTs, calibrations, dense eval reused
    from rac.reporting.compare import collect_cells, paired_rows

    cells = {c.label: c for c in collect_cells(work)}
    assert set(cells) == {"dense", *(f"{c}-{m}-50pct" for c in ("prompt", "rac") for m in ("sparsegpt", "wanda"))}
    proxies = {r["label"]: r for r in Index(work).proxies("wanda")}
    assert cells["prompt-wanda-50pct"].eval == {}
    assert cells["prompt-wanda-50pct"].get("pruned_nll") == proxies["prompt-wanda-50pct"]["pruned_nll"]
    wanda = [r for r in paired_rows(list(cells.values()), "rac", "prompt") if r["method"] == "wanda"]
    assert len(wanda) == 1 and "accuracy_diff" not in wanda[0]  # only one of the two was evaluated
    assert wanda[0]["nll_gap_diff"] == pytest.approx(
        proxies["rac-wanda-50pct"]["pruned_nll"] - proxies["prompt-wanda-50pct"]["pruned_nll"])


def test_task_bodies_run_without_prefect(ref: dict[str, Any], tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from rac.data.calib import read_calibration_meta
    from rac_prefect.tasks import build_calibration_task, sample_prompts_task

    cfg = load_run_config(TINY)
    model = tiny_model("llama")
    env = RunRef(str(tmp_path), "direct", str(model), model_revision(model))
    Index(tmp_path).create_run("direct", "t", {}, {}, "", 1)
    prompts = sample_prompts_task.fn(env, cfg.prompts)
    ref_prompts = Index(ref["work"]).done_stages(prompts.stage_key)
    assert ref_prompts and prompts.output("prompts").sha256 == ref_prompts[0]["outputs"][0].sha256
    assert not prompts.reused and tmp_path.resolve() in prompts.output("prompts").path.parents
    calib = build_calibration_task.fn(env, "prompt", cfg.calibrations["prompt"], prompts, None)
    ref_calib = Index(ref["work"]).done_stages(calib.stage_key)  # same key: same config, same prompts
    assert ref_calib and not calib.reused
    mine, theirs = calib.output("calibration").path, ref_calib[0]["outputs"][0].path
    assert pq.read_table(mine).equals(pq.read_table(theirs))  # the same sequences and segments
    # (not the same sha256: the metadata names the prompts file, inside each work dir)
    assert {**read_calibration_meta(mine), "source": None} == {**read_calibration_meta(theirs), "source": None}
    assert calib.summary["kind"] == "prompt" and calib.summary["prompt_share"] == 1.0


def test_eval_flow_on_a_pruned_folder(ref: dict[str, Any], work_copy: Path) -> None:
    import pyarrow.parquet as pq

    from rac_prefect.flows.eval import rac_eval

    work = work_copy
    key = {s["name"]: s for s in Index(work).run_stages("ref")}["prune/rac-sparsegpt-50pct"]["stage_key"]
    folder = work / "stages" / "prune" / key / "model"
    out = rac_eval(model=str(folder), eval_config=str(TINY), work_dir=str(work), label="rac-pruned", run_id="ev1")
    ref_row = {e["label"]: e for e in Index(ref["work"]).evals("ref")}["rac-sparsegpt-50pct"]
    row = Index(work).evals("ev1")[0]
    assert row["label"] == "rac-pruned" and out["stage_key"] == row["stage_key"] != ref_row["stage_key"]
    stages = {s["name"]: s for s in Index(work).run_stages("ev1")}
    assert {k: s["reused"] for k, s in stages.items()} == {"prompts/eval": False, "eval/rac-pruned": False}
    ref_prompts = {s["name"]: s for s in Index(ref["work"]).run_stages("ref")}["prompts/eval"]["stage_key"]
    assert pq.read_table(work / "stages" / "prompts" / stages["prompts/eval"]["stage_key"] / "prompts.parquet").equals(
        pq.read_table(ref["work"] / "stages" / "prompts" / ref_prompts / "prompts.parquet"))  # the same eval prompts
    for col in ("n_problems", "accuracy", "ci_low", "ci_high", "mean_tokens", "p90_tokens", "runaway_share"):
        assert out[col] == row[col] == ref_row[col], col  # same model, same prompts, same seeds
    mine = pq.read_table(work / "stages" / "eval" / row["stage_key"] / "rows.parquet").to_pylist()
    theirs = pq.read_table(ref["work"] / "stages" / "eval" / ref_row["stage_key"] / "rows.parquet").to_pylist()
    assert mine == theirs and len(mine) == 2  # per problem: the same completion, answer and correctness
    again = rac_eval(model=str(folder), eval_config=str(TINY), work_dir=str(work), label="rac-pruned", run_id="ev2")
    assert again["stage_key"] == out["stage_key"]
    assert {s["name"]: s["reused"] for s in Index(work).run_stages("ev2")} == {"prompts/eval": True, "eval/rac-pruned": True}


def _cli(args: list[str], api_url: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PREFECT_API_URL": api_url, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "rac_prefect.flows.cli", *args], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def without_eval(tmp_path: Path) -> Path:
    """tiny.yaml without evaluation and heatmaps (the stages a crash test does not need)."""
    data = yaml.safe_load(TINY.read_text())
    data.pop("eval")
    data.pop("proxies")
    data["report"] = {"heatmap": False}
    path = tmp_path / "tiny-no-eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_killed_mid_generation_resumes_to_identical_models(ref: dict[str, Any], api_url: str,
                                                          tmp_path: Path) -> None:
    cfg = without_eval(tmp_path)
    proc = _cli(["--work-dir", str(tmp_path), "run", str(cfg), "--run-id", "crash"], api_url,
                {"RAC_CRASH_AT": "cots.shard:1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -9, out
    idx = Index(tmp_path)
    assert idx.get_run("crash")["status"] == "running"  # type: ignore[index]
    shards = sorted((tmp_path / "stages" / "cots").glob("*/part-*.parquet"))
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet"]  # shard 1 never indexed
    assert main(["--work-dir", str(tmp_path), "resume", "crash"]) == EXIT_OK
    cots = {s["name"]: s for s in idx.run_stages("crash")}["cots"]
    summary = idx.done_stages(cots["stage_key"])[0]["summary"]
    assert summary["shards_reused"] == 1 and summary["shards_written"] == 2  # shard 1 regenerated, 0 kept
    assert idx.get_run("crash")["status"] == "done"  # type: ignore[index]
    assert same_models(models_of(tmp_path, "crash"), models_of(ref["work"], "ref"))


@pytest.mark.slow
def test_second_run_on_same_id_refuses(api_url: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from rac_prefect.flows.prune import rac_prune

    cfg = without_eval(tmp_path)
    proc = _cli(["--work-dir", str(tmp_path), "run", str(cfg), "--run-id", "busy"], api_url,
                {"RAC_PAUSE_AT": "run.opened=120"})
    try:
        lock = tmp_path / "runs" / "busy" / "run.lock"
        deadline = time.monotonic() + 300
        while not (lock.exists() and str(proc.pid) in lock.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.5)
        assert main(["--work-dir", str(tmp_path), "run", str(cfg), "--run-id", "busy"]) == EXIT_LOCKED
        assert f"run 'busy' is already running (pid {proc.pid}" in capsys.readouterr().err
        with pytest.raises(RunLockedError):
            rac_prune(config_path=str(cfg), run_id="busy", work_dir=str(tmp_path))
    finally:
        proc.kill()
        proc.communicate()
    assert [r["run_id"] for r in Index(tmp_path).list_runs()] == ["busy"]


def test_corrupted_shard_is_detected_and_recomputed(ref: dict[str, Any], work_copy: Path) -> None:
    from rac_prefect.flows.prune import rac_prune

    work = work_copy
    idx = Index(work)
    ref_stages = {s["name"]: s for s in Index(ref["work"]).run_stages("ref")}
    shard = work / "stages" / "cots" / ref_stages["cots"]["stage_key"] / "part-00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[:-20] + bytes(20))  # same size, different content
    out = rac_prune(config_path=str(TINY), run_id="after-corruption", work_dir=str(work))
    assert not out["stages"]["cots"]["reused"]  # the cots stage was recomputed, not trusted
    assert out["stages"]["cots"]["stage_key"] == ref_stages["cots"]["stage_key"]
    assert shard.read_bytes() == good  # deterministic sampling regenerates the same shard
    assert [k for k, v in out["stages"].items() if not v["reused"]] == ["cots"]  # same CoTs: the rest reused
    assert same_models(models_of(work, "after-corruption"), models_of(ref["work"], "ref"))
    assert idx.get_run("after-corruption")["status"] == "done"  # type: ignore[index]


def test_serve_registers_cron_deployment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import timedelta

    from prefect.settings import PREFECT_API_URL, temporary_settings

    seen: dict[str, Any] = {}
    import rac_prefect.flows.prune

    monkeypatch.setattr(type(rac_prefect.flows.prune.rac_prune), "serve", lambda self, **kw: seen.update(kw))
    with temporary_settings({PREFECT_API_URL: None}):  # the embedded server cannot schedule: refused
        assert main(["--work-dir", str(tmp_path), "serve", str(TINY)]) == EXIT_BAD_INPUT
        assert "needs a Prefect server" in capsys.readouterr().err and not seen
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # a server (never contacted here)
        assert main(["--work-dir", str(tmp_path), "serve", str(TINY), "--cron", "15 4 * * 1"]) == EXIT_OK
        assert seen == {"name": "rac-scheduled", "cron": "15 4 * * 1",
                        "parameters": {"config_path": str(TINY), "work_dir": str(tmp_path)}}
        seen.clear()
        assert main(["--work-dir", str(tmp_path), "serve", str(TINY), "--interval", "30"]) == EXIT_OK
        assert seen == {"name": "rac-scheduled", "interval": timedelta(seconds=30),
                        "parameters": {"config_path": str(TINY), "work_dir": str(tmp_path)}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\n")
    assert main(["serve", str(bad)]) == EXIT_BAD_INPUT


def test_prefect_yaml_deployments_point_at_flows() -> None:
    import inspect

    from rac_prefect.flows.eval import rac_eval
    from rac_prefect.flows.prune import rac_prune

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flows_by_entry: dict[str, Any] = {"flows/prune.py:rac_prune": rac_prune, "flows/eval.py:rac_eval": rac_eval}
    for dep in spec["deployments"]:
        flow = flows_by_entry[dep["entrypoint"]]
        assert set(dep["parameters"]) <= set(inspect.signature(flow.fn).parameters), dep["name"]
        for value in dep["parameters"].values():
            if str(value).endswith(".yaml"):
                assert (REPO / value).is_file()
    crons = [s["cron"] for d in spec["deployments"] for s in d.get("schedules", [])]
    assert crons == ["0 3 * * *"]


def test_interrupted_evaluation_keeps_its_verified_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    import rac.runs.resume
    from rac.eval.evaluate import eval_cots_dir
    from rac.runs import stages as steps

    cfg = load_run_config(TINY)
    model = tiny_model("llama")

    def evaluate_in(work: Path) -> tuple[StageOutput, list[str]]:
        env = RunRef(str(work), "e", str(model), model_revision(model))
        if Index(work).get_run("e") is None:
            Index(work).create_run("e", "t", {}, {}, "", 1)
        prompts = steps.prompts_step(env, cfg.eval_prompts, name="prompts/eval")
        assert cfg.eval is not None
        ecfg = cfg.eval.model_copy(update={"generation": cfg.eval.generation.model_copy(update={"shard_size": 1})})
        logs: list[str] = []
        return steps.eval_step(env, "dense", ecfg, None, None, prompts, {}, log=logs.append), logs

    whole, _ = evaluate_in(tmp_path / "whole")
    real = rac.runs.resume.crashpoint

    def crash(name: str) -> None:
        if name == "cots.shard:1":
            raise RuntimeError("killed")
        real(name)

    monkeypatch.setattr(rac.runs.resume, "crashpoint", crash)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_in(tmp_path / "cut")
    first = next((tmp_path / "cut").rglob("rows.cots/part-00000.parquet"))
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(rac.runs.resume, "crashpoint", real)
    resumed, logs = evaluate_in(tmp_path / "cut")
    assert any("resuming after 1 verified generation shard(s)" in m for m in logs), logs
    assert first.stat().st_mtime_ns == stamp  # shard 0 kept, not generated again
    assert len(list(eval_cots_dir(resumed.output("eval-rows").path).glob("part-*.parquet"))) == 2
    assert pq.read_table(resumed.output("eval-rows").path).equals(pq.read_table(whole.output("eval-rows").path))
