"""The YAML run config: composition of the library's stage configs, the grid, and every problem listed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from rac.data.calib import CalibConfig
from rac.engine import CompressConfig
from rac.pruners.base import PruneConfig
from rac.runs.run_config import TOP_KEYS, RunConfigError, load_run_config, parse_run_config


def base() -> dict[str, Any]:
    return {
        "name": "t",
        "model": "tiny-llama",
        "prompts": {"source": "gsm8k", "n": 4},
        "generate": {"max_new_tokens": 16},
        "calibrations": {"prompt": {"kind": "prompt", "token_budget": 500},
                         "rac": {"kind": "rac", "token_budget": 500}},
        "compress": {"act_dtype": "float32"},
        "prune": [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "wanda", "nm": [2, 4]}],
    }


def problems(data: Any) -> str:
    with pytest.raises(RunConfigError) as info:
        parse_run_config(data, source="cfg.yaml")
    return str(info.value)


def test_valid_config_composes_stage_configs_and_grid() -> None:
    cfg = parse_run_config(base())
    assert cfg.calibrations["rac"] == CalibConfig(kind="rac", token_budget=500)
    assert [j.label for j in cfg.jobs] == ["prompt-sparsegpt-50pct", "rac-sparsegpt-50pct",
                                           "prompt-wanda-2of4", "rac-wanda-2of4"]
    job = cfg.jobs[3]
    assert job.compress == CompressConfig(prune=PruneConfig(method="wanda", nm=(2, 4)), act_dtype="float32")
    assert job.compress.prune.sparsity == 0.5  # implied by 2:4
    assert cfg.needs_cots() and cfg.generate is not None and cfg.generate.max_new_tokens == 16
    assert cfg.eval is None and cfg.eval_dense is True
    again = parse_run_config(cfg.canonical())  # the stored form resumes to the same run config
    assert again == cfg and again.canonical() == cfg.canonical()


def test_generate_only_when_needed() -> None:
    data = base()
    data["calibrations"] = {"prompt": {"kind": "prompt"}}
    del data["generate"]
    cfg = parse_run_config(data)
    assert cfg.generate is None and not cfg.needs_cots()
    data["calibrations"] = {"rac": {"kind": "rac"}}
    assert parse_run_config(data).generate is not None  # defaults filled in


def test_unknown_keys_are_listed_with_known_ones() -> None:
    data = base()
    data["sparsity"] = 0.5
    data["compress"] = {"act_dtype": "float32", "bogus": 1}
    data["calibrations"]["rac"]["tokens"] = 10
    msg = problems(data)
    assert "unknown key(s) ['sparsity']; known keys: " + ", ".join(TOP_KEYS) in msg
    assert "unknown key 'compress.bogus'; known keys in compress: act_dtype, batch_tokens" in msg
    assert "prune" not in msg.split("known keys in compress:")[1].split("\n")[0]  # `prune` lives at top level
    assert "unknown key 'calibrations.rac.tokens'; known keys in calibrations.rac: decode_share, kind, max_seq_len" in msg


def test_bad_values_are_named() -> None:
    data = base()
    data["prune"] = [{"method": "sparsegpt", "sparsity": 1.5}, {"method": "obs-magic", "sparsity": 0.5}]
    msg = problems(data)
    assert "prune[0].sparsity = 1.5" in msg
    assert "prune[1].method = 'obs-magic'" in msg and "known: [" in msg and "'sparsegpt'" in msg
    data = base()
    data["calibrations"] = {"x": {"kind": "webtext"}}
    assert "calibrations.x.kind = 'webtext'" in problems(data)
    data = base()
    data["generate"] = {"engine": "llama.cpp"}
    assert "generate.engine = 'llama.cpp'" in problems(data) and "transformers" in problems(data)


def test_structure_problems() -> None:
    assert "must be a mapping" in problems(["a", "b"])
    msg = problems({"name": "x"})
    for key in ("model", "prompts", "calibrations", "prune"):
        assert f"missing key {key!r}" in msg
    data = base()
    data["prune"] = []
    assert "prune = []" in problems(data)
    data = base()
    data["compress"] = {"prune": {"method": "wanda"}}
    assert "top-level `prune` list" in problems(data)
    data = base()
    data["name"] = "bad name/"
    assert "name = 'bad name/'" in problems(data)
    data = base()
    data["prune"] = [{"method": "wanda", "sparsity": 0.5}, {"method": "wanda", "sparsity": 0.5}]
    assert "duplicate entries" in problems(data)


def test_yaml_files(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    assert load_run_config(good).name == "t"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nprune:\n  - method: wanda\n   sparsity: 0.5\n")
    with pytest.raises(RunConfigError, match=r"malformed YAML at line 4, column \d+"):
        load_run_config(bad)
    with pytest.raises(RunConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("data/configs/*.yaml")))
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.jobs


def test_proxies_section_needs_dense_eval() -> None:
    from rac.eval.proxies import ProxyConfig

    data = {**base(), "proxies": {"n_sequences": 8}}
    assert "proxies: scored on the dense model's evaluation CoTs" in problems(data)
    data["eval"] = {"prompts": {"source": "gsm8k", "holdout": "eval", "n": 2},
                    "generation": {"max_new_tokens": 8, "token_budget": None}}
    cfg = parse_run_config(data)
    assert cfg.proxies == ProxyConfig(n_sequences=8)
    assert parse_run_config(cfg.canonical()) == cfg
    assert "proxies" not in parse_run_config(base()).canonical()  # absent stays absent (stable run fingerprints)
    assert "proxies.n_sequences" in problems({**data, "proxies": {"n_sequences": 0}})
    assert "eval_dense: true" in problems({**data, "eval_dense": False})


def test_eval_pruned_selects_models_by_label() -> None:
    data = {**base(), "eval": {"prompts": {"source": "gsm8k", "holdout": "eval", "n": 2},
                               "generation": {"max_new_tokens": 8, "token_budget": None}}}
    every = parse_run_config(data)
    assert all(every.evaluates(j) for j in every.jobs) and "eval_pruned" not in every.canonical()
    some = parse_run_config({**data, "eval_pruned": ["rac-wanda-2of4"]})
    assert [j.label for j in some.jobs if some.evaluates(j)] == ["rac-wanda-2of4"]
    assert parse_run_config(some.canonical()) == some
    none = parse_run_config({**data, "eval_pruned": False})
    assert not any(none.evaluates(j) for j in none.jobs) and parse_run_config(none.canonical()) == none
    assert not any(parse_run_config(base()).evaluates(j) for j in every.jobs)  # no eval section
    assert "unknown label(s) ['rac-60pct']" in problems({**data, "eval_pruned": ["rac-60pct"]})
    assert "eval_pruned = 'yes'" in problems({**data, "eval_pruned": "yes"})


def test_sections_are_the_library_configs_and_eval_carries_no_runtime_paths() -> None:
    from rac.data.generate import GenerateConfig
    from rac.data.prompts import PromptsConfig
    from rac.eval.evaluate import EvalConfig

    data = {**base(), "eval": {"prompts": {"source": "gsm8k", "n": 2, "holdout": "eval"},
                               "generation": {"max_new_tokens": 8, "token_budget": None}, "bootstrap": 300}}
    cfg = parse_run_config(data)
    assert isinstance(cfg.prompts, PromptsConfig) and isinstance(cfg.generate, GenerateConfig)
    assert isinstance(cfg.eval, EvalConfig) and isinstance(cfg.eval_prompts, PromptsConfig)
    assert cfg.eval.bootstrap == 300 and cfg.eval.generation.max_new_tokens == 8
    assert set(cfg.canonical()["eval"]) == {"prompts", *EvalConfig.model_fields}  # no prompts_path placeholder
    assert all(isinstance(j.compress, CompressConfig) and j.compress.act_dtype == "float32" for j in cfg.jobs)
    bad = {**base(), "compress": {"batch_tokens": 0}}
    assert "compress.batch_tokens = 0: Value error, batch_tokens must be >= 1, got 0" in problems(bad)
