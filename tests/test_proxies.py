"""CoT proxies against a per-sequence transformers reference; identity, perturbation, exclusion, bad inputs;
reconstruction error by segment against a hand-computed layer input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from rac.data.generate import COTS_SCHEMA, GenerateConfig, generate_cots, read_cots
from rac.data.prompts import PromptsConfig, sample_prompts
from rac.data.segments import CALIB_META_KEY, CALIB_SCHEMA
from rac.eval.proxies import (
    ProxyConfig,
    cot_proxies,
    dense_position_stats,
    pruned_position_stats,
    ratio_interval,
    select_sequences,
)
from rac.eval.tokerror import token_error_heatmap
from rac.models.assets import tiny_model
from rac.pruners.error import per_token_error

FULL_K = 100_000  # >= vocabulary: the coarse KL is the full KL
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def dense() -> Path:
    """A tiny model with peaked next-token distributions (large init), so perturbations move the argmax."""
    return tiny_model("llama", initializer_range=0.5)


def _pruned_copy(src: Path, out: Path, names: list[str]) -> Path:
    """Copy of `src` with the named tensors magnitude-pruned to 50%."""
    shutil.copytree(src, out)
    sd = load_file(str(out / "model.safetensors"))
    for n in names:
        w = sd[n]
        sd[n] = w * (w.abs() > w.abs().flatten().median())
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def perturbed(dense: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every linear of decoder layer 0 pruned to 50% by magnitude."""
    names = [n for n in load_file(str(dense / "model.safetensors")) if n.startswith("model.layers.0.")
             and n.endswith("proj.weight")]
    assert len(names) == 7
    return _pruned_copy(dense, tmp_path_factory.mktemp("perturbed") / "model", names)


@pytest.fixture(scope="module")
def cots(dense: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dense model's own CoTs: 4 prompts x 2 samples in 2 shards."""
    base = tmp_path_factory.mktemp("cots")
    sample_prompts(PromptsConfig(source="gsm8k", n=4, seed=3), dense, base / "prompts.parquet")
    cfg = GenerateConfig(max_new_tokens=24, shard_size=2, samples_per_prompt=2, dtype="float32")
    generate_cots(base / "prompts.parquet", dense, cfg, base / "cots")
    return base / "cots"


def reference(dense: Path, pruned: Path, rows: list[dict[str, Any]], max_tokens: int) -> dict[str, float]:
    """Per-sequence, unpadded: transformers' label-masked loss for NLL, full-vocabulary argmax and KL."""
    from transformers import AutoModelForCausalLM

    p_model, q_model = (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
                        for d in (dense, pruned))
    tot = {"dense": 0.0, "pruned": 0.0, "agree": 0.0, "kl": 0.0, "n": 0}
    per: dict[str, list[float]] = {}
    for r in rows:
        ids = (r["prompt_ids"] + r["completion_ids"])[:max_tokens]
        n_p, n = len(r["prompt_ids"]), len(ids) - len(r["prompt_ids"])
        if n <= 0:
            continue
        x = torch.tensor([ids])
        labels = x.clone()
        labels[0, :n_p] = -100  # only CoT tokens are targets
        with torch.no_grad():
            p_out, q_out = p_model(x, labels=labels), q_model(x, labels=labels)
        tot["dense"] += float(p_out.loss) * n
        tot["pruned"] += float(q_out.loss) * n
        lp = p_out.logits[0, n_p - 1: len(ids) - 1].log_softmax(-1)  # [n, V]
        lq = q_out.logits[0, n_p - 1: len(ids) - 1].log_softmax(-1)  # [n, V]
        tot["agree"] += float((lp.argmax(-1) == lq.argmax(-1)).sum())
        tot["kl"] += float((lp.exp() * (lp - lq)).sum())
        tot["n"] += n
        per[r["cot_id"]] = [n, float(p_out.loss) * n, float(q_out.loss) * n]
    return {k: v / tot["n"] for k, v in tot.items() if k != "n"} | {"n": tot["n"], "per": per}


def test_proxies_match_a_per_sequence_reference(dense: Path, perturbed: Path, cots: Path) -> None:
    rows = read_cots(cots).to_pylist()
    assert len(rows) == 8 and len({len(r["prompt_ids"]) for r in rows}) > 1  # batches really get padded
    cut = min(len(r["prompt_ids"]) for r in rows) + 5  # some CoTs are truncated
    for max_tokens, batch in ((10_000, 3), (cut, 8)):
        cfg = ProxyConfig(n_sequences=100, max_tokens=max_tokens, batch_size=batch, kl_top_k=FULL_K)
        s = cot_proxies(dense, perturbed, cots, cfg)
        want = reference(dense, perturbed, rows, max_tokens)
        assert s.n_positions == want["n"] and s.n_sequences == 8 and s.kl_top_k == 512
        assert s.dense_nll == pytest.approx(want["dense"], rel=1e-5)
        assert s.pruned_nll == pytest.approx(want["pruned"], rel=1e-5)
        assert s.nll_gap == pytest.approx(want["pruned"] - want["dense"], rel=1e-4, abs=1e-6)
        assert s.top1_agreement == pytest.approx(want["agree"], abs=1e-9)
        assert s.kl == pytest.approx(want["kl"], rel=1e-4)
        got = {c: [s.per_sequence[k][i] for k in ("n", "dense_nll", "pruned_nll")] for i, c in enumerate(s.cot_ids)}
        assert {c for c, v in got.items() if v[0] > 0} == want["per"].keys()  # the rest: no CoT token left
        for c, (n, d, q) in want["per"].items():
            assert got[c][0] == n and got[c][1:] == pytest.approx([d, q], rel=1e-5)
        assert s.nll_gap_ci[0] <= s.nll_gap <= s.nll_gap_ci[1] and s.top1_ci[0] <= s.top1_agreement <= s.top1_ci[1]
    assert s.n_truncated == sum(len(r["prompt_ids"]) + len(r["completion_ids"]) > cut for r in rows)
    assert json.loads(json.dumps(s.as_dict())) == s.as_dict()


def test_identical_models_agree_exactly_also_in_bfloat16(dense: Path, cots: Path) -> None:
    s = cot_proxies(dense, dense, cots, ProxyConfig(batch_size=4, dtype="bfloat16"))
    assert s.top1_agreement == 1.0 and s.nll_gap == pytest.approx(0, abs=1e-7)
    assert s.kl == pytest.approx(0, abs=1e-7) and s.ppl_ratio == pytest.approx(1, abs=1e-7)
    assert s.dtype == "bfloat16"
    want = reference(dense, dense, read_cots(cots).to_pylist(), 10_000)  # float32
    assert s.dense_nll == pytest.approx(want["dense"], rel=3e-2) and s.n_positions == want["n"]


def test_a_perturbed_layer_is_worse(dense: Path, perturbed: Path, cots: Path) -> None:
    s = cot_proxies(dense, perturbed, cots, ProxyConfig(batch_size=2))
    assert s.top1_agreement < 1 and s.pruned_nll > s.dense_nll and s.kl > 0 and s.ppl_ratio > 1


def test_ratio_interval_matches_exact_bootstrap() -> None:
    import itertools

    num, den = np.array([3.0, 1.0, 6.0, 2.0]), np.array([4.0, 2.0, 5.0, 3.0])
    lo, hi = ratio_interval(num, den, n_boot=100_000, seed=2)
    exact = np.array([num[list(ix)].sum() / den[list(ix)].sum() for ix in itertools.product(range(4), repeat=4)])
    assert lo == pytest.approx(np.quantile(exact, 0.025), abs=0.01)
    assert hi == pytest.approx(np.quantile(exact, 0.975), abs=0.01)


def test_coarse_kl_is_a_lower_bound_that_grows_with_k() -> None:
    g = torch.Generator().manual_seed(0)
    lp = (3 * torch.randn(6, 40, generator=g)).log_softmax(-1)  # [n, V]
    lq = (lp + torch.randn(6, 40, generator=g)).log_softmax(-1)  # [n, V]
    full = (lp.exp() * (lp - lq)).sum(-1)  # [n]
    targets = torch.zeros(6, dtype=torch.long)
    kls = []
    for k in (1, 3, 10, 39, 40, 100):
        d = dense_position_stats(lp, targets, k)
        assert d["top_lp"].shape == (6, min(k, 40))
        kls.append(pruned_position_stats(lq, targets, d)["kl"])
    for coarse, fine in zip(kls, kls[1:], strict=False):  # nested partitions: coarser is never larger
        assert torch.all(coarse <= fine + 1e-6)
    for k_index, k in ((0, 1), (2, 10)):  # brute force: top-k tokens + one bucket for the rest
        top = lp.topk(k, -1).indices
        mask = torch.zeros_like(lp, dtype=torch.bool).scatter(1, top, True)
        p_rest, q_rest = lp.exp().masked_fill(mask, 0).sum(-1), lq.exp().masked_fill(mask, 0).sum(-1)
        want = (lp.exp() * (lp - lq)).masked_fill(~mask, 0).sum(-1) + p_rest * (p_rest / q_rest).log()
        torch.testing.assert_close(kls[k_index], want, rtol=1e-4, atol=1e-6)
    for k_index in (4, 5):
        torch.testing.assert_close(kls[k_index], full, rtol=1e-5, atol=1e-6)
    assert torch.all(kls[0] < full)


def test_subset_is_seeded(cots: Path) -> None:
    table = read_cots(cots)
    pick = [[s.cot_id for s in select_sequences(table, ProxyConfig(n_sequences=3, seed=seed))[0]]
            for seed in (5, 5, 6, 7, 8)]
    assert pick[0] == pick[1] and len(set(pick[0])) == 3 and len({tuple(p) for p in pick}) > 1
    order = table.column("cot_id").to_pylist()
    assert all(p == sorted(p, key=order.index) for p in pick)  # table order kept
    every, _ = select_sequences(table, ProxyConfig(n_sequences=100))
    assert [s.cot_id for s in every] == order


def test_empty_cots_contribute_nothing(dense: Path, perturbed: Path, cots: Path, tmp_path: Path) -> None:
    table = read_cots(cots)
    pq.write_table(table, tmp_path / "plain.parquet")
    row = table.slice(0, 1).to_pylist()[0]
    empty = dict(row, cot_id="empty/0", completion_ids=[], completion_len=0, text="")
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist([empty], schema=COTS_SCHEMA)]),
                   tmp_path / "with_empty.parquet")
    cfg = ProxyConfig(n_sequences=100)
    plain = cot_proxies(dense, perturbed, tmp_path / "plain.parquet", cfg)
    extra = cot_proxies(dense, perturbed, tmp_path / "with_empty.parquet", cfg)
    assert extra.n_sequences == plain.n_sequences + 1 and extra.n_scored_sequences == plain.n_scored_sequences
    assert extra.cot_ids == plain.cot_ids + ["empty/0"]
    for key in ("n_positions", "dense_nll", "pruned_nll", "top1_agreement", "kl"):
        assert getattr(extra, key) == getattr(plain, key), key

    pq.write_table(pa.Table.from_pylist([empty], schema=COTS_SCHEMA), tmp_path / "only_empty.parquet")
    with pytest.raises(ValueError, match="no CoT tokens"):
        cot_proxies(dense, perturbed, tmp_path / "only_empty.parquet", cfg)
    with pytest.raises(ValueError, match="max_tokens=2"):
        cot_proxies(dense, perturbed, cots, ProxyConfig(max_tokens=2))


def test_bad_inputs_are_named(dense: Path, cots: Path, tmp_path: Path) -> None:
    cfg = ProxyConfig()
    with pytest.raises(ValueError, match="nowhere"):
        cot_proxies(dense, dense, tmp_path / "nowhere", cfg)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no CoT shards"):
        cot_proxies(dense, dense, tmp_path / "empty_dir", cfg)
    table = read_cots(cots)
    pq.write_table(table.slice(0, 0), tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="none.parquet has no rows"):
        cot_proxies(dense, dense, tmp_path / "none.parquet", cfg)
    pq.write_table(table.drop_columns(["completion_ids"]), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match="completion_ids"):
        cot_proxies(dense, dense, tmp_path / "cols.parquet", cfg)
    bad = dict(table.slice(0, 1).to_pylist()[0], cot_id="bad/0", completion_ids=[3, 9999])
    pq.write_table(pa.Table.from_pylist([bad], schema=COTS_SCHEMA), tmp_path / "ids.parquet")
    with pytest.raises(ValueError, match="'bad/0'.*9999"):
        cot_proxies(dense, dense, tmp_path / "ids.parquet", cfg)

    wide = shutil.copytree(dense, tmp_path / "wide")
    conf = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(conf | {"vocab_size": 640}))
    with pytest.raises(ValueError, match="vocab size mismatch.*640"):
        cot_proxies(dense, wide, cots, cfg)
    other_tok = shutil.copytree(dense, tmp_path / "other_tok")
    for f in tiny_model("llama", seed=1).glob("tokenizer*"):  # same size, different merges/ids
        shutil.copy(f, other_tok / f.name)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        cot_proxies(dense, other_tok, cots, cfg)
    with pytest.raises(ValueError, match="dtype"):
        ProxyConfig(dtype="float16")  # type: ignore[arg-type]


def test_reconstruction_error_by_segment_against_the_layer_input(dense: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    pruned = _pruned_copy(dense, tmp_path / "q_only", [Q_PROJ])
    seqs = [(list(range(5, 35)), [0] * 10 + [1] * 20), (list(range(50, 70)), [0] * 12 + [1] * 8)]
    table = pa.table({"seq_id": [0, 1], "source": ["cot:a/0", "cot:b/0"], "input_ids": [s[0] for s in seqs],
                      "segment": [s[1] for s in seqs]}, schema=CALIB_SCHEMA)
    calib = tmp_path / "calib.parquet"
    pq.write_table(table.replace_schema_metadata({CALIB_META_KEY: json.dumps({"kind": "rac"})}), calib)
    got = token_error_heatmap(dense, pruned, calib, tmp_path / "q.png", n_seqs=2, max_tokens=25)

    model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    w_hat = load_file(str(pruned / "model.safetensors"))[Q_PROJ]
    err: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for ids, seg in seqs:
        ids, seg_t = ids[:25], torch.tensor(seg[:25])
        with torch.no_grad():
            h1 = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1]  # layer 1 input
            x = model.model.layers[1].input_layernorm(h1)[0]  # [T, hidden]
            e = per_token_error(model.model.layers[1].self_attn.q_proj.weight, w_hat, x)  # [T]
        for s in (0, 1):
            err[s].append(e[seg_t == s])
    n_linears, n_layers = 7, 2  # only q_proj of layer 1 differs; every other linear's error is 0
    for s, key in ((0, "prompt_mean"), (1, "decode_mean")):
        assert getattr(got, key) == pytest.approx(float(torch.cat(err[s]).mean()) / n_linears / n_layers, rel=1e-4)
    assert got.n_tokens == 45 and got.layer_prompt_mean[0] == 0 and (tmp_path / "q.png").is_file()
    same = token_error_heatmap(dense, dense, calib, tmp_path / "h.png", n_seqs=1, max_tokens=25)
    assert same.prompt_mean == 0 and same.decode_mean == 0 and (tmp_path / "h.png").exists()
