"""The measuring and reporting pieces of `make bench-peer` / bench.peer_profile, against independent references.

- `heldout_nll` against transformers' own shifted cross-entropy (`labels=` with -100 on unscored positions),
  on the tiny random Llama and a hand-made held-out Parquet;
- `paired_nll_interval` against the direct formula and its bootstrap bounds' basic laws;
- `solver_problem` is seeded (same inputs for both tools) and H = XᵀX is symmetric positive semi-definite;
- `rac_configs`: which rac variants apply to which method, duplicates of another variant's config dropped;
- the profile's phase arithmetic (self time = inclusive minus timed children; phases add up to the total)
  and the py-spy raw-format reader, on hand-written inputs;
- `Meter` / `emit` / `parse`: a real child process reports its result line and its own peak RSS.
No llm-compressor here: it lives in bench/.venv-peer, outside the test environment.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench.peer import rac_configs, rac_label
from bench.peer_data import heldout_nll, paired_nll_interval, solver_problem
from bench.peer_proc import parse
from bench.peer_profile import Timers
from bench.peer_profile_report import phases, self_times, summarize_samples
from rac.data.segments import CALIB_SCHEMA, SEGMENT_IDS
from rac.models.assets import tiny_model

P, D = SEGMENT_IDS["prompt"], SEGMENT_IDS["decode"]


def _heldout(path: Path, seqs: list[tuple[list[int], list[int]]]) -> Path:
    rows = [{"seq_id": i, "source": f"cot:p{i}/0", "input_ids": ids, "segment": seg}
            for i, (ids, seg) in enumerate(seqs)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CALIB_SCHEMA), str(path))
    return path


@pytest.mark.slow
def test_heldout_nll_matches_transformers_cross_entropy(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n_prompt, n_answer in ((5, 9), (3, 4), (7, 12)):
        ids = torch.randint(0, 500, (n_prompt + n_answer,), generator=g).tolist()
        seqs.append((ids, [P] * n_prompt + [D] * n_answer))
    res = heldout_nll(model_dir, _heldout(tmp_path / "h.parquet", seqs))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sums, counts = [], []
    for ids, seg in seqs:
        x = torch.tensor(ids)[None]
        labels = torch.where(torch.tensor(seg)[None] == D, x, torch.full_like(x, -100))
        with torch.no_grad():
            mean = float(model(input_ids=x, labels=labels).loss)  # mean over the scored (answer) targets
        n = sum(1 for s in seg[1:] if s == D)
        sums.append(mean * n)
        counts.append(n)
    assert res["seq_tokens"] == counts == [9, 4, 12]
    assert res["seq_nll_sums"] == pytest.approx(sums, rel=1e-5)
    assert res["nll"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["nll"]), rel=1e-9)


def test_paired_nll_interval() -> None:
    a = {"seq_nll_sums": [2.0, 9.0, 4.0, 1.0], "seq_tokens": [2, 6, 4, 1]}
    b = {"seq_nll_sums": [1.0, 6.0, 4.0, 2.0], "seq_tokens": [2, 6, 4, 1]}
    d, lo, hi = paired_nll_interval(a, b)
    assert d == pytest.approx((16.0 - 13.0) / 13)
    assert lo <= d <= hi
    assert paired_nll_interval(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same held-out sequences"):
        paired_nll_interval(a, {"seq_nll_sums": [1.0, 1.0, 1.0, 1.0], "seq_tokens": [1, 6, 4, 1]})


def test_solver_problem_is_seeded_and_psd() -> None:
    W, H = solver_problem(48, 32, tokens=256, seed=3)
    W2, H2 = solver_problem(48, 32, tokens=256, seed=3)
    assert W.shape == (48, 32) and H.shape == (32, 32)
    assert torch.equal(W, W2) and torch.equal(H, H2)
    assert not torch.equal(H, solver_problem(48, 32, tokens=256, seed=4)[1])
    assert torch.allclose(H, H.T, rtol=1e-5, atol=1e-4 * float(H.abs().max()))
    assert float(torch.linalg.eigvalsh(H.double()).min()) > -1e-6 * float(H.abs().max())


def test_rac_configs_apply_and_dedupe() -> None:
    sgpt = rac_configs("sgpt50", ["default", "matrix", "row", "layer"])
    names = [v for v, _ in sgpt]
    assert names[0] == "default" and "layer" in names  # matrix or row equals the default: dropped, not repeated
    assert len(names) == 3 and len({json.dumps(c.canonical(), sort_keys=True) for _, c in sgpt}) == 3
    assert {c.prune.scope for _, c in sgpt} == {"row", "matrix"}
    assert dict(sgpt)["layer"].sequential == "layer"
    assert all(c.compute_dtype == "float32" and c.act_dtype == "float32" for _, c in sgpt)
    assert [v for v, _ in rac_configs("sgpt24", ["default", "matrix"])] == ["default"]  # no scope for N:M
    assert [v for v, _ in rac_configs("wanda50", ["default", "matrix"])] == ["default"]
    assert len(rac_configs("sgpt50", ["default", "default"])) == 1
    assert "2:4" in rac_label(dict(rac_configs("sgpt24", ["default"]))["default"])


def test_phases_add_up_to_the_total() -> None:
    timers = Timers()
    leaf = timers.wrap("HessianAccumulator.add", lambda: sum(range(20000)))
    fwd = timers.wrap("layer_forward", lambda: (leaf(), sum(range(50000))))
    stats = timers.wrap("stats_pass", lambda: [fwd() for _ in range(3)])
    timers.wrap("compress", lambda: (stats(), sum(range(30000))))()
    t = timers.as_json()
    assert t["compress/stats_pass/layer_forward"]["calls"] == 3
    selfs = self_times(t)
    inner = t["compress/stats_pass/layer_forward/HessianAccumulator.add"]["wall_s"]
    assert selfs["compress/stats_pass/layer_forward"]["wall_s"] == pytest.approx(
        t["compress/stats_pass/layer_forward"]["wall_s"] - inner)
    named = dict(phases(t))
    assert "statistics forward (layer compute up to the last hooked linear)" in named
    assert sum(v["wall_s"] for v in named.values()) == pytest.approx(t["compress"]["wall_s"])


def test_summarize_samples_reads_pyspy_raw(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "main (x.py:1);stats_pass (/s/rac/engine/layer.py:10);add (/s/rac/pruners/stats.py:5);"
        "at::native::addmm (libtorch_cpu.so) 7\n"
        "main (x.py:1);stats_pass (/s/rac/engine/layer.py:10);__memset_avx2 (libc.so.6) 2\n"
        "main (x.py:1);<module> (torch/__init__.py:4) 1\n")
    s = summarize_samples(raw, ("rac/",), 10)
    assert s["total"] == 10
    inner = dict(s["innermost"])
    assert inner == {"rac/pruners/stats.py:add": 7, "rac/engine/layer.py:stats_pass": 2,
                     "(outside the package: imports, startup)": 1}
    libs = dict(s["leaf_libs"])
    assert libs["torch CPU kernels (libtorch_cpu: GEMM, elementwise, linalg)"] == 7
    assert libs["Python code (interpreted frames)"] == 1
    assert sum(libs.values()) == 10


def test_child_result_line_and_peak_rss() -> None:
    code = ("from bench.peer_proc import Meter, emit\nm = Meter(); m.start()\n"
            "x = bytearray(64 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])\nemit(m.result(answer=42))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    res = parse("noise\n" + out)
    assert res["answer"] == 42
    assert res["peak_rss_mb"] - res["baseline_rss_mb"] >= 60  # the 64 MiB it touched
    assert res["usage"]["minor_faults"] >= 64 * 1024 // 4 * 0.9  # one fault per 4 KiB page, about
    with pytest.raises(ValueError, match="no result line"):
        parse(json.dumps({"a": 1}))
