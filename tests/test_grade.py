"""Answer extraction and math-verify grading, including inside worker threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from rac.eval.grade import MAX_ANSWER_CHARS, answers_match, extract_boxed, grade


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\boxed{7}}", "7"),
        ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("framed \\fbox{3}", "3"),
        ("no box here: 42", None),
        ("unbalanced \\boxed{12", None),
    ],
)
def test_extract_boxed(text: str, want: str | None) -> None:
    assert extract_boxed(text) == want


@pytest.mark.parametrize(
    ("pred", "gold"),
    [("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("50\\%", "0.5"), ("50%", "50"), ("0.5", "\\frac{1}{2}"),
     ("1000", "1,000"), ("18.0", "18"), ("\\$10", "10"), ("2x+1", "1+2x")],
)
def test_known_equivalences(pred: str, gold: str) -> None:
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [("4", "3"), ("0.51", "0.5"), ("x^3", "x^2"), ("-2", "2"), ("\\frac{1}{3}", "0.3"), ("10 dollars", "12")],
)
def test_known_non_equivalences(pred: str, gold: str) -> None:
    assert not answers_match(pred, gold)


def test_grade_whole_completions() -> None:
    assert grade("Step 1 ... so \\boxed{\\boxed{\\frac{1}{2}}}", "0.5").correct
    g = grade("I think it is 5", "5")
    assert g.pred is None and not g.correct
    assert not grade("\\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}", "2").correct


def test_grading_inside_worker_threads() -> None:
    cases = [(f"... \\boxed{{{i}/2}}", str(i / 2), True) for i in range(1, 21)]
    cases += [(f"... \\boxed{{{i}}}", str(i + 1), False) for i in range(20)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: grade(c[0], c[1]).correct, cases))
    assert got == [c[2] for c in cases]
