"""`rac.reporting.export`: a run's pruned models, exported as a self-contained HF folder with a model card whose
numbers are the index's; and the report of a finished run (final status, model folders, inlined images)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from workdirs import copy_work_dir

import rac
from rac.models.assets import tiny_model
from rac.models.streaming import model_revision
from rac.reporting.export import CARD_NAME, PROVENANCE_NAME, export_model, pruned_models
from rac.reporting.report import report_markdown_for_artifact, write_report
from rac.runs import stages as steps
from rac.runs.run_config import load_run_config
from rac.runs.session import fingerprint
from rac.runs.workdir import FileLock, RunRef, WorkDir
from rac.store.index import Index

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "configs" / "tiny.yaml"
RUN = "x"


def _quiet(msg: str) -> None:
    return None


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """prompts -> CoTs -> rac calibration -> prune -> dense + pruned eval -> token error -> proxies, through the
    stage steps (no Prefect), under a run row made like `rac run` makes it (config, fingerprint, config path)."""
    root = tmp_path_factory.mktemp("export") / "work"
    cfg = load_run_config(TINY)
    model = tiny_model("llama")
    env = RunRef(str(root), RUN, str(model), model_revision(model))
    Index(root).create_run(RUN, cfg.name, cfg.canonical(), fingerprint(model, cfg.canonical()), str(TINY), 1)
    assert cfg.generate is not None and cfg.eval is not None and cfg.eval_prompts is not None
    assert cfg.proxies is not None
    prompts = steps.prompts_step(env, cfg.prompts, log=_quiet)
    cots = steps.cots_step(env, cfg.generate, prompts, log=_quiet)
    calib = steps.calib_step(env, "rac", cfg.calibrations["rac"], prompts, cots, log=_quiet)
    job = next(j for j in cfg.jobs if j.calibration == "rac")
    pruned = steps.prune_step(env, job, calib, log=_quiet)
    eval_prompts = steps.prompts_step(env, cfg.eval_prompts, log=_quiet, name="prompts/eval")
    template = prompts.summary.get("template", {}).get("hash")
    dense = steps.eval_step(env, "dense", cfg.eval, template, None, eval_prompts,
                            {"model": "dense", "calibration": None, "method": None, "sparsity": 0.0}, log=_quiet)
    meta = {"model": job.label, "calibration": job.calibration, "method": job.compress.prune.method,
            "sparsity": job.compress.prune.sparsity}
    steps.eval_step(env, job.label, cfg.eval, template, pruned, eval_prompts, meta, log=_quiet)
    heat = steps.tokerror_step(env, job.label, cfg.report, pruned, calib, log=_quiet)
    steps.proxies_step(env, job.label, cfg.proxies, pruned, dense, heat, meta, log=_quiet)
    return {"dir": root, "model": model, "job": job, "pruned": pruned, "calib": calib, "cfg": cfg}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables of `md` by their first header cell: rows as header -> cell."""
    out: dict[str, list[dict[str, str]]] = {}
    block: list[list[str]] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            head = block[0]
            out[head[0]] = [dict(zip(head, row, strict=True)) for row in block[2:]]
        block = []
    return out


def _front_matter(card: str) -> dict[str, Any]:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    data = yaml.safe_load(m.group(1))
    assert isinstance(data, dict)
    return data


def _interval(cell: str) -> tuple[float, float]:
    lo, hi = cell.strip("[]").split(",")
    return float(lo), float(hi)


def test_pruned_models_lists_the_finished_prunes_of_a_run(work: dict[str, Any]) -> None:
    models = pruned_models(work["dir"], RUN)
    job = work["job"]
    assert [m.label for m in models] == [job.label]
    m = models[0]
    assert (m.calibration, m.method, m.sparsity, m.nm) == ("rac", "sparsegpt", 0.5, None)
    assert m.stage_key == work["pruned"].stage_key and m.folder == work["pruned"].output("model").path
    assert m.verified is True and m.problem is None and m.setting == "50%"
    assert pruned_models(work["dir"], RUN, verify=False)[0].verified is None
    with pytest.raises(ValueError, match=r"no run 'nope'.*known runs: \['x'\]"):
        pruned_models(work["dir"], "nope")


def test_export_writes_a_loadable_copy_with_the_provenance_and_a_card(work: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    label, src = work["job"].label, work["pruned"].output("model").path
    before = _files(work["dir"])
    dest = export_model(work["dir"], RUN, label, tmp_path / "out")
    assert dest == (tmp_path / "out").resolve()
    exported, source = _files(dest), _files(src)
    assert set(exported) == set(source) | {CARD_NAME}  # the folder's files and the card, nothing else
    assert all(exported[name] == data for name, data in source.items() if name != CARD_NAME)
    assert PROVENANCE_NAME in exported  # unchanged (compared above)
    assert _files(work["dir"]) == before  # the work dir is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left beside it
    want = _tensors(src)
    loaded = AutoModelForCausalLM.from_pretrained(str(dest), torch_dtype=torch.float32)
    state = loaded.state_dict()
    assert state.keys() == want.keys()  # every tensor of the folder loaded, none initialised afresh
    for name, tensor in want.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    got_files = _tensors(dest)
    assert got_files.keys() == want.keys()
    assert all(torch.equal(got_files[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)  # bitwise


def test_the_card_states_the_index_numbers(work: dict[str, Any], tmp_path: Path) -> None:
    label = work["job"].label
    dest = export_model(work["dir"], RUN, label, tmp_path / "out")
    card = (dest / CARD_NAME).read_text()
    front = _front_matter(card)
    index = Index(work["dir"])
    run = index.get_run(RUN)
    assert run is not None
    assert front["base_model"] == run["config"]["model"] == "tiny-llama"
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["pruned", "sparse", "rac", "sparsegpt"]
    tables = _tables(card)
    fields = {r["field"]: r["value"] for r in tables["field"]}
    assert fields["base model folder"] == f"`{work['model'].resolve()}`"
    assert fields["method"] == "sparsegpt" and fields["calibration"] == "rac"
    assert fields["rac version"] == rac.__version__
    assert float(fields["target sparsity"]) == 0.5
    # achieved sparsity: the layers rows, and the zeros counted in the exported weights of the pruned linears
    rows = index.layer_rows(work["pruned"].stage_key)
    assert int(fields["pruned linears"]) == len(rows) == 2 * 7
    tensors = _tensors(dest)
    zeros = sum(int((tensors[f"{r['linear']}.weight"] == 0).sum()) for r in rows)
    total = sum(tensors[f"{r['linear']}.weight"].numel() for r in rows)
    weighted = sum(r["sparsity"] * tensors[f"{r['linear']}.weight"].numel() for r in rows) / total
    assert float(fields["achieved sparsity"]) == pytest.approx(zeros / total, abs=5e-5)
    assert float(fields["achieved sparsity"]) == pytest.approx(weighted, abs=5e-5)
    # calibration token counts: the calibration stage's summary, and the segments of the calibration file
    summary = index.done_stages(work["calib"].stage_key)[0]["summary"]
    segments = [s for seq in pq.read_table(work["calib"].output("calibration").path).column("segment").to_pylist()
                for s in seq]
    counted = {"prompt": segments.count(0), "decode": segments.count(1), "other": segments.count(2)}
    seg_rows = {r["segment"]: r for r in tables["segment"]}
    assert set(seg_rows) == set(counted)
    for seg, n in counted.items():
        assert int(seg_rows[seg]["tokens"]) == n == round(summary[f"{seg}_share"] * summary["n_tokens"])
        assert float(seg_rows[seg]["share"]) == pytest.approx(summary[f"{seg}_share"], abs=5e-5)
        assert seg_rows[seg]["field"] == f"`{seg}_share`"
    assert f"`n_tokens` {summary['n_tokens']}" in card and summary["n_tokens"] == len(segments)
    # evaluation of this model and of the dense one, with intervals
    evals = {e["label"]: e for e in index.evals(RUN)}
    shown = {r["model"]: r for r in tables["model"]}
    assert set(shown) == {label, "dense"}
    for name, r in shown.items():
        e = evals[name]
        assert int(r["problems"]) == e["n_problems"]
        assert float(r["accuracy"]) == pytest.approx(e["accuracy"], abs=5e-5)
        assert _interval(r["95% CI"]) == pytest.approx((e["ci_low"], e["ci_high"]), abs=5e-5)
        assert float(r["mean CoT tokens"]) == pytest.approx(e["mean_tokens"], abs=0.05)
        assert float(r["runaway share"]) == pytest.approx(e["runaway_share"], abs=5e-5)
    (proxy,) = tables["nll_gap"]
    p = next(p for p in index.proxies(RUN) if p["label"] == label)
    assert float(proxy["nll_gap"]) == pytest.approx(p["nll_gap"], abs=5e-5)
    assert float(proxy["top1_agreement"]) == pytest.approx(p["top1_agreement"], abs=5e-5)
    assert int(proxy["positions"]) == p["n_positions"]
    assert f"rac --work-dir {work['dir'].resolve()} run {TINY} --run-id {RUN}" in card
    assert "stored dense" in card and "dense speed" in card


def test_export_refuses_existing_dest_unknown_run_or_label_and_a_changed_folder(work: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    label = work["job"].label
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        export_model(work["dir"], RUN, label, busy)
    assert str(busy) in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_model(work["dir"], RUN, label, empty) / CARD_NAME).is_file()  # an empty folder is fine
    with pytest.raises(ValueError) as err:
        export_model(work["dir"], RUN, "nope", tmp_path / "a")
    assert "'nope'" in str(err.value) and f"known labels: ['{label}']" in str(err.value)
    with pytest.raises(ValueError, match=r"no run 'other'.*known runs: \['x'\]"):
        export_model(work["dir"], "other", label, tmp_path / "a")
    copy = copy_work_dir(work["dir"], tmp_path / "copy")
    folder = pruned_models(copy, RUN, verify=False)[0].folder
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert pruned_models(copy, RUN)[0].verified is False
    with pytest.raises(ValueError) as err:
        export_model(copy, RUN, label, tmp_path / "b")
    msg = str(err.value)
    assert str(folder) in msg and f"rac --work-dir {copy} verify {RUN}" in msg and "\n" not in msg
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


def test_report_of_a_finished_run_says_done_lists_the_folders_and_inlines_its_images(work: dict[str, Any],
                                                                                     tmp_path: Path) -> None:
    copy = copy_work_dir(work["dir"], tmp_path / "work")
    folder = pruned_models(copy, RUN, verify=False)[0].folder
    label = work["job"].label
    report = WorkDir(copy).report_dir(RUN) / "report.md"
    # written by the flow's last task: the row still says running, the run holds its lock, every stage is done
    with FileLock(WorkDir(copy).lock_file(RUN), "run"):
        write_report(copy, RUN)
    md = report.read_text()
    assert "status **done**" in md
    assert f"`{folder}`" in md and f"`rac --work-dir {copy} export {RUN} {label} DEST`" in md
    write_report(copy, RUN)  # nobody holds the lock and the row says running: it was interrupted
    assert "status **interrupted (rac resume)**" in report.read_text()
    write_report(copy, RUN, status="done")
    assert "status **done**" in report.read_text()
    Index(copy).set_run(RUN, "done")
    paths = write_report(copy, RUN)
    md = report.read_text()
    assert "status **done**" in md and paths[0] == report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"metrics.png", "layer_error.png", f"tokerror-{label}.png"} <= set(images)  # relative on disk
    inlined = report_markdown_for_artifact(report)
    uris = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", inlined)
    assert len(uris) == len(images) and all(u.startswith("data:image/png;base64,") for u in uris)
    for name, uri in zip(images, uris, strict=True):
        assert base64.b64decode(uri.split(",", 1)[1]) == (report.parent / name).read_bytes(), name
    assert not any(re.search(rf"\]\({re.escape(n)}\)", inlined) for n in images)
    assert inlined.replace("\n", "") != md.replace("\n", "") and report.read_text() == md  # the file keeps paths


def test_the_cli_exports_the_model_and_its_calibration(work: dict[str, Any], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from datasets import load_from_disk

    from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_OK, main

    label, wd = work["job"].label, str(work["dir"])
    assert main(["export", RUN, label, str(tmp_path / "m"), "--work-dir", wd]) == EXIT_OK
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    got, want = _tensors(tmp_path / "m"), _tensors(work["pruned"].output("model").path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert (tmp_path / "m" / "README.md").is_file()
    assert main(["export", RUN, label, str(tmp_path / "m"), "--work-dir", wd]) == EXIT_BAD_INPUT  # not empty
    assert "already exists" in capsys.readouterr().err
    assert main(["export-calibration", RUN, "rac", str(tmp_path / "c"), "--work-dir", wd]) == EXIT_OK
    ds = load_from_disk(str(tmp_path / "c"))
    calib = pq.read_table(str(work["calib"].output("calibration").path))
    assert ds["input_ids"] == calib.column("input_ids").to_pylist()
    assert f"{calib.num_rows} sequences" in capsys.readouterr().out
    assert main(["export-calibration", RUN, "nope", str(tmp_path / "d"), "--work-dir", wd]) == EXIT_BAD_INPUT
