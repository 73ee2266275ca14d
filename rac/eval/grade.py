"""Answer grading with math-verify: the last \\boxed{...} of a completion against the gold answer.

The prediction is the content of the completion's last \\boxed{} (or \\fbox{}), braces balanced, nested boxes
unwrapped; no boxed answer grades as wrong. The gold answer is wrapped in `$...$` and both are parsed and
compared by math-verify (so 1/2 = 0.5 = \\frac{1}{2} = 50% and 1,000 = 1000). math-verify's own
signal-based timeouts only work in the main thread, so they are switched off (parsing_timeout=None,
timeout_seconds=None) and over-long answers (> MAX_ANSWER_CHARS) are graded wrong instead: grading is safe
inside worker threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

MAX_ANSWER_CHARS = 400
BOX_COMMANDS = ("\\boxed", "\\fbox")

logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" notice, once per call


@dataclass(frozen=True)
class Grade:
    """The extracted prediction (None when no boxed answer) and whether it matches the gold."""

    pred: str | None
    correct: bool


def _braced(text: str, open_at: int) -> str | None:
    """Content of the balanced {...} group whose '{' is at `open_at`; None when unbalanced."""
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1: j]
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}/\\fbox{...} in `text`, with nested boxes unwrapped."""
    best = -1
    for cmd in BOX_COMMANDS:
        best = max(best, text.rfind(cmd + "{"))
    if best < 0:
        return None
    inner = _braced(text, text.index("{", best))
    if inner is None:
        return None
    inner = inner.strip()
    nested = extract_boxed(inner)
    return nested if nested is not None and inner.startswith(BOX_COMMANDS) else inner


def answers_match(pred: str, gold: str) -> bool:
    """math-verify equivalence of a predicted answer and a gold answer (both plain LaTeX/text)."""
    from math_verify import parse, verify

    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    g = parse(f"${gold}$", parsing_timeout=None)  # type: ignore[arg-type]
    p = parse(f"$\\boxed{{{pred}}}$", parsing_timeout=None)  # type: ignore[arg-type]
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def grade(completion: str, gold: str) -> Grade:
    """Grade one completion against a gold answer."""
    pred = extract_boxed(completion)
    if pred is None or not pred:
        return Grade(pred, False)
    return Grade(pred, answers_match(pred, gold))
