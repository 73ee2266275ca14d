"""No file a user did not write is ever executed: a model folder's own Python code (auto_map) is never run.

The hostile folder is a copy of the tiny Llama whose config.json names an unknown model_type and points
`auto_map` at Python files in the folder, and whose tokenizer_config.json names an unknown tokenizer class
with its own `auto_map`. Importing any of those files writes a marker file. Left to its default
(trust_remote_code=None) transformers asks on stdin whether to run such code; every hostile load here runs in
a subprocess whose stdin answers ``y`` to every question, so a prompt anywhere would be accepted and the
marker written. A control run (plain `AutoConfig.from_pretrained`) shows that it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rac.models.assets import tiny_model

EVIL_TYPE = "evil_llama"
PROMPT = "Do you wish to run the custom code?"  # transformers' stdin question
EVIL_FILES = ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py")


def make_evil(dest: Path, marker: Path, *, tokenizer: bool = True, model_type: str = EVIL_TYPE) -> Path:
    """A copy of the tiny Llama at `dest` whose own code (importing it writes `marker`) is needed to load it."""
    shutil.copytree(tiny_model("llama"), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (dest / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        tcfg = json.loads((dest / "tokenizer_config.json").read_text())
        tcfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
        (dest / "tokenizer_config.json").write_text(json.dumps(tcfg))
    body = (
        "import pathlib\n"
        f"with open({str(marker)!r}, 'a') as fh:\n"
        "    fh.write(__name__ + '\\n')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {EVIL_TYPE!r}\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    for name in EVIL_FILES:
        (dest / name).write_text(body)
    return dest


# One subprocess runs every case in order; each case loads from its own folder (HOSTILE cases first, so the
# control and opt-in cases, which do run a folder's code, come after them). For each case the harness records
# its exception (or None), whether transformers printed its question, and which markers exist after it.
HARNESS = r"""
import contextlib, io, json, sys, traceback
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
import torch

args = json.loads(sys.argv[1])
tmp, folders = Path(args["tmp"]), {k: Path(v) for k, v in args["folders"].items()}

def cots_table():
    p = tmp / "cots.parquet"
    pq.write_table(pa.table({"cot_id": ["c0"], "prompt_ids": [[1, 2, 3]], "completion_ids": [[4, 5, 2]]}), p)
    return p

def calib_table():
    p = tmp / "calib.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3, 4]], "segment": [[0, 0, 1, 1]]}), p)
    return p

def case(name, d):
    from rac.models import loading
    fn = name.split(":", 1)[1]
    if fn == "loading.load_hf_config":
        return loading.load_hf_config(d)
    if fn == "loading.load_tokenizer":
        return loading.load_tokenizer(d)
    if fn == "loading.load_causal_lm":
        return loading.load_causal_lm(d, torch.float32)
    if fn == "templates.load_tokenizer":
        from rac.data.templates import load_tokenizer
        return load_tokenizer(str(d))
    if fn == "streaming.load_config":
        from rac.models.streaming import load_config
        return load_config(d)
    if fn == "engine.compress":
        from rac.engine import CompressConfig, compress
        from rac.pruners import PruneConfig
        return compress(d, tmp / "no-calib.parquet", tmp / "out", CompressConfig(prune=PruneConfig(sparsity=0.5)),
                        tmp / "work")
    if fn == "proxies.load_model":
        from rac.eval.proxies import load_model
        return load_model(d, "float32")
    if fn == "proxies.check_models":
        from rac.eval.proxies import check_models
        return check_models(d, d, [])
    if fn == "proxies.cot_proxies":
        from rac.eval.proxies import ProxyConfig, cot_proxies
        return cot_proxies(d, d, cots_table(), ProxyConfig())
    if fn == "tokerror.token_error_heatmap":
        from rac.eval.tokerror import token_error_heatmap
        return token_error_heatmap(d, d, calib_table(), tmp / "heat.png", n_seqs=1)
    if fn == "engines.TransformersEngine":
        from rac.data.engines import TransformersEngine
        return TransformersEngine(d, [2], 0, dtype="float32")
    if fn == "engines.make_engine":
        from rac.data.engines import make_engine
        return make_engine("transformers", d, eos_ids=[2], pad_id=0, dtype="float32")
    if fn == "generate.open_engine":
        from rac.data.generate import GenerateConfig, open_engine
        return open_engine(GenerateConfig(engine="transformers", dtype="float32"), d)
    if fn == "AutoConfig.from_pretrained":
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(str(d))
    if fn == "streaming.load_config(trust_remote_code=True)":
        from rac.models.streaming import load_config
        return load_config(d, trust_remote_code=True)
    raise KeyError(name)

out = {}
for name in args["cases"]:
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # input() writes its question to sys.stdout
            case(name, folders[name.split(":", 1)[0]])
        err = None
    except BaseException as e:
        err = {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "message": str(e),
               "trace": traceback.format_exc()[-2000:]}
    out[name] = {"error": err, "prompted": args["prompt"] in said.getvalue(),
                 "markers": sorted(k for k, f in folders.items() if (f.parent / f"MARKER-{k}").exists())}
print("\nRESULT " + json.dumps(out))
"""

LOADERS = [
    "loading.load_hf_config", "loading.load_tokenizer", "loading.load_causal_lm", "templates.load_tokenizer",
    "streaming.load_config", "engine.compress", "proxies.load_model", "proxies.check_models",
    "proxies.cot_proxies", "tokerror.token_error_heatmap", "engines.TransformersEngine", "engines.make_engine",
    "generate.open_engine",
]
HOSTILE = [f"hostile:{fn}" for fn in LOADERS]
TOK_OK = ["tok_ok:loading.load_tokenizer", "tok_ok:templates.load_tokenizer"]
CONTROL = "control:AutoConfig.from_pretrained"
OPT_IN = "optin:streaming.load_config(trust_remote_code=True)"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case in one subprocess whose stdin answers "y" to every question; its results plus the folders
    (`hostile`: config and tokenizer need the folder's code; `tok_ok`: only config.json does; `control`,
    `optin`: like hostile) and the subprocess's whole output."""
    tmp = tmp_path_factory.mktemp("remote-code")
    folders = {name: make_evil(tmp / name, tmp / f"MARKER-{name}", tokenizer=name != "tok_ok")
               for name in ("hostile", "tok_ok", "control", "optin")}
    modules = tmp / "hf-modules"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(modules)}
    args = {"tmp": str(tmp), "folders": {k: str(v) for k, v in folders.items()}, "prompt": PROMPT,
            "cases": [*HOSTILE, *TOK_OK, CONTROL, OPT_IN]}
    proc = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(args)], input="y\n" * 200, text=True,
                          capture_output=True, env=env, timeout=600, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"harness failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return {"res": json.loads(lines[-1][len("RESULT "):]), "folders": folders, "modules": modules, "tmp": tmp}


def test_harness_would_accept_a_prompt(harness: dict) -> None:
    """Control: transformers left to its default asks, the harness answers y, and the folder's code runs."""
    r = harness["res"][CONTROL]
    assert r["prompted"] and r["error"] is None and "control" in r["markers"]
    assert "configuration_evil" in (harness["tmp"] / "MARKER-control").read_text()


def test_every_loader_and_stage_refuses_the_folder_code(harness: dict) -> None:
    res, evil = harness["res"], harness["folders"]["hostile"]
    for name in HOSTILE:
        r = res[name]
        assert r["markers"] == [], f"{name}: a folder's own code ran ({r['markers']})"
        assert not r["prompted"], f"{name}: transformers asked whether to run the folder's code"
        err = r["error"]
        assert err is not None, f"{name} loaded the hostile folder"
        assert "RemoteCodeError" in err["mro"] and "ValueError" in err["mro"], f"{name}: {err['trace']}"
        assert str(evil) in err["message"] and "compress.trust_remote_code" in err["message"], name
    # A folder where only config.json needs custom code keeps a tokenizer transformers reads on its own
    # (tokenizer.json + a known tokenizer_class): it loads, and nothing of the folder runs.
    for name in TOK_OK:
        assert res[name]["error"] is None and not res[name]["prompted"], res[name]
        assert res[name]["markers"] == [], name
    # nothing of the hostile folder was copied into transformers' dynamic-module cache
    copied = [p for p in harness["modules"].rglob("*") if "hostile" in str(p)]
    assert not copied, copied


def test_compress_opt_in_flows_to_transformers(harness: dict) -> None:
    """compress.trust_remote_code=True reaches transformers: the code runs, without a question (the
    adapter then refuses the unknown model_type)."""
    r = harness["res"][OPT_IN]
    assert r["error"] is not None and r["error"]["type"] == "UnsupportedArchitectureError", r["error"]
    assert "optin" in r["markers"] and not r["prompted"]
    assert not (harness["tmp"] / "MARKER-hostile").exists()


# ---------------------------------------------------------------- the normal tiny model still loads


def test_tiny_model_loads_through_every_function() -> None:
    from accelerate import init_empty_weights

    from rac.data.engines import TransformersEngine
    from rac.data.templates import load_tokenizer as cached_tokenizer
    from rac.eval.proxies import check_models, load_model
    from rac.models.loading import causal_lm_from_config, load_causal_lm, load_hf_config, load_tokenizer
    from rac.models.streaming import build_skeleton, load_config

    tiny = tiny_model("llama")
    config = load_hf_config(tiny)
    assert config.model_type == "llama" and config.vocab_size == 512
    tok = load_tokenizer(tiny)
    assert tok("hello")["input_ids"] == cached_tokenizer(str(tiny))("hello")["input_ids"]
    model = load_causal_lm(tiny, torch.float32)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    with init_empty_weights(include_buffers=False):
        skel = causal_lm_from_config(config)
    assert next(skel.parameters()).is_meta
    config2, adapter = load_config(tiny)
    assert config2.model_type == "llama" and adapter is not None
    assert next(build_skeleton(config2).parameters()).is_meta
    assert not load_model(tiny, "float32").training
    assert check_models(tiny, tiny, []) == 512
    eng = TransformersEngine(tiny, [2], 0, dtype="float32")
    assert not eng.model.training
    eng.close()


def test_auto_map_with_a_known_model_type_loads_the_library_class(tmp_path: Path) -> None:
    """auto_map next to a model_type transformers knows: its own class is used and the folder's code never runs."""
    from rac.models.loading import load_causal_lm, load_hf_config

    marker = tmp_path / "MARKER"
    folder = make_evil(tmp_path / "m", marker, tokenizer=False, model_type="llama")
    assert type(load_hf_config(folder)).__name__ == "LlamaConfig"
    assert type(load_causal_lm(folder, torch.float32)).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


@pytest.mark.parametrize("fn", ["load_hf_config", "load_tokenizer"])
def test_refusal_names_folder_and_key(tmp_path: Path, fn: str) -> None:
    """In-process too (no stdin at all): the explicit flag means no prompt, one clear ValueError."""
    from rac.models import loading

    marker = tmp_path / "MARKER"
    evil = make_evil(tmp_path / "e", marker)
    with pytest.raises(ValueError, match="compress.trust_remote_code") as info:
        getattr(loading, fn)(evil)
    assert isinstance(info.value, loading.RemoteCodeError) and str(evil) in str(info.value)
    assert not marker.exists()
