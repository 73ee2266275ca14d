"""Flow wiring under `prefect_test_harness`, task bodies called directly, and whole runs through the CLI
(reuse, a mid-generation kill resumed to the identical model, two runs on one run id, a corrupted shard).

One Prefect test server serves the module; subprocess runs reach it through PREFECT_API_URL."""

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
    """One uninterrupted run of tiny.yaml through the flow; later tests compare against it."""
    from rac_prefect.flows.prune import rac_prune

    work = tmp_path_factory.mktemp("ref")
    result = rac_prune(config_path=str(TINY), run_id="ref", work_dir=str(work))
    return {"work": work, "result": result}


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


def test_flow_runs_every_stage_and_records_them(reference: dict[str, Any]) -> None:
    work, result = reference["work"], reference["result"]
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
    for name in ("prune/prompt-sparsegpt-50pct", "prune/rac-sparsegpt-50pct"):
        rows = idx.layer_rows(names[name]["stage_key"])
        assert len(rows) == 2 * 7 and all(abs(r["sparsity"] - 0.5) < 0.01 for r in rows)  # 2 layers x 7 linears
    _, agg = idx.query("select count(*), avg(completion_len), sum(completion_len) from cots")
    assert agg[0][0] == 6 and agg[0][1] == agg[0][2] / 6
    assert Path(result["report"]).name == "report.md" and Path(result["report"]).is_file()
    two = models_of(work, "ref")
    assert not same_models({"a": two["prune/prompt-sparsegpt-50pct"]}, {"a": two["prune/rac-sparsegpt-50pct"]})


def test_proxies_rows_score_each_pruned_model_on_the_dense_eval_cots(reference: dict[str, Any]) -> None:
    from rac.eval.evaluate import eval_cots_dir
    from rac.eval.proxies import ProxyConfig, cot_proxies

    work = reference["work"]
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


def test_compare_joins_evals_proxies_and_problems(reference: dict[str, Any], tmp_path: Path) -> None:
    from rac.reporting.compare import collect_cells, paired_rows
    from rac_prefect.flows.cli import main

    work = reference["work"]
    cells = {c.label: c for c in collect_cells(work)}
    assert set(cells) == {"dense", "prompt-sparsegpt-50pct", "rac-sparsegpt-50pct"}
    _, rows = Index(work).query("select stage_key, prompt_id, correct from eval_rows")
    for c in cells.values():
        mine = {p: float(ok) for k, p, ok in rows if k == c.eval_key}
        assert c.per_problem == mine and len(mine) == 2
        assert c.get("accuracy") == pytest.approx(sum(mine.values()) / 2)
    assert cells["dense"].setting == "dense" and cells["rac-sparsegpt-50pct"].setting == "50%"
    assert cells["dense"].proxies is None and cells["rac-sparsegpt-50pct"].get("top1_agreement") is not None
    pair = paired_rows(list(cells.values()), "rac", "prompt")[0]
    rac_q, prompt_q = (cells[f"{c}-sparsegpt-50pct"].get("pruned_nll") for c in ("rac", "prompt"))
    assert pair["nll_gap_diff"] == pytest.approx(rac_q - prompt_q)  # type: ignore[operator]
    assert pair["nll_gap_low"] <= pair["nll_gap_diff"] <= pair["nll_gap_high"]
    runaway = {c: cells[f"{c}-sparsegpt-50pct"].get("runaway_share") for c in ("rac", "prompt")}
    assert pair["runaway_diff"] == pytest.approx(runaway["rac"] - runaway["prompt"])  # type: ignore[operator]
    assert main(["--work-dir", str(work), "compare", "--out", str(tmp_path / "cmp"), "--base", "prompt"]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| sparsegpt | 50% | rac - prompt | 2 |" in md and (tmp_path / "cmp" / "vs_sparsity.png").stat().st_size > 0


def test_flow_publishes_prefect_artifacts(reference: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["ref-report", "ref-generation", "ref-prune-rac-sparsegpt-50pct", "ref-eval-dense"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == set(keys)
    assert by_key["ref-report"].type == "markdown" and "# rac run `ref`" in str(by_key["ref-report"].data)
    assert by_key["ref-prune-rac-sparsegpt-50pct"].type == "progress"
    assert float(by_key["ref-prune-rac-sparsegpt-50pct"].data) == 100.0  # type: ignore[arg-type]


def test_rerun_does_no_work_and_new_prune_config_reuses_cots(reference: dict[str, Any], tmp_path: Path) -> None:
    from rac_prefect.flows.prune import rac_prune

    work = reference["work"]
    rac_prune(config_path=str(TINY), run_id="ref", work_dir=str(work))  # same run again: Prefect cache
    again = rac_prune(config_path=str(TINY), run_id="second", work_dir=str(work))  # new run: index reuse
    assert all(s["reused"] for s in again["stages"].values())
    assert same_models(models_of(work, "second"), models_of(work, "ref"))
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
    assert cells["prompt-wanda-50pct"].eval == {} and cells["prompt-wanda-50pct"].proxies is not None
    wanda = [r for r in paired_rows(list(cells.values()), "rac", "prompt") if r["method"] == "wanda"]
    assert len(wanda) == 1 and "nll_gap_diff" in wanda[0] and "accuracy_diff" not in wanda[0]


def test_task_bodies_run_without_prefect(reference: dict[str, Any], tmp_path: Path) -> None:
    from rac_prefect.tasks import build_calibration_task, sample_prompts_task

    cfg = load_run_config(TINY)
    model = tiny_model("llama")
    env = RunRef(str(tmp_path), "direct", str(model), model_revision(model))
    Index(tmp_path).create_run("direct", "t", {}, {}, "", 1)
    prompts = sample_prompts_task.fn(env, cfg.prompts)
    ref_prompts = Index(reference["work"]).done_stages(prompts.stage_key)
    assert ref_prompts and prompts.output("prompts").sha256 == ref_prompts[0]["outputs"][0].sha256
    calib = build_calibration_task.fn(env, "prompt", cfg.calibrations["prompt"], prompts, None)
    assert calib.summary["kind"] == "prompt" and calib.summary["prompt_share"] == 1.0


def test_eval_flow_on_a_pruned_folder(reference: dict[str, Any]) -> None:
    from rac_prefect.flows.eval import rac_eval

    work = reference["work"]
    key = {s["name"]: s for s in Index(work).run_stages("ref")}["prune/rac-sparsegpt-50pct"]["stage_key"]
    folder = work / "stages" / "prune" / key / "model"
    out = rac_eval(model=str(folder), eval_config=str(TINY), work_dir=str(work), label="rac-pruned", run_id="ev1")
    assert out["n_problems"] == 2 and 0.0 <= out["accuracy"] <= 1.0
    ref_row = {e["label"]: e for e in Index(work).evals("ref")}["rac-sparsegpt-50pct"]
    row = Index(work).evals("ev1")[0]
    assert row["label"] == "rac-pruned" and row["mean_tokens"] == ref_row["mean_tokens"]  # same model, same seeds
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
def test_killed_mid_generation_resumes_to_identical_models(reference: dict[str, Any], api_url: str,
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
    assert same_models(models_of(tmp_path, "crash"), models_of(reference["work"], "ref"))


@pytest.mark.slow
def test_second_run_on_same_id_refuses(reference: dict[str, Any], api_url: str, tmp_path: Path,
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


def test_corrupted_shard_is_detected_and_recomputed(reference: dict[str, Any]) -> None:
    from rac_prefect.flows.prune import rac_prune

    work = reference["work"]
    idx = Index(work)
    shard = sorted((work / "stages" / "cots").glob("*/part-00001.parquet"))[0]
    good = shard.read_bytes()
    shard.write_bytes(good[:-20] + bytes(20))  # same size, different content
    out = rac_prune(config_path=str(TINY), run_id="after-corruption", work_dir=str(work))
    assert not out["stages"]["cots"]["reused"]  # the cots stage was recomputed, not trusted
    assert shard.read_bytes() == good  # deterministic sampling regenerates the same shard
    assert out["stages"]["prune/rac-sparsegpt-50pct"]["reused"]  # same CoTs -> same calibration -> reuse
    assert idx.get_run("after-corruption")["status"] == "done"  # type: ignore[index]


def test_serve_registers_cron_deployment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:

    seen: dict[str, Any] = {}
    import rac_prefect.flows.prune

    monkeypatch.setattr(type(rac_prefect.flows.prune.rac_prune), "serve", lambda self, **kw: seen.update(kw))
    assert main(["--work-dir", str(tmp_path), "serve", str(TINY), "--cron", "15 4 * * 1"]) == EXIT_OK
    assert seen == {"name": "rac-scheduled", "cron": "15 4 * * 1",
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
