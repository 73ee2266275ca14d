"""Chat templates as users run their models, with a fingerprint so evaluation reuses calibration's.

Styles:
  r1               DeepSeek-R1 usage: no system prompt, the user message ends with R1_INSTRUCTION, and the
                   assistant turn is forced to start with "<think>\\n" (appended when the template lacks it).
  qwen3-think      Qwen3 template rendered with enable_thinking=True.
  qwen3-no-think   Qwen3 template rendered with enable_thinking=False.
  instruct         the tokenizer's own chat template; the user message is question + "\\n" + instruction.

The Jinja template is the tokenizer's own unless `chat_template` is given; a tokenizer without one is a
`TemplateError`. Rendered text is tokenised with add_special_tokens=False: the template already writes
whatever BOS/role tokens the model expects.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from rac.config import StageConfig
from rac.models.loading import load_tokenizer as _load_tokenizer

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
THINK_PREFIX = "<think>\n"
STYLES = ("r1", "qwen3-think", "qwen3-no-think", "instruct")


class TemplateError(ValueError):
    """A chat template is missing or cannot express the requested style."""


class TemplateConfig(StageConfig):
    """How a question becomes the model's prompt text."""

    style: Literal["r1", "qwen3-think", "qwen3-no-think", "instruct"] = "instruct"
    instruction: str = R1_INSTRUCTION
    system: str | None = None
    chat_template: str | None = None


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str | Path) -> Any:
    """The model folder's tokenizer (cached per folder; never runs the folder's own code:
    `rac.models.loading.load_tokenizer` with trust_remote_code=False)."""
    return _load_tokenizer(model_dir, trust_remote_code=False)


def resolve_chat_template(tok: Any, cfg: TemplateConfig) -> str:
    """The Jinja source used for `cfg`: the given override, else the tokenizer's own."""
    if cfg.chat_template is not None:
        return cfg.chat_template
    own = getattr(tok, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        name = getattr(tok, "name_or_path", type(tok).__name__)
        raise TemplateError(
            f"tokenizer {name!r} has no chat template; pass TemplateConfig(chat_template=...) to give one"
        )
    if cfg.style.startswith("qwen3") and "enable_thinking" not in own:
        raise TemplateError(f"style {cfg.style!r} needs a chat template with an enable_thinking switch")
    return str(own)


def template_info(tok: Any, cfg: TemplateConfig) -> dict[str, str]:
    """Name and sha256 of everything that shapes the rendered prompt (Jinja source + style fields)."""
    blob = json.dumps(
        {"jinja": resolve_chat_template(tok, cfg), "style": cfg.style, "instruction": cfg.instruction,
         "system": cfg.system}, sort_keys=True,
    )
    return {"name": cfg.style, "hash": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def render_prompt(tok: Any, question: str, cfg: TemplateConfig) -> str:
    """The prompt text for one question, ending where the model's answer starts."""
    if not question.strip():
        raise ValueError("empty question text")
    jinja = resolve_chat_template(tok, cfg)
    user = f"{question.rstrip()}\n{cfg.instruction}" if cfg.instruction else question
    messages = [{"role": "user", "content": user}]
    if cfg.system is not None and cfg.style != "r1":
        messages.insert(0, {"role": "system", "content": cfg.system})
    extra: dict[str, Any] = {}
    if cfg.style.startswith("qwen3"):
        extra["enable_thinking"] = cfg.style == "qwen3-think"
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=jinja, **extra
    )
    if cfg.style == "r1" and not text.endswith(THINK_PREFIX):
        text += THINK_PREFIX
    return str(text)


def encode_prompt(tok: Any, question: str, cfg: TemplateConfig) -> tuple[str, list[int]]:
    """Rendered prompt text and its token ids (no extra special tokens)."""
    text = render_prompt(tok, question, cfg)
    return text, list(tok(text, add_special_tokens=False)["input_ids"])


def context_window(model_dir: str | Path) -> int:
    """The model's maximum sequence length from config.json (max_position_embeddings)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    if "max_position_embeddings" not in cfg:
        raise ValueError(f"{model_dir}/config.json has no max_position_embeddings")
    return int(cfg["max_position_embeddings"])
