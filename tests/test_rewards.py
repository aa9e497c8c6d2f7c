"""The math_dapo reward: what counts as the answer, how it is normalised, and that hostile text stays text."""

import builtins
import time

import numpy as np
import pytest

from dapo_jax.rewards import TAIL_CHARS, compute_score, extract_answer, normalize_final_answer

CORRECT = [  # (response, ground truth, normalised prediction)
    pytest.param("Answer: 42", "42", "42", id="plain-integer"),
    pytest.param("Let me add them.\n20 + 22 = 42\nAnswer: 42", "42", "42", id="after-reasoning"),
    pytest.param("Answer: 42 dollars", "42", "42", id="unit-dollars"),
    pytest.param("Answer: 5 cm", "5", "5", id="unit-cm"),
    pytest.param("Answer: 3 hours", "3", "3", id="unit-hours"),
    pytest.param("Answer: 12 square feet", "12", "12", id="unit-square-feet"),
    pytest.param(r"Answer: 5 \text{ cm}^2", "5", "5", id="unit-in-text-squared"),
    pytest.param(r"Answer: 90^\circ", "90", "90", id="degree-sign"),
    pytest.param(r"Answer: \$42", "42", "42", id="escaped-dollar-sign"),
    pytest.param("Answer: 1,000", "1000", "1000", id="thousands-separator"),
    pytest.param("Answer: 12,345,678", "12345678", "12345678", id="millions-separators"),
    pytest.param("Answer: 12345678", "12,345,678", "12345678", id="separators-in-ground-truth"),
    pytest.param("Answer: 1{,}000", "1000", "1000", id="latex-thousands-separator"),
    pytest.param("Answer: $42$", "42", "42", id="inline-math"),
    pytest.param("Answer: $42.$", "42", "42", id="period-inside-math"),
    pytest.param(r"Answer: \boxed{42}", "42", "42", id="boxed"),
    pytest.param(r"Answer: $\boxed{42}$", "42", "42", id="boxed-in-math"),
    pytest.param(r"Answer: \text{42}", "42", "42", id="text"),
    pytest.param(r"Answer: \textbf{7}", "7", "7", id="textbf"),
    pytest.param(r"Answer: \frac12", r"\frac{1}{2}", r"\frac{1}{2}", id="frac-shorthand"),
    pytest.param(r"Answer: \frac1{2}", r"\frac{1}{2}", r"\frac{1}{2}", id="frac-first-half-shorthand"),
    pytest.param(r"Answer: \frac{1}2", r"\frac12", r"\frac{1}{2}", id="frac-second-half-shorthand"),
    pytest.param(r"Answer: \sqrt2", r"\sqrt{2}", r"\sqrt{2}", id="sqrt-shorthand"),
    pytest.param(r"Answer: 3\sqrt2", r"3\sqrt{2}", r"3\sqrt{2}", id="sqrt-with-coefficient"),
    pytest.param("Answer: x = 5", "5", "5", id="after-equals"),
    pytest.param("Answer: x = 2 + 3 = 5", "5", "5", id="after-last-equals"),
    pytest.param("Answer: -7", "-7", "-7", id="negative"),
    pytest.param("Answer: -1,000", "-1000", "-1000", id="negative-with-separator"),
    pytest.param("Answer: 3.14", "3.14", "3.14", id="decimal"),
    pytest.param("Answer:   42   ", "42", "42", id="surrounding-spaces"),
    pytest.param("Answer: 42\r\n", "42", "42", id="windows-line-end"),
    pytest.param("Answer:\n42", "42", "42", id="value-on-the-next-line"),
    pytest.param("answer: 7", "7", "7", id="lower-case"),
    pytest.param("ANSWER : 7", "7", "7", id="upper-case-space-before-colon"),
    pytest.param("AnSwEr:7", "7", "7", id="mixed-case-no-space"),
    pytest.param("Final Answer: 7", "7", "7", id="prefixed-label"),
]


@pytest.mark.parametrize("response, ground_truth, pred", CORRECT)
def test_correct_answer_scores_plus_one(response, ground_truth, pred):
    assert compute_score(response, ground_truth) == {"score": 1.0, "acc": True, "pred": pred}


WRONG = [  # (response, ground truth, normalised prediction)
    pytest.param("Answer: 41", "42", "41", id="different-integer"),
    pytest.param("Answer: -42", "42", "-42", id="sign-matters"),
    pytest.param("Answer: 2+2", "4", "2+2", id="arithmetic-is-not-evaluated"),
    pytest.param("Answer: 4.20", "4.2", "4.20", id="compared-as-strings"),
    pytest.param("Answer: 42.", "42", "42.", id="trailing-period-kept-as-in-reference"),
    pytest.param("Answer: (1,2)", "12", "(1,2)", id="tuple-commas-kept"),
]


@pytest.mark.parametrize("response, ground_truth, pred", WRONG)
def test_wrong_answer_scores_minus_one(response, ground_truth, pred):
    assert compute_score(response, ground_truth) == {"score": -1.0, "acc": False, "pred": pred}


INVALID = {"score": -1.0, "acc": False, "pred": "[INVALID]"}


def test_no_answer_line_is_invalid():
    assert compute_score("I think it is 42.", "42") == INVALID


def test_no_answer_line_is_invalid_even_for_the_ground_truth_invalid():
    assert compute_score("no label here", "[INVALID]") == INVALID


def test_boxed_answer_without_answer_line_is_invalid():
    assert compute_score(r"So the result is \boxed{42}.", "42") == INVALID


def test_the_last_answer_line_wins():
    response = "Answer: 41\nWait, I dropped a carry.\nAnswer: 42"
    assert compute_score(response, "42")["acc"]
    assert not compute_score(response, "41")["acc"]


def test_an_empty_last_answer_label_is_skipped():
    assert compute_score("Answer: 42\nAnswer:", "42")["acc"]


def test_answer_line_before_the_last_300_characters_is_ignored():
    assert compute_score("Answer: 42\n" + "x" * TAIL_CHARS, "42") == INVALID


@pytest.mark.parametrize("padding, acc", [(289, True), (290, False)],
                         ids=["label-inside-window", "label-cut-by-window"])
def test_window_is_exactly_the_last_300_characters(padding, acc):
    response = "Answer: 42\n" + "." * padding  # 11 + 289 = 300 characters: the label is just inside
    assert TAIL_CHARS == 300
    assert compute_score(response, "42")["acc"] is acc


def test_extract_answer_returns_the_raw_text_to_the_end_of_the_line():
    assert extract_answer("so\nAnswer: \\boxed{42}  \nthanks") == "\\boxed{42}  "


def test_extract_answer_returns_none_without_a_label():
    assert extract_answer("the answer is 42") is None


def test_two_labels_on_one_line_are_one_match_as_in_the_reference():
    assert extract_answer("Answer: 5 Answer: 7") == "5 Answer: 7"


NORMALISED = [  # (raw answer, normalised form)
    pytest.param("a = b = 7", "7", id="text-after-last-equals"),
    pytest.param("42\n", "42", id="trailing-newline"),
    pytest.param("5cm", "5", id="unit-glued-to-number"),
    pytest.param(r"5\ cm", "5", id="unit-after-escaped-space"),
    pytest.param(r"\sigma", r"\sigma", id="gm-inside-sigma-kept"),
    pytest.param("always", "always", id="ways-inside-word-kept"),
    pytest.param("acme", "acme", id="cm-inside-word-kept"),
    pytest.param("x squared", "xsquared", id="square-inside-word-kept"),
    pytest.param(r"\tan x", r"\tanx", id="an-inside-tan-kept"),
    pytest.param("a triangle", "triangle", id="article-removed"),
    pytest.param(r"5\text{ m}", "5", id="metre-in-text"),
    pytest.param(r"5\mathrm{th}", "5", id="ordinal-suffix"),
    pytest.param(r"90^{\circ}", "90", id="braced-degree-sign"),
    pytest.param('"42"', "42", id="double-quotes"),
    pytest.param(r"\$1,000 dollars", "1000", id="currency-separator-and-unit"),
    pytest.param("The answer is $42$ indeed", "42", id="only-the-math-span-kept"),
    pytest.param(r"\mbox{5}", "5", id="mbox"),
    pytest.param(r"\text{\textbf{5}}", "5", id="nested-text-wrappers"),
    pytest.param(r"\overline{142857}", "142857", id="overline"),
    pytest.param(r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", id="boxed-keeps-inner-braces"),
    pytest.param(r"-\boxed{4}", "-4", id="text-before-boxed-kept"),
    pytest.param(r"x \text{ and } y", "x,y", id="text-and-becomes-comma"),
    pytest.param(r"x, \text{and} y", "x,y", id="comma-text-and-becomes-one-comma"),
    pytest.param(r"5\ldots", "5", id="ldots"),
    pytest.param(r"5\dots", "5", id="dots"),
    pytest.param(r"\dfrac34", r"\dfrac{3}{4}", id="dfrac-shorthand"),
    pytest.param(r"\frac\pi2", r"\frac{\pi}{2}", id="frac-command-argument"),
    pytest.param(r"\sqrt\pi", r"\sqrt{\pi}", id="sqrt-command-argument"),
    pytest.param(r"\sqrt[3]{8}", r"\sqrt[3]{8}", id="cube-root-kept"),
    pytest.param("1,234.5", "1234.5", id="separator-in-decimal"),
    pytest.param("(1,2)", "(1,2)", id="tuple-kept"),
]


@pytest.mark.parametrize("raw, normalised", NORMALISED)
def test_normalize_final_answer(raw, normalised):
    assert normalize_final_answer(raw) == normalised


UNICODE = [  # (response, normalised prediction, correct for ground truth 42)
    pytest.param("Let me think 🤔🤔\nAnswer: 42", "42", True, id="emoji-before"),
    pytest.param("الجواب هو\nAnswer: 42", "42", True, id="arabic-before"),
    pytest.param("Answer: 42 🎉", "42🎉", False, id="emoji-on-answer-line"),
    pytest.param("Answer: ４２", "４２", False, id="full-width-digits-are-text"),
    pytest.param("Answer: \u200f42\u200f", "\u200f42\u200f", False, id="rtl-marks-are-text"),
    pytest.param("Answer: \ud800", "\ud800", False, id="lone-surrogate"),
]


@pytest.mark.parametrize("response, pred, acc", UNICODE)
def test_unicode_is_scored_as_text(response, pred, acc):
    assert compute_score(response, "42") == {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


def test_full_width_colon_is_not_a_label():
    assert compute_score("Answer：42", "42") == INVALID


@pytest.fixture
def no_eval(monkeypatch):
    """Make any use of eval or exec during scoring fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reward must never evaluate model output")
    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)


PAYLOADS = [
    pytest.param("__import__('os').system('touch {marker}')", id="python-import"),
    pytest.param("exec(\"open('{marker}', 'w')\")", id="exec"),
    pytest.param("eval(\"open('{marker}', 'w')\")", id="eval"),
    pytest.param("`touch {marker}`", id="backticks"),
    pytest.param("$(touch {marker})", id="shell-substitution"),
    pytest.param("{{{{7*7}}}}", id="template-injection"),
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_in_the_answer_is_a_wrong_answer_and_never_runs(payload, tmp_path, no_eval):
    marker = tmp_path / "pwned"
    result = compute_score("Answer: " + payload.format(marker=marker), "49")
    assert result["score"] == -1.0 and result["acc"] is False
    assert not marker.exists()


def test_code_in_both_answer_and_ground_truth_is_compared_as_text(tmp_path, no_eval):
    code = f"__import__('os').system('touch {tmp_path / 'pwned'}')"
    assert compute_score("Answer: " + code, code)["acc"]
    assert not (tmp_path / "pwned").exists()


def seconds(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def test_a_10_mb_response_scores_in_milliseconds():
    response = "x" * 10_000_000 + "\nAnswer: 42"
    elapsed, result = seconds(compute_score, response, "42")
    assert result["acc"]
    assert elapsed < 0.05, f"{elapsed * 1e3:.1f} ms"


def test_a_million_answer_labels_score_in_milliseconds():
    elapsed, result = seconds(compute_score, "Answer:" * 1_000_000, "42")
    assert result["score"] == -1.0
    assert elapsed < 0.05, f"{elapsed * 1e3:.1f} ms"


def test_a_million_answer_lines_score_in_milliseconds():
    elapsed, result = seconds(compute_score, "Answer: 1\n" * 1_000_000 + "Answer: 42", "42")
    assert result["acc"]
    assert elapsed < 0.05, f"{elapsed * 1e3:.1f} ms"


def test_deeply_nested_boxes_are_unwrapped_once_in_linear_time():
    depth = 100_000
    elapsed, result = seconds(normalize_final_answer, "\\boxed{" * depth + "42" + "}" * depth)
    assert result == "\\boxed{" * (depth - 1) + "42" + "}" * (depth - 1)  # greedy, one level, as the reference
    assert elapsed < 0.5, f"{elapsed * 1e3:.1f} ms"


@pytest.mark.parametrize("raw", ["{" * 100_000 + "}" * 100_000, "\\text{" * 100_000, "\\frac{" * 100_000,
                                 "\\sqrt\\" * 100_000, "$" * 100_000 + "x"],
                         ids=["balanced-braces", "unclosed-text", "unclosed-frac", "sqrt-of-backslash", "dollars"])
def test_pathological_latex_normalises_in_linear_time(raw):
    elapsed, _ = seconds(normalize_final_answer, raw)
    assert elapsed < 0.5, f"{elapsed * 1e3:.1f} ms"


def test_long_runs_of_digits_and_commas_normalise_in_linear_time():
    elapsed, result = seconds(normalize_final_answer, "1," * 100_000 + "1")
    assert result == "1" * 100_001
    assert elapsed < 0.5, f"{elapsed * 1e3:.1f} ms"


@pytest.mark.parametrize("ground_truth", [42, np.int64(42)], ids=["int", "numpy-int64"])
def test_integer_ground_truth_is_accepted(ground_truth):
    assert compute_score("Answer: 42", ground_truth) == {"score": 1.0, "acc": True, "pred": "42"}


@pytest.mark.parametrize("ground_truth", [42.0, True, None, b"42", ["42"]],
                         ids=["float", "bool", "none", "bytes", "list"])
def test_other_ground_truth_types_raise(ground_truth):
    with pytest.raises(TypeError, match="ground_truth must be a str or an int"):
        compute_score("Answer: 42", ground_truth)


@pytest.mark.parametrize("solution", [b"Answer: 42", None, 42], ids=["bytes", "none", "int"])
def test_non_text_solution_raises(solution):
    with pytest.raises(TypeError, match="solution must be a str"):
        compute_score(solution, "42")
