"""Forward-pass quality proxies of a pruned model: CoT likelihood, top-1 agreement, KL, reconstruction error.

On held-out CoTs that the dense model sampled (the `cots/` shards of `rac.data.generate`), with the exact stored
ids (prompt ids + completion ids), every position whose next token is a CoT token is scored:
  NLL          -log q(x_{t+1} | x_{<=t}) in nats, for the pruned model q and, as reference, the dense model p;
  agreement    argmax q == argmax p (top-1 agreement of the next-token prediction);
  KL(p || q)   over the dense top-k tokens plus one bucket for the rest of the vocabulary. Merging tokens never
               raises a KL, so this is a lower bound of the full KL, and equal to it when k >= vocabulary size.
Prompt positions are never scored. Means are per CoT token, pooled over sequences. The dense model runs first
and keeps per-position statistics (argmax, target log-prob, top-k log-probs, tail mass); it is freed before the
pruned model is loaded. Log-probabilities are float32 whatever the model dtype; sums are float64.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from rac.config import StageConfig
from rac.data.generate import read_cots
from rac.data.templates import load_tokenizer
from rac.dtypes import slow_bf16_warning, torch_dtype
from rac.models.loading import load_causal_lm, load_hf_config

COT_COLUMNS = ("cot_id", "prompt_ids", "completion_ids")
LOGIT_CHUNK_ELEMS = 1 << 25  # rows x vocab of one float32 log-prob chunk (128 MiB)
UNSUPPORTED_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class ProxyConfig(StageConfig):
    """How many held-out CoTs, how long, how batched, in which dtype, and the subset seed."""

    n_sequences: int = Field(default=64, ge=1)
    max_tokens: int = Field(default=1024, ge=2)
    batch_size: int = Field(default=4, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    kl_top_k: int = Field(default=64, ge=1)
    bootstrap: int = Field(default=2000, ge=100)  # resamples of sequences for the 95% intervals


@dataclass(frozen=True)
class CotSeq:
    """One scored sequence: ids = prompt + CoT (cut to max_tokens); CoT tokens are ids[prompt_len:]."""

    cot_id: str
    ids: list[int]
    prompt_len: int

    @property
    def n_scored(self) -> int:
        return max(0, len(self.ids) - self.prompt_len)


@dataclass(frozen=True)
class ProxySummary:
    """Per-CoT-token means of the proxies, with what was scored and how."""

    dense_nll: float
    pruned_nll: float
    nll_gap: float
    ppl_ratio: float
    top1_agreement: float
    kl: float
    kl_top_k: int
    n_sequences: int
    n_scored_sequences: int
    n_truncated: int
    n_positions: int
    dtype: str
    config_hash: str
    dense_dir: str
    pruned_dir: str
    cots_path: str
    wall_s: float
    cot_ids: list[str] = field(default_factory=list)
    # [low, high] 95% bootstrap intervals over sequences (ratio of sums, as the point estimates)
    nll_gap_ci: list[float] = field(default_factory=list)
    top1_ci: list[float] = field(default_factory=list)
    kl_ci: list[float] = field(default_factory=list)
    # per sequence, in cot_ids order: n (scored positions) and sums of dense_nll, pruned_nll, agree, kl
    per_sequence: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return asdict(self)


# ---------------------------------------------------------------- inputs


def load_cot_table(path: Path) -> pa.Table:
    """A cots folder (its part-*.parquet shards) or one Parquet file, with the columns proxies need."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"CoT path {path} does not exist")
    table = read_cots(path) if path.is_dir() else pq.read_table(path)
    missing = [c for c in COT_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"CoT table {path} lacks columns {missing} (not written by rac.data.generate?)")
    if table.num_rows == 0:
        raise ValueError(f"CoT table {path} has no rows")
    return table


def select_sequences(table: pa.Table, cfg: ProxyConfig) -> tuple[list[CotSeq], int]:
    """A seeded subset of n_sequences rows (all when fewer), in table order, cut to max_tokens; and how many
    were cut."""
    n = min(cfg.n_sequences, table.num_rows)
    rows = np.arange(table.num_rows)
    if table.num_rows > n:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(table.num_rows, size=n, replace=False))
    sub = table.take(pa.array(rows))
    seqs, n_cut = [], 0
    for cid, prompt, comp in zip(*(sub.column(c).to_pylist() for c in COT_COLUMNS), strict=True):
        if not prompt:
            raise ValueError(f"CoT {cid!r} has an empty prompt: its first CoT token cannot be scored")
        ids = list(prompt) + list(comp)
        n_cut += len(ids) > cfg.max_tokens
        seqs.append(CotSeq(str(cid), ids[: cfg.max_tokens], len(prompt)))
    return seqs, n_cut


def check_models(dense_dir: Path, pruned_dir: Path, seqs: list[CotSeq]) -> int:
    """Both models share one vocabulary (config size and tokenizer) that covers every CoT id; returns its size."""
    sizes = {}
    for d in (dense_dir, pruned_dir):
        conf = load_hf_config(d, trust_remote_code=False)  # ProxyConfig has no trust_remote_code setting
        sizes[str(d)] = int(conf.get_text_config().vocab_size)
        for attr in UNSUPPORTED_HEAD_ATTRS:
            if getattr(conf, attr, None) not in (None, 1, 1.0):
                raise ValueError(f"model {d} sets {attr}={getattr(conf, attr)!r}; proxies apply the plain lm_head")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"vocab size mismatch between models: {sizes}")
    vocabs = []
    for d in (dense_dir, pruned_dir):
        try:
            vocabs.append(load_tokenizer(str(d)).get_vocab())
        except (OSError, ValueError) as e:
            raise ValueError(f"model {d} has no loadable tokenizer: {e}") from e
    if vocabs[0] != vocabs[1]:
        diff = sorted(set(vocabs[0].items()) ^ set(vocabs[1].items()))[:4]
        raise ValueError(f"tokenizer mismatch between {dense_dir} and {pruned_dir}: e.g. {diff}")
    vocab = next(iter(sizes.values()))
    for s in seqs:
        if s.ids and (min(s.ids) < 0 or max(s.ids) >= vocab):
            raise ValueError(f"CoT {s.cot_id!r} has token ids outside [0, {vocab}): {min(s.ids)}..{max(s.ids)}")
    return vocab


# ---------------------------------------------------------------- batching and forward


@dataclass(frozen=True)
class CotBatch:
    """Right-padded ids and mask [B, T]; scored logit positions (rows, cols) [N] and their targets [N]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    seq_index: torch.Tensor  # [B] position of each row's sequence in the input list


def make_batches(seqs: list[CotSeq], batch_size: int, pad_id: int) -> list[CotBatch]:
    """Length-sorted batches of the sequences that have CoT tokens; position t predicts ids[t + 1]."""
    todo = sorted(((j, s) for j, s in enumerate(seqs) if s.n_scored > 0), key=lambda js: -len(js[1].ids))
    out = []
    for i in range(0, len(todo), batch_size):
        index = torch.tensor([j for j, _ in todo[i: i + batch_size]])  # [B]
        group = [s for _, s in todo[i: i + batch_size]]
        width = len(group[0].ids)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros(len(group), width, dtype=torch.long)  # [B, T]
        scored = torch.zeros(len(group), width, dtype=torch.bool)  # [B, T]
        for r, s in enumerate(group):
            ids[r, : len(s.ids)] = torch.tensor(s.ids)
            mask[r, : len(s.ids)] = 1
            scored[r, s.prompt_len - 1: len(s.ids) - 1] = True
        rows, cols = scored.nonzero(as_tuple=True)  # [N], [N]
        out.append(CotBatch(ids, mask, rows, cols, ids[rows, cols + 1], index))
    return out


def load_model(model_dir: Path, dtype: str) -> Any:
    """The causal LM in `dtype`, eval mode, never running the folder's own code (trust_remote_code=False)."""
    slow = slow_bf16_warning(torch_dtype(dtype), "cpu", "proxies.dtype")  # the proxies run on the CPU
    if slow is not None:
        warnings.warn(slow, stacklevel=2)
    return load_causal_lm(model_dir, torch_dtype(dtype), trust_remote_code=False)


def scored_logprobs(model: Any, batch: CotBatch) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """float32 next-token log-probs at the scored positions, chunk by chunk: (log_probs [n, V], targets [n],
    sequence index [n])."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"model {type(model).__name__} has no output embeddings (lm_head)")
    with torch.inference_mode():
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        h = hidden[batch.rows, batch.cols]  # [N, H]
    del hidden
    step = max(1, LOGIT_CHUNK_ELEMS // head.out_features)
    for i in range(0, h.shape[0], step):
        with torch.inference_mode():
            lp = head(h[i: i + step]).float().log_softmax(-1)  # [n, V]
        yield lp, batch.targets[i: i + step], batch.seq_index[batch.rows[i: i + step]]


# ---------------------------------------------------------------- per-position math


def dense_position_stats(lp: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What the pruned pass needs from the dense log-probs lp [n, V]: target NLL [n], argmax [n],
    top-k ids and log-probs [n, k], log of the remaining mass [n] (-inf when k covers V)."""
    top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)  # [n, k]
    return {
        "nll": -lp.gather(1, targets[:, None])[:, 0],
        "argmax": lp.argmax(-1),
        "top_ids": top_ids,
        "top_lp": top_lp,
        "tail_lp": lp.scatter(1, top_ids, float("-inf")).logsumexp(-1),
    }


def coarse_kl(top_ids: torch.Tensor, top_lp: torch.Tensor, tail_lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) [n] over the dense top-k tokens plus one bucket for the rest; lq [n, V] are q's log-probs."""
    lq_top = lq.gather(1, top_ids)  # [n, k]
    lq_tail = lq.scatter(1, top_ids, float("-inf")).logsumexp(-1)  # [n]
    kl_top = (top_lp.exp() * (top_lp - lq_top)).sum(-1)  # [n]
    p_tail = tail_lp.exp()  # [n]
    kl_tail = torch.where(p_tail > 0, p_tail * (tail_lp - lq_tail), torch.zeros_like(p_tail))
    return kl_top + kl_tail


def pruned_position_stats(lq: torch.Tensor, targets: torch.Tensor,
                          dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pruned target NLL [n], argmax agreement with the dense model [n], coarse KL(dense || pruned) [n]."""
    return {
        "nll": -lq.gather(1, targets[:, None])[:, 0],
        "agree": (lq.argmax(-1) == dense["argmax"]).float(),
        "kl": coarse_kl(dense["top_ids"], dense["top_lp"], dense["tail_lp"], lq),
    }


# ---------------------------------------------------------------- passes


def dense_pass(model_dir: Path, batches: list[CotBatch], cfg: ProxyConfig) -> list[dict[str, torch.Tensor]]:
    """Dense statistics per chunk, in batch order; the model is freed (collected) before returning."""
    model = load_model(model_dir, cfg.dtype)
    try:
        return [dense_position_stats(lp, tgt, cfg.kl_top_k) | {"seq": seq}
                for b in batches for lp, tgt, seq in scored_logprobs(model, b)]
    finally:
        del model
        gc.collect()


def pruned_pass(model_dir: Path, batches: list[CotBatch], dense: list[dict[str, torch.Tensor]],
                cfg: ProxyConfig, n_seqs: int) -> dict[str, torch.Tensor]:
    """float64 per-sequence sums [n_seqs] of positions (n), dense and pruned NLL, agreement and KL."""
    model = load_model(model_dir, cfg.dtype)
    sums = {k: torch.zeros(n_seqs, dtype=torch.float64) for k in ("n", "dense_nll", "pruned_nll", "agree", "kl")}
    chunks = iter(dense)
    try:
        for b in batches:
            for lq, tgt, seq in scored_logprobs(model, b):
                d = next(chunks)
                stats = pruned_position_stats(lq, tgt, d)
                for key, vals in (("n", torch.ones_like(d["nll"])), ("dense_nll", d["nll"]),
                                  ("pruned_nll", stats["nll"]), ("agree", stats["agree"]), ("kl", stats["kl"])):
                    sums[key].index_add_(0, seq, vals.double())
    finally:
        del model
    return sums


def ratio_interval(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num) / sum(den), resampling whole sequences."""
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))  # [B, S]
    ratios = num[idx].sum(axis=1) / den[idx].sum(axis=1)  # [B]
    tail = (1.0 - level) / 2.0
    return float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1.0 - tail))


def cot_proxies(dense_dir: Path, pruned_dir: Path, cots_dir_or_path: Path, cfg: ProxyConfig) -> ProxySummary:
    """NLL (pruned and dense), top-1 agreement and coarse KL of `pruned_dir` vs `dense_dir` on the dense
    model's own CoTs (a cots folder or one shard)."""
    t0 = time.perf_counter()
    seqs, n_cut = select_sequences(load_cot_table(cots_dir_or_path), cfg)
    vocab = check_models(Path(dense_dir), Path(pruned_dir), seqs)
    n_pos = sum(s.n_scored for s in seqs)
    if n_pos == 0:
        raise ValueError(f"no CoT tokens to score in {cots_dir_or_path} (empty CoTs, or max_tokens="
                         f"{cfg.max_tokens} leaves none after the prompts)")
    pad = load_tokenizer(str(dense_dir)).pad_token_id
    batches = make_batches(seqs, cfg.batch_size, int(pad) if pad is not None else 0)
    dense = dense_pass(Path(dense_dir), batches, cfg)
    per = {k: v.numpy() for k, v in pruned_pass(Path(pruned_dir), batches, dense, cfg, len(seqs)).items()}
    tot = {k: float(v.sum()) for k, v in per.items()}
    dense_nll, pruned_nll = tot["dense_nll"] / n_pos, tot["pruned_nll"] / n_pos
    sc = {k: v[per["n"] > 0] for k, v in per.items()}  # [S'] only sequences with CoT tokens are resampled
    gap = sc["pruned_nll"] - sc["dense_nll"]
    return ProxySummary(
        dense_nll=dense_nll, pruned_nll=pruned_nll, nll_gap=pruned_nll - dense_nll,
        ppl_ratio=float(np.exp(pruned_nll - dense_nll)), top1_agreement=tot["agree"] / n_pos,
        nll_gap_ci=list(ratio_interval(gap, sc["n"], cfg.bootstrap, cfg.seed)),
        top1_ci=list(ratio_interval(sc["agree"], sc["n"], cfg.bootstrap, cfg.seed)),
        kl_ci=list(ratio_interval(sc["kl"], sc["n"], cfg.bootstrap, cfg.seed)),
        per_sequence={k: v.tolist() for k, v in per.items()},
        kl=tot["kl"] / n_pos, kl_top_k=min(cfg.kl_top_k, vocab), n_sequences=len(seqs),
        n_scored_sequences=sum(s.n_scored > 0 for s in seqs), n_truncated=n_cut, n_positions=n_pos,
        dtype=cfg.dtype, config_hash=cfg.stable_hash(), dense_dir=str(dense_dir), pruned_dir=str(pruned_dir),
        cots_path=str(cots_dir_or_path), wall_s=time.perf_counter() - t0,
        cot_ids=[s.cot_id for s in seqs],
    )
