"""The only place rac asks transformers to load a config, a tokenizer or a causal LM.

A model folder may ship its own Python code (``auto_map`` in config.json or tokenizer_config.json, typically
with a ``model_type`` transformers does not know). Left to its default (``trust_remote_code=None``),
transformers then asks on stdin whether to run that code, and an answer of ``y`` imports it. Every function
here passes ``trust_remote_code`` explicitly, False unless the caller says otherwise, so transformers never
prompts; a folder that cannot be loaded without its own code raises `RemoteCodeError` (a ValueError) naming
the folder and the run-config key that allows it.

Only the compress stage has such a key (`REMOTE_CODE_KEY`, `CompressConfig.trust_remote_code`); the prompt,
generation, calibration, evaluation, proxy and heatmap stages always load with ``trust_remote_code=False``.
transformers is imported inside each function: importing this module stays cheap.

Building a model is serialised process-wide (`BUILD_LOCK`). transformers' `from_pretrained` / `from_config`
(`no_init_weights`, `no_tie_weights`) and accelerate's `init_empty_weights` patch class attributes
(`PreTrainedModel.init_weights` / `tie_weights`, `nn.Module.register_parameter`) and put back what they found
on exit. Two threads building at once (the thread runner's generation workers, concurrent stages) can put
back each other's patch: every later model of the process then loads with its tied LM head neither tied nor
initialised (measured: NaN logits). Every build in rac holds the lock, so it never sees another's patch.
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

REMOTE_CODE_KEY = "compress.trust_remote_code"
BUILD_LOCK = threading.RLock()  # held by every model build (module docstring); re-entrant for nested builds


class RemoteCodeError(ValueError):
    """A model folder needs its own Python code to load, and running it was not allowed."""


def _refused(folder: str | Path, what: str, exc: ValueError) -> RemoteCodeError:
    return RemoteCodeError(
        f"model folder {str(folder)!r} needs its own Python code to load its {what} (auto_map in config.json "
        f"or tokenizer_config.json); rac does not run a folder's code unless told to. Set "
        f"`{REMOTE_CODE_KEY}: true` in the run config to allow it for the compress stage (the other stages "
        f"have no such setting and never run it), or use a folder whose model_type transformers knows. "
        f"transformers said: {str(exc).strip().splitlines()[0]}"
    )


def _needs_remote_code(exc: ValueError) -> bool:
    """transformers' refusal (`resolve_trust_remote_code`) ends by asking for trust_remote_code=True."""
    return "trust_remote_code" in str(exc)


def load_hf_config(folder: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The folder's HF config (`AutoConfig`); `RemoteCodeError` if it needs code that is not allowed."""
    from transformers import AutoConfig

    trust = bool(trust_remote_code)
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust)
    except ValueError as exc:
        if not trust and _needs_remote_code(exc):
            raise _refused(folder, "config", exc) from None
        raise


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False, *, gguf_file: str | None = None) -> Any:
    """The folder's tokenizer (`AutoTokenizer`, uncached; `rac.data.templates.load_tokenizer` caches it).
    `gguf_file`: read it from that GGUF file in the folder instead."""
    from transformers import AutoTokenizer

    trust = bool(trust_remote_code)
    extra: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust, **extra)
    except ValueError as exc:
        if not trust and _needs_remote_code(exc):
            raise _refused(folder, "tokenizer", exc) from None
        raise


def load_causal_lm(folder: str | Path, dtype: torch.dtype, trust_remote_code: bool = False, *,
                   gguf_file: str | None = None) -> PreTrainedModel:
    """The folder's `*ForCausalLM` with real weights in `dtype`, in eval mode. `gguf_file`: dequantise that
    GGUF file in the folder instead. A compressed-tensors (quantized) folder is decompressed at load: every
    linear holds exactly the weights the folder serves (q * scale), as a plain nn.Linear."""
    from transformers import AutoModelForCausalLM

    trust = bool(trust_remote_code)
    extra: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    if gguf_file is None and _compressed_tensors(Path(folder)):
        from transformers import CompressedTensorsConfig

        extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        with BUILD_LOCK, warnings.catch_warnings():  # "the model's own quantization_config is used": ours is run_compressed
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust, **extra)
    except ValueError as exc:
        if not trust and _needs_remote_code(exc):
            raise _refused(folder, "model", exc) from None
        raise
    model.eval()
    return model


def _compressed_tensors(folder: Path) -> bool:
    """Whether the folder's config.json says compressed-tensors quantization."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def causal_lm_from_config(config: PretrainedConfig, dtype: torch.dtype | None = None,
                          trust_remote_code: bool = False) -> PreTrainedModel:
    """A freshly initialised `*ForCausalLM` for `config` (no weights read; call it under
    `accelerate.init_empty_weights` for a meta skeleton)."""
    from transformers import AutoModelForCausalLM

    trust = bool(trust_remote_code)
    extra: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    try:
        with BUILD_LOCK:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust, **extra)
    except ValueError as exc:
        if not trust and _needs_remote_code(exc):
            raise _refused(getattr(config, "name_or_path", "") or type(config).__name__, "model", exc) from None
        raise
