"""Preflight: check everything a run will read before anything is written, failing fast in one line.

`preflight(cfg, work_dir)` runs, in order:
  1. the model folder: it resolves, config.json is readable JSON, its model_type has an adapter, every
     safetensors shard is present and complete (`WeightFiles`, plus: size == 8 + header + largest offset);
  2. the tokenizer loads and every prompts template renders (a chat template of the tokenizer or the config);
  3. the prompt sources of `prompts` and `eval.prompts`, loaded and selected by the prompt stage's own
     functions: readable, mapped columns present, rows left, no empty question, and (eval) no empty gold answer;
  4. every calibration's `token_budget` (and a `rac` set's `decode_share`) against the most the run can give it
     (`check_calibrations`), from the selected prompts templated and tokenised as `sample_prompts` does them;
  5. a 4-bit model evaluated by engine 'vllm' has vLLM's W4A16 kernel on this machine;
  6. the work dir (or its nearest existing parent) takes a probe file, removed again, and has room for the
     activation stores plus one pruned model copy per job (`check_disk`).
The first problem found raises `PreflightError` (a ValueError) with a one-line message naming the bad value
and what to do. Nothing is created: the only write is the probe file, always removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NoReturn

import pyarrow as pa

from rac.data.calib import CalibConfig, generic_texts
from rac.data.engines import vllm_w4a16_missing
from rac.data.generate import GenerateConfig, build_requests
from rac.data.prompts import PromptsConfig, select_prompts
from rac.data.sources import EmptySourceError, MissingColumnError, Record, load_records
from rac.data.templates import (
    TemplateConfig,
    TemplateError,
    context_window,
    encode_prompt,
    load_tokenizer,
    render_prompt,
)
from rac.dtypes import TORCH_DTYPES
from rac.models.adapters import ADAPTERS, UnsupportedArchitectureError, get_adapter
from rac.models.streaming import ShardError, WeightFiles, safetensors_header
from rac.runs.run_config import RunConfig
from rac.runs.session import resolve_model_dir

PROBE_QUESTION = "What is 1 + 1?"
SHORTFALL = 10  # a calibration whose data gives less than 1/SHORTFALL of its token_budget is refused


class PreflightError(ValueError):
    """A run input (model folder, tokenizer, prompt source, work dir) that the run would fail on."""


def _fail(message: str) -> NoReturn:
    raise PreflightError("preflight: " + " ".join(message.split()))


def _size(n: int) -> str:
    unit, scale = next(((u, k) for u, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= k), ("B", 1))
    return f"{n} B" if scale == 1 else f"{n / scale:.2f} {unit}"


def preflight(cfg: RunConfig, work_dir: Path) -> None:
    """Validate everything `cfg` will read and where it writes; PreflightError on the first problem."""
    folder, config = check_model(cfg.model)
    shard_bytes = check_weights(folder)
    templates = [("prompts.template", cfg.prompts.template)]
    if cfg.eval_prompts is not None:
        templates.append(("eval.prompts.template", cfg.eval_prompts.template))
    check_tokenizer(folder, templates)
    chosen = check_prompts("prompts", cfg.prompts, gold=False)
    if cfg.eval_prompts is not None:
        check_prompts("eval.prompts", cfg.eval_prompts, gold=True)
    check_calibrations(cfg, folder, chosen)
    check_serving(cfg)
    base = check_writable(Path(work_dir))
    check_disk(cfg, Path(work_dir), base, _hidden_size(folder, config), shard_bytes)


def check_model(model: str) -> tuple[Path, dict[str, Any]]:
    """The resolved model folder and its config.json; the model type must have an adapter."""
    try:
        folder = resolve_model_dir(model)
    except (OSError, ValueError) as exc:
        _fail(f"model = {model!r}: {exc}; give a shipped alias, a Hugging Face model folder or a hub id owner/name[@revision]")
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _fail(f"model config {str(path)!r} is not readable JSON ({exc}); re-download or re-save the model folder")
    if not isinstance(config, dict):
        _fail(f"model config {str(path)!r} is not a JSON object; re-download or re-save the model folder")
    model_type = config.get("model_type")
    try:
        get_adapter(str(model_type))
    except UnsupportedArchitectureError:
        _fail(f"model config {str(path)!r}: model_type {model_type!r} is not supported; supported model types: "
              f"{sorted(ADAPTERS)}; use a model of one of these families (or add an ADAPTERS row)")
    return folder, config


def _hidden_size(folder: Path, config: dict[str, Any]) -> int:
    hidden = config.get("text_config", config).get("hidden_size")
    if not isinstance(hidden, int) or hidden < 1:
        _fail(f"model config {str(folder / 'config.json')!r}: hidden_size = {hidden!r} is not a positive integer")
    return hidden


def check_weights(folder: Path) -> int:
    """Every shard present, with a valid header and a complete data section; returns their total size."""
    try:
        files = WeightFiles(folder)
    except ShardError as exc:
        for shard in sorted(folder.glob("*.safetensors")):
            check_shard_size(shard)  # a truncated data section gets the clearer message
        _fail(f"model weights: {exc}; re-download or re-save the model folder")
    shards = sorted({folder / name for name in files.weight_map.values()})
    for shard in shards:
        check_shard_size(shard)
    return sum(s.stat().st_size for s in shards)


def check_shard_size(path: Path) -> None:
    """A safetensors file's size must equal 8 + header length + the largest data offset of its tensors."""
    try:
        header = safetensors_header(path)
        entries = json.loads(header[8:])
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ShardError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        _fail(f"model weight shard {str(path)!r} has no valid safetensors header ({exc}); re-download or re-save it")
    expected, actual = len(header) + end, path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        _fail(f"model weight shard {str(path)!r} is {what}: {actual} bytes on disk, its header needs {expected} "
              f"(8 + {len(header) - 8} header + {end} data); re-download or re-save the model folder")


def check_tokenizer(folder: Path, templates: list[tuple[str, TemplateConfig]]) -> None:
    """The tokenizer loads and each (config key, template) renders a prompt."""
    try:
        tok = load_tokenizer(str(folder))
    except Exception as exc:  # transformers/tokenizers raise many types for a broken tokenizer
        _fail(f"model {str(folder)!r}: tokenizer does not load ({type(exc).__name__}: {exc}); "
              "re-download the tokenizer files (tokenizer.json, tokenizer_config.json)")
    for key, template in templates:
        try:
            render_prompt(tok, PROBE_QUESTION, template)
        except TemplateError as exc:
            if template.chat_template is None and "has no chat template" in str(exc):
                _fail(f"{key}: the tokenizer of {str(folder)!r} has no chat template and {key}.chat_template is "
                      f"not set; set {key}.chat_template (Jinja) in the run config or use a model folder that "
                      "ships one (chat_template.jinja)")
            _fail(f"{key}: {exc}; set {key}.chat_template or change {key}.style")
        except Exception as exc:  # a bad Jinja source
            _fail(f"{key}: the chat template does not render ({type(exc).__name__}: {exc}); fix "
                  f"{key}.chat_template or the model folder's chat template")


def _where(key: str, pc: PromptsConfig) -> str:
    return f"{key}.path = {pc.path!r}" if pc.path else f"{key}.source = {pc.source!r}"


def _load(key: str, pc: PromptsConfig, gold: bool) -> list[Record]:
    """The records the prompt stage will load (`load_records`, same arguments as `sample_prompts`)."""
    where = _where(key, pc)
    try:
        return load_records(pc.source, path=pc.path, split=pc.split, fmt=pc.fmt, question_col=pc.question_col,
                            answer_col=pc.answer_col, id_col=pc.id_col, group_col=pc.group_col, variants=pc.variants,
                            seed=pc.seed, keep_original=pc.keep_original)
    except MissingColumnError as exc:
        attr = next((a for a in ("question_col", "id_col", "group_col")
                     if getattr(pc, a) is not None and f"column {getattr(pc, a)!r}" in str(exc)), "question_col")
        _fail(f"{where}: {exc}; set {key}.{attr} to one of the available columns")
    except EmptySourceError as exc:
        _fail(f"{where}: {exc}; point {key} at a source with rows")
    except Exception as exc:  # unreadable file / URL / dataset: OSError, Arrow and JSON errors, datasets errors
        _fail(f"{where}: cannot read the prompt source ({type(exc).__name__}: {exc}); fix {key}.source/path/fmt")


def check_prompts(key: str, pc: PromptsConfig, gold: bool) -> list[Record]:
    """The prompts the stage will select (returned): rows left, unique ids, questions and (gold) answers
    non-empty."""
    where = _where(key, pc)
    records = _load(key, pc, gold)
    try:
        chosen = select_prompts(records, pc)
    except EmptySourceError as exc:
        _fail(f"{where}: {exc}; change {key}.holdout/eval_fraction/exclude_from or use a larger source")
    except (OSError, ValueError) as exc:
        _fail(f"{key}.exclude_from = {list(pc.exclude_from)}: not readable prompts files ({exc})")
    ids = [r.problem_id for r in chosen]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        _fail(f"{where}: duplicate problem id {dup!r}; set {key}.id_col to a column of unique ids")
    no_question = [r.problem_id for r in chosen if not r.question.strip()]
    if no_question:
        _fail(f"{where}: {len(no_question)} of {len(chosen)} questions (column {pc.question_col!r}) are empty "
              f"(first: {no_question[0]!r}); fill them or set {key}.question_col")
    no_answer = [r.problem_id for r in chosen if not r.answer.strip()]
    if gold and no_answer:
        _fail(f"{where}: {len(no_answer)} of {len(chosen)} gold answers (column {pc.answer_col!r}) are empty "
              f"(first: {no_answer[0]!r}), so grading would score them 0; fill them or set {key}.answer_col")
    return chosen


def check_calibrations(cfg: RunConfig, folder: Path, chosen: list[Record]) -> None:
    """Every calibration's `token_budget` against an upper bound of what the run's real data can give it.

    The rule follows `build_calibration`, which packs what its source holds and, when that runs out before
    the budget, records the set as `exhausted` instead of failing: falling short is allowed by design (the
    shipped configs give the prompt-only set the budget of the RAC set and it runs out first, at 14-32% of
    it; tiny.yaml's RAC set gets about 36%, so a "half the budget" rule would refuse every shipped config).
    Refused are therefore:
      * what the stage would fail on: a `rac` set with no sequence (every prompt at or over its max_seq_len:
        a CoT is never cut from its prompt) or whose decode share stays under min_decode_share even with every
        CoT at its cap (DecodeShareError); a prompt over its limit (the prompt stage's PromptTooLongError);
      * a `rac` budget that the run's own generate.token_budget makes unreachable (two budgets of one run
        contradicting each other, not a source running out);
      * a budget over SHORTFALL (10) times the bound: a budget left at its 1,000,000 default, a forgotten
        prompts.n, a typo; the set would silently be a small fraction of what was asked.
    Bounds, from the selected prompts templated and tokenised as `sample_prompts` does it:
      prompt   the sum over the prompts of min(prompt tokens, max_seq_len);
      rac      over the CoT stage's requests (`build_requests`: every prompt x samples_per_prompt, each capped at
               min(max_new_tokens, context window - prompt)), the sum of min(prompt + cap, max_seq_len), prompts
               of max_seq_len tokens or more left out; with generate.token_budget = B (which counts the prompt
               and CoT tokens of every row written and is checked before each shard) at most B - 1 + the
               largest shard's sum; with decode_share d, D = floor(d x budget + 1/2) decode tokens must not exceed
               those of every CoT at its cap, nor budget - D the prompt tokens x samples_per_prompt (`_check_mix`);
      generic  the bundled Lee corpus tokenised (one EOS per article), only when a generic set is configured;
      self     none: it samples until its budget is covered.
    """
    kinds = {c.kind for c in cfg.calibrations.values()}
    ids = _prompt_ids(cfg.prompts, folder, chosen) if kinds & {"prompt", "rac"} else []
    corpus = _generic_tokens(folder) if "generic" in kinds else (0, 0)
    for name, calib in cfg.calibrations.items():
        key, budget, L = f"calibrations.{name}", calib.token_budget, calib.max_seq_len
        lower = f"lower {key}.token_budget"
        if calib.kind == "prompt":
            bound = sum(min(len(x), L) for x in ids)
            if bound * SHORTFALL < budget:
                _fail(f"{key}: token_budget = {budget} but the {len(ids)} prompts the prompt stage will select "
                      f"({_where('prompts', cfg.prompts)}) hold at most {bound} tokens (each cut to max_seq_len = "
                      f"{L}), under 1/{SHORTFALL} of the budget; {_more_prompts(cfg.prompts, len(ids))} or {lower} "
                      f"to at most {bound}")
        elif calib.kind == "rac" and cfg.generate is not None:
            _check_rac(key, calib, cfg.generate, cfg.prompts, ids, context_window(folder))
        elif calib.kind == "generic" and corpus[0] * SHORTFALL < budget:
            _fail(f"{key}: token_budget = {budget} but the bundled generic corpus (gensim's Lee corpus, "
                  f"{corpus[1]} articles) is {corpus[0]} tokens with this tokenizer, under 1/{SHORTFALL} of the "
                  f"budget; {lower} to at most {corpus[0]} or use kind: rac or prompt")
        # kind self: unconditional samples are drawn until the budget is covered (rac.data.calib._self_seqs)


def _more_prompts(pc: PromptsConfig, n: int) -> str:
    if pc.n is not None and pc.n <= n:
        return "raise prompts.n"
    return f"use a larger prompt source or raise prompts.variants (all {n} selectable prompts are used)"


def _prompt_ids(pc: PromptsConfig, folder: Path, chosen: list[Record]) -> list[list[int]]:
    """The token ids `sample_prompts` will write for the chosen records; its PromptTooLongError refused."""
    tok = load_tokenizer(str(folder))
    try:
        limit = pc.max_prompt_tokens or context_window(folder)
    except (OSError, ValueError) as exc:
        _fail(f"model {str(folder)!r}: no context window ({exc}); set max_position_embeddings in its config.json")
    out = []
    for r in chosen:
        ids = encode_prompt(tok, r.question, pc.template)[1]
        if len(ids) >= limit:
            what, fix = ((f"prompts.max_prompt_tokens = {limit}", "raise prompts.max_prompt_tokens")
                         if pc.max_prompt_tokens else
                         (f"the model's context window is {limit}", "use a model with a longer context"))
            _fail(f"{_where('prompts', pc)}: prompt {r.problem_id!r} has {len(ids)} tokens and {what}, so the "
                  f"prompt stage would refuse it; {fix} or drop the problem from the source")
        out.append(ids)
    return out


def _generic_tokens(folder: Path) -> tuple[int, int]:
    """(tokens, articles) of the generic corpus as `rac.data.calib._generic` streams it."""
    try:
        texts = generic_texts()
    except (ImportError, OSError) as exc:  # importlib.metadata.PackageNotFoundError is an ImportError
        _fail(f"the generic calibration corpus ships in the gensim wheel and cannot be read ({exc}); install "
              "gensim or use kind: rac or prompt")
    tokens = load_tokenizer(str(folder))(texts, add_special_tokens=False)["input_ids"]
    return sum(len(t) + 1 for t in tokens), len(texts)


def _check_rac(key: str, calib: CalibConfig, gen: GenerateConfig, pc: PromptsConfig, ids: list[list[int]],
               ctx: int) -> None:
    """A `rac` set against the CoT stage's requests (see `check_calibrations`)."""
    budget, L = calib.token_budget, calib.max_seq_len
    table = pa.table({"prompt_id": [str(i) for i in range(len(ids))], "input_ids": ids})
    try:
        reqs = [r for _, _, r in build_requests(table, gen, ctx)]
    except ValueError as exc:  # PromptTooLongError: prompts.max_prompt_tokens above the context window
        _fail(f"{_where('prompts', pc)}: {exc}; lower prompts.max_prompt_tokens below the context window")
    lens = [(len(r.prompt_ids), min(len(r.prompt_ids) + r.max_new_tokens, L)) for r in reqs]
    per = [n if p < L else 0 for p, n in lens]
    if not any(per):
        shortest = min(p for p, _ in lens)
        _fail(f"{key}: every one of the {len(ids)} prompts has at least max_seq_len = {L} tokens (shortest: "
              f"{shortest}), so the set would hold no sequence (a CoT is never cut from its prompt); raise "
              f"{key}.max_seq_len above {shortest}")
    share = max((n - p) / n for p, n in lens if p < L)
    if share < calib.min_decode_share:
        _fail(f"{key}: min_decode_share = {calib.min_decode_share} cannot be met: even with every CoT at its cap "
              f"(generate.max_new_tokens = {gen.max_new_tokens}, cut to max_seq_len = {L}) the decode share is at "
              f"most {share:.3f}; raise generate.max_new_tokens or lower {key}.min_decode_share")
    if calib.decode_share is not None:
        _check_mix(key, calib, pc, ids, [(p, n) for p, n in lens if p < L], gen.samples_per_prompt)
    full, step = sum(per), gen.shard_size * gen.samples_per_prompt
    lower = f"lower {key}.token_budget to at most"
    if gen.token_budget is not None:
        capped = gen.token_budget - 1 + max(sum(per[i: i + step]) for i in range(0, len(per), step))
        if capped < min(full, budget):
            _fail(f"{key}: token_budget = {budget} but generate.token_budget = {gen.token_budget} stops the CoT "
                  f"stage after at most {capped} calibration tokens (it counts the prompt and CoT tokens of every "
                  f"sample and is checked between shards of {step}); raise generate.token_budget to at least "
                  f"{budget} (or null: every prompt, at most {full} tokens) or {lower} {capped}")
    if full * SHORTFALL < budget:
        _fail(f"{key}: token_budget = {budget} but the CoT stage can give it at most {full} tokens ({len(ids)} "
              f"prompts x generate.samples_per_prompt = {gen.samples_per_prompt}, each prompt + at most "
              f"generate.max_new_tokens = {gen.max_new_tokens} CoT tokens, cut to max_seq_len = {L}), under "
              f"1/{SHORTFALL} of the budget; {_more_prompts(pc, len(ids))}, raise generate.samples_per_prompt or "
              f"generate.max_new_tokens, or {lower} {full}")


def _check_mix(key: str, calib: CalibConfig, pc: PromptsConfig, ids: list[list[int]], lens: list[tuple[int, int]],
               samples: int) -> None:
    """A `decode_share` set (`rac.data.calib._mix`) against the most decode tokens (every CoT at its cap) and
    prompt tokens (every prompt x samples_per_prompt, cut to max_seq_len) the run can give it."""
    budget, L, share = calib.token_budget, calib.max_seq_len, float(calib.decode_share or 0.0)
    n_decode = math.floor(share * budget + 0.5)
    decode, prompt = sum(n - p for p, n in lens), samples * sum(min(len(x), L) for x in ids)
    if decode < n_decode:
        _fail(f"{key}: decode_share = {share} needs {n_decode} decode tokens of token_budget = {budget} but even with "
              f"every CoT at its cap the CoT stage gives at most {decode} ({len(lens)} CoTs, cut to max_seq_len = "
              f"{L}); raise generate.max_new_tokens or generate.samples_per_prompt, or lower {key}.decode_share")
    if prompt < budget - n_decode:
        _fail(f"{key}: decode_share = {share} leaves {budget - n_decode} prompt tokens of token_budget = {budget} but "
              f"the {len(ids)} prompts hold at most {prompt} ({_where('prompts', pc)}, cut to max_seq_len = {L}); "
              f"{_more_prompts(pc, len(ids))}, raise {key}.decode_share or lower {key}.token_budget")


def check_serving(cfg: RunConfig) -> None:
    """Every 4-bit model that engine 'vllm' evaluates needs vLLM's W4A16 kernel here (`vllm_w4a16_missing`)."""
    four = [j.label for j in cfg.jobs if cfg.evaluates(j) and (q := j.compress.prune.quant) is not None and q.bits == 4]
    if four and cfg.eval is not None and cfg.eval.generation.engine == "vllm" and (reason := vllm_w4a16_missing()):
        _fail(f"eval of {four} (eval.generation.engine = 'vllm'): {reason}; or leave them out of eval_pruned")


def _existing(work_dir: Path) -> Path:
    """The work dir if it exists, else its nearest existing parent (where the run will create it)."""
    path = work_dir.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        _fail(f"work dir {str(work_dir)!r}: {str(path)!r} is not a folder; choose another --work-dir")
    return path


def check_writable(work_dir: Path) -> Path:
    """Create and remove a probe file in the work dir (or its nearest existing parent); returns that folder."""
    base = _existing(work_dir)
    probe = base / f".rac-preflight-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        _fail(f"work dir {str(work_dir)!r}: cannot write in {str(base)!r} ({exc.strerror or exc}); choose a "
              "writable --work-dir (or $RAC_WORK_DIR)")
    try:
        os.write(fd, b"rac")
    except OSError as exc:  # e.g. a full file system
        _fail(f"work dir {str(work_dir)!r}: cannot write in {str(base)!r} ({exc.strerror or exc}); free space "
              "or choose another --work-dir")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return base


def check_disk(cfg: RunConfig, work_dir: Path, base: Path, hidden: int, shard_bytes: int) -> None:
    """Free space >= the largest job's two activation stores + one pruned model copy per job and per
    progressive step (rough)."""
    stores = max(cfg.calibrations[j.calibration].token_budget * hidden * TORCH_DTYPES[j.compress.act_dtype].itemsize
                 * 2 for j in cfg.jobs)
    n_models = sum(1 + len(p.steps) if (p := cfg.calibrations[j.calibration].progressive) else 1 for j in cfg.jobs)
    models = shard_bytes * n_models
    free = shutil.disk_usage(base).free
    if free < stores + models:
        _fail(f"work dir {str(work_dir)!r}: {_size(free)} free on {str(base)!r}, the run needs about "
              f"{_size(stores + models)}: activation stores {_size(stores)} (calibration tokens x hidden {hidden} "
              f"x act_dtype bytes x 2 stores) + pruned models {_size(models)} ({n_models} x "
              f"{_size(shard_bytes)}); free space or choose another --work-dir")
