"""Chat template styles, fingerprints and the no-template error."""

from __future__ import annotations

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
    a = template_info(tok, TemplateConfig(style="instruct"))
    assert a == template_info(tok, TemplateConfig(style="instruct"))
    assert a["name"] == "instruct"
    assert a["hash"] != template_info(tok, TemplateConfig(style="r1"))["hash"]
    assert a["hash"] != template_info(tok, TemplateConfig(style="instruct", chat_template=QWEN3_LIKE))["hash"]


def test_tokenizer_without_chat_template_is_an_error(tok: Any, tmp_path: Path) -> None:
    bare = load_tokenizer.__wrapped__(str(tiny_model("llama")))
    bare.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template"):
        render_prompt(bare, "Q?", TemplateConfig())
    given = render_prompt(bare, "Q?", TemplateConfig(chat_template=QWEN3_LIKE))
    assert given.startswith("<|im_start|>user\nQ?")


def test_real_qwen_tokenizer_instruct_template() -> None:
    from rac.models.assets import qwen25_coder_05b

    qtok = load_tokenizer(str(qwen25_coder_05b()))
    text = render_prompt(qtok, "What is 1+1?", TemplateConfig(style="instruct"))
    assert "<|im_start|>user\nWhat is 1+1?\nPlease reason step by step" in text
    assert text.endswith("<|im_start|>assistant\n")
