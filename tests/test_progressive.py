"""Progressive on-policy RAC (rac.runs.progressive) through `rac run` on data/configs/tiny-progressive.yaml:
one-shot RAC and a chain 30% -> CoTs of the 30% model -> 50% -> CoTs of the 50% model -> 60%, on tiny-llama.

- each step's CoTs are the step model's own: redrawn here by hand from its folder (plain transformers forward
  passes and the CoT's seed, no rac engine), token for token, and not those of the model before it;
- the chain's stage keys differ from one-shot RAC's; the final model is listed, evaluated and reported like
  any other, the intermediate ones are not; its provenance lists every step with the index's stage keys;
- every model of the chain is pruned from the dense weights with exactly floor(s * n + 1/2) zeros per matrix;
- a run killed inside the second step's CoT generation resumes without redoing a finished stage or shard and
  ends with the models of the uninterrupted run;
- bad configs are refused at parse time, one line naming the value, with nothing written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rac.runs.run_config import RunConfigError, load_run_config, parse_run_config
from rac.store.index import Index
from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_OK, main

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "data" / "configs" / "tiny-progressive.yaml"
FINAL = "rac-progressive-sparsegpt-60pct"
ONE_SHOT = "rac-sparsegpt-60pct"
STEPS = ((1, 0.3, f"{FINAL}/step1-30pct"), (2, 0.5, f"{FINAL}/step2-50pct"))
CRASH_AT = f"cots/{STEPS[1][2]}.shard:1"  # the second step's CoTs: shard 0 recorded, shard 1 written, unrecorded


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def ref(api_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted `rac run` of the tiny progressive config."""
    work = tmp_path_factory.mktemp("progressive")
    assert main(["--work-dir", str(work), "run", str(CONFIG), "--run-id", "ref"]) == EXIT_OK
    return {"work": work, "stages": stages_of(work, "ref")}


def stages_of(work: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """Every stage row of a run by name, with its config, inputs, outputs and summary decoded."""
    cols, rows = Index(work).query("select * from stages where run_id = ?", [run_id])
    out = {}
    for row in rows:
        r = dict(zip(cols, row, strict=True))
        for k in ("config", "inputs", "outputs", "summary"):
            r[k] = json.loads(r[k]) if isinstance(r[k], str) else r[k]
        out[r["name"]] = r
    return out


def folder(row: dict[str, Any], kind: str) -> Path:
    """The output folder/file of a stage row of `kind` (a file:// URI in the index)."""
    from rac.store.artifacts import uri_path

    return Path(uri_path(next(o["uri"] for o in row["outputs"] if o["kind"] == kind)))


def cots_table(row: dict[str, Any]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder(row, "cots").glob("part-*.parquet"))])


def shard_meta(row: dict[str, Any]) -> dict[str, Any]:
    """The `rac.cots` metadata of a cots stage's first shard (config, sampling, the generating model folder)."""
    return dict(json.loads(pq.read_schema(folder(row, "cots") / "part-00000.parquet").metadata[b"rac.cots"]))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def redraw(model_dir: Path, prompt_ids: list[int], seed: int, cap: int, eos: set[int], temperature: float) -> list[int]:
    """One CoT drawn by hand: full forward passes of the folder's model (transformers, no cache, no padding),
    the next token from softmax(logits / temperature) with a generator seeded by the CoT's seed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(int(seed))
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(cap):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            out.append(tok)
            ids.append(tok)
            if tok in eos:
                break
    return out


def test_step_cots_are_drawn_by_the_step_model(ref: dict[str, Any]) -> None:
    cfg = load_run_config(CONFIG)
    assert cfg.generate is not None and cfg.generate.temperature is not None
    stages = ref["stages"]
    dense = stages["cots"]
    before = cots_table(dense)
    gen_cfg = shard_meta(dense)
    for k, _, label in STEPS:
        model_dir = folder(stages[f"prune-step/{label}"], "model")
        row = stages[f"cots/{label}"]
        assert {r["uri"] for r in row["inputs"]} >= {o["uri"] for o in stages[f"prune-step/{label}"]["outputs"]}
        cots = cots_table(row)
        meta = shard_meta(row)
        assert meta["model_dir"] == str(model_dir)  # generated from the step's folder ...
        assert meta["config"] == gen_cfg["config"] and meta["sampling"] == gen_cfg["sampling"]  # ... as the dense
        for col in ("cot_id", "prompt_ids", "seed"):  # the same prompts and seeds
            assert cots.column(col).to_pylist() == before.column(col).to_pylist(), col
        eos = {int(json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"])}
        for prompt, seed, comp in zip(cots.column("prompt_ids").to_pylist(), cots.column("seed").to_pylist(),
                                      cots.column("completion_ids").to_pylist(), strict=True):
            assert redraw(model_dir, prompt, seed, cfg.generate.max_new_tokens, eos, cfg.generate.temperature) == comp
        changed = sum(a != b for a, b in zip(cots.column("completion_ids").to_pylist(),
                                             before.column("completion_ids").to_pylist(), strict=True))
        assert changed >= 1, f"step {k}: the CoTs of the model before it, not its own"
        before = cots
        # the next model of the chain is calibrated on exactly these CoTs
        calib = stages[f"calib/{label}"]
        assert {r["uri"] for r in calib["inputs"]} >= {o["uri"] for o in row["outputs"]}
        nxt = stages[f"prune-step/{STEPS[k][2]}"] if k < len(STEPS) else stages[f"prune/{FINAL}"]
        assert [r["sha256"] for r in nxt["inputs"]] == [o["sha256"] for o in calib["outputs"]]
        packed = pq.read_table(folder(calib, "calibration"))
        full = {f"cot:{c}": p + q for c, p, q in zip(*(cots.column(n).to_pylist()
                                                      for n in ("cot_id", "prompt_ids", "completion_ids")), strict=True)}
        seqs = dict(zip(packed.column("source").to_pylist(), packed.column("input_ids").to_pylist(), strict=True))
        assert seqs and all(full[src][: len(ids)] == ids for src, ids in seqs.items())  # prompt + the step's CoT


def test_keys_labels_and_provenance(ref: dict[str, Any]) -> None:
    from rac.reporting.export import pruned_models

    work, stages = ref["work"], ref["stages"]
    assert stages["calib/rac-progressive"]["stage_key"] == stages["calib/rac"]["stage_key"]  # the first set
    chain_keys = {stages[f"{s}/{label}"]["stage_key"] for s in ("prune-step", "cots", "calib") for _, _, label in STEPS}
    one_shot_keys = {r["stage_key"] for n, r in stages.items() if "progressive" not in n}
    assert stages[f"prune/{FINAL}"]["stage_key"] != stages[f"prune/{ONE_SHOT}"]["stage_key"]
    assert len(chain_keys) == 6 and not chain_keys & one_shot_keys
    assert stages[f"prune/{FINAL}"]["config"] == stages[f"prune/{ONE_SHOT}"]["config"]  # only the data differs
    assert [m.label for m in pruned_models(work, "ref")] == [ONE_SHOT, FINAL]  # no intermediate model listed
    evals = {e["label"]: e for e in Index(work).evals("ref")}
    assert set(evals) == {ONE_SHOT, FINAL} and evals[FINAL]["calibration"] == "rac-progressive"
    assert evals[FINAL]["sparsity"] == pytest.approx(0.6)
    assert f"| {FINAL} |" in (work / "runs" / "ref" / "report" / "report.md").read_text()
    record = json.loads((folder(stages[f"prune/{FINAL}"], "model") / "rac_provenance.json").read_text())
    chain = record["stages"]["progressive"]
    assert chain == stages[f"prune/{FINAL}"]["summary"]["provenance"]["progressive"]
    want = [(1, 0.3, "dense", stages["cots"], stages["calib/rac-progressive"], stages[f"prune-step/{STEPS[0][2]}"]),
            (2, 0.5, "step1", stages[f"cots/{STEPS[0][2]}"], stages[f"calib/{STEPS[0][2]}"],
             stages[f"prune-step/{STEPS[1][2]}"]),
            (3, 0.6, "step2", stages[f"cots/{STEPS[1][2]}"], stages[f"calib/{STEPS[1][2]}"], None)]
    assert chain["pruned_from"] == "dense"
    assert [(s["step"], s["sparsity"], s["cots_from"], s["cots_key"], s["calib_key"], s["model_key"])
            for s in chain["steps"]] == [(k, sp, src, c["stage_key"], cal["stage_key"], m and m["stage_key"])
                                         for k, sp, src, c, cal, m in want]


def test_every_model_is_pruned_from_the_dense_weights_exactly(ref: dict[str, Any]) -> None:
    from rac.models.assets import tiny_model

    stages = ref["stages"]
    dense = weights(tiny_model("llama"))
    for name, sparsity in ((f"prune/{FINAL}", 0.6), *((f"prune-step/{label}", s) for _, s, label in STEPS)):
        got = weights(folder(stages[name], "model"))
        linears = [r["linear"] for r in Index(ref["work"]).layer_rows(stages[name]["stage_key"])]
        assert len(linears) == 2 * 7, name
        for lin in linears:
            w, d = got[f"{lin}.weight"], dense[f"{lin}.weight"]
            assert int((w == 0).sum()) == math.floor(sparsity * w.numel() + 0.5), (name, lin)
            assert not torch.equal(w, d * (w != 0))  # SparseGPT updated the kept weights ...
        for key in set(dense) - {f"{lin}.weight" for lin in linears}:  # ... and nothing else changed
            assert torch.equal(got[key], dense[key]), (name, key)


@pytest.mark.slow
def test_kill_mid_chain_resumes_without_redoing_finished_work(ref: dict[str, Any], api_url: str,
                                                              tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": api_url, "RAC_CRASH_AT": CRASH_AT}
    proc = subprocess.run([sys.executable, "-m", "rac_prefect.flows.cli", "--work-dir", str(tmp_path), "run",
                           str(CONFIG), "--run-id", "crash"], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    killed = stages_of(tmp_path, "crash")
    finished = {n: r for n, r in killed.items() if r["status"] == "done"}
    assert {f"prune/{ONE_SHOT}", f"prune-step/{STEPS[0][2]}", f"cots/{STEPS[0][2]}", f"calib/{STEPS[0][2]}",
            f"prune-step/{STEPS[1][2]}"} <= set(finished)
    assert killed[f"cots/{STEPS[1][2]}"]["status"] == "running" and f"prune/{FINAL}" not in killed
    shard_dir = tmp_path / "stages" / "cots" / killed[f"cots/{STEPS[1][2]}"]["stage_key"]
    assert sorted(p.name for p in shard_dir.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    kept = (shard_dir / "part-00000.parquet").stat().st_mtime_ns

    assert main(["--work-dir", str(tmp_path), "resume", "crash"]) == EXIT_OK
    after = stages_of(tmp_path, "crash")
    for name, row in finished.items():  # not one finished stage computed or recorded again
        assert {k: after[name][k] for k in ("stage_key", "finished", "seconds", "reused", "outputs")} == \
               {k: row[k] for k in ("stage_key", "finished", "seconds", "reused", "outputs")}, name
    summary = after[f"cots/{STEPS[1][2]}"]["summary"]
    assert (summary["shards_reused"], summary["shards_written"]) == (1, 2)  # shard 0 kept; 1 (unrecorded) and 2 new
    assert (shard_dir / "part-00000.parquet").stat().st_mtime_ns == kept
    assert Index(tmp_path).get_run("crash")["status"] == "done"  # type: ignore[index]
    for name in (f"prune/{FINAL}", f"prune/{ONE_SHOT}", *(f"prune-step/{label}" for _, _, label in STEPS)):
        a, b = weights(folder(after[name], "model")), weights(folder(ref["stages"][name], "model"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for _, _, label in STEPS:  # the same CoTs as the uninterrupted run
        assert cots_table(after[f"cots/{label}"]).equals(cots_table(ref["stages"][f"cots/{label}"]))


# ------------------------------------------------------------------ parse-time refusals
def _config(**changes: Any) -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    for key, value in changes.items():
        if key == "progressive":
            data["calibrations"]["rac-progressive"]["progressive"] = value
        elif key == "calib":
            data["calibrations"]["rac-progressive"] = value
        else:
            data[key] = value
    return data


BAD = [
    ("not increasing", {"progressive": {"steps": [0.5, 0.3]}}, "progressive.steps = [0.5, 0.3]"),
    ("repeated step", {"progressive": {"steps": [0.3, 0.3]}}, "[0.3, 0.3] must increase strictly"),
    ("step at the final", {"progressive": {"steps": [0.3, 0.6]}}, "step 0.6 is not below the final sparsity 0.6"),
    ("step above the final", {"progressive": {"steps": [0.7]}}, "step 0.7 is not below the final sparsity 0.6"),
    ("2:4 final", {"progressive": {"steps": [0.3, 0.5]}, "prune": [{"method": "sparsegpt", "nm": [2, 4]}]},
     "step 0.5 is not below the final sparsity 0.5"),
    ("N:M step", {"progressive": {"steps": [[2, 4]]}}, "step [2, 4] is not a sparsity fraction"),
    ("step out of range", {"progressive": {"steps": [0.0, 0.5]}}, "step 0.0 is not in (0, 1)"),
    ("no steps", {"progressive": {"steps": []}}, "progressive.steps"),
    ("kind prompt", {"calib": {"kind": "prompt", "token_budget": 4000, "progressive": {"steps": [0.3]}}},
     "progressive needs kind 'rac'"),
    ("kind generic", {"calib": {"kind": "generic", "token_budget": 4000, "progressive": {"steps": [0.3]}}},
     "got kind 'generic'"),
    ("kind self", {"calib": {"kind": "self", "token_budget": 4000, "progressive": {"steps": [0.3]}}},
     "got kind 'self'"),
    ("gptq", {"prune": [{"method": "gptq", "bits": 4, "group_size": 32}]}, "'gptq' with sparsity 0.0 prunes nothing"),
    ("magnitude", {"prune": [{"method": "magnitude", "sparsity": 0.6}]}, "magnitude pruning reads no calibration"),
]


@pytest.mark.parametrize(("case", "changes", "says"), BAD, ids=[b[0] for b in BAD])
def test_bad_configs_fail_at_parse_time_with_one_line(case: str, changes: dict[str, Any], says: str,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RunConfigError) as err:
        parse_run_config(_config(**changes))
    problems = [line for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and says in problems[0], str(err.value)
    cfg, work = tmp_path / "bad.yaml", tmp_path / "work"
    cfg.write_text(yaml.safe_dump(_config(**changes)))
    assert main(["--work-dir", str(work), "run", str(cfg)]) == EXIT_BAD_INPUT
    assert says in capsys.readouterr().err and not work.exists()  # nothing written


def test_good_configs_labels_and_unchanged_one_shot_hashes() -> None:
    cfg = parse_run_config(_config(prune=[{"method": "sparsegpt", "nm": [2, 4]}, {"method": "wanda", "sparsity": 0.6},
                                          {"method": "sparsegpt", "sparsity": 0.6, "quant": {"bits": 4}}],
                                   progressive={"steps": [0.3, 0.4]}))
    assert [j.label for j in cfg.jobs] == [
        "rac-sparsegpt-2of4", "rac-progressive-sparsegpt-2of4", "rac-wanda-60pct", "rac-progressive-wanda-60pct",
        "rac-sparsegpt-60pct-w4g128", "rac-progressive-sparsegpt-60pct-w4g128"]
    assert parse_run_config(cfg.canonical()) == cfg
    renamed = _config()
    renamed["calibrations"]["onpolicy"] = renamed["calibrations"].pop("rac-progressive")
    assert [j.label for j in parse_run_config(renamed).jobs] == [ONE_SHOT, "onpolicy-sparsegpt-60pct-progressive"]
    from rac.runs.progressive import plan_chain

    job = cfg.jobs[1]
    steps = plan_chain(job, cfg.calibrations[job.calibration])
    assert [(s.job.label, s.job.compress.prune.sparsity, s.job.compress.prune.nm, s.job.compress.prune.scope)
            for s in steps] == [("rac-progressive-sparsegpt-2of4/step1-30pct", 0.3, None, "matrix"),
                                ("rac-progressive-sparsegpt-2of4/step2-40pct", 0.4, None, "matrix")]
    assert all(s.job.compress.prune.quant is None for s in plan_chain(cfg.jobs[5], cfg.calibrations["rac-progressive"]))
    tiny = load_run_config(REPO / "data" / "configs" / "tiny.yaml")  # hashes from before progressive existed
    assert {k: v.stable_hash(20) for k, v in tiny.calibrations.items()} == {
        "prompt": "54507d4c730b7e62e736", "rac": "a49cedbf060d8bb552da"}
    assert "progressive" not in tiny.calibrations["rac"].canonical()
    assert cfg.calibrations["rac-progressive"].one_shot().stable_hash(20) == "a49cedbf060d8bb552da"
