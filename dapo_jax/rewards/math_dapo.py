"""The DAPO rule-based math reward: +1 if the last `Answer:` line equals the ground truth, else -1.

Behaviour follows verl's `math_dapo` scorer (the DAPO recipe's reward), written afresh:

    tail   = response[-TAIL_CHARS:]                      only the end of the response is read
    raw    = last match of  (?i)Answer\\s*:\\s*([^\\n]+)   in tail ("[INVALID]" if none)
    score  = +1.0 if normalize(raw) == normalize(ground_truth) else -1.0

The response is untrusted model output. Nothing here evaluates it (no eval, exec or sympy); the answer
is compared as a string, so "2+2" does not equal "4". Every step is linear in the input length, so a
10 MB response or a ground truth full of braces costs milliseconds.

Deliberate differences from the reference, all on inputs where the reference corrupts an answer:
- filler and unit words ("cm", "ways", "a ", ...) are removed only as whole words, where the reference
  removes them anywhere ("\\sigma" lost its "gm", "always" its "ways", "\\tan x" its "an ");
- `\\frac` and `\\sqrt` shorthand: a braced argument is kept and a \\command is one argument, so
  "\\frac1{2}" and "\\frac{1}2" become "\\frac{1}{2}", "\\frac\\pi2" becomes "\\frac{\\pi}{2}" and
  "\\sqrt[3]{8}" is kept (the reference gives "\\frac{1}{{}2}", "\\frac{1}2", "\\frac{\\}{p}i2", "\\sqrt{[}3]{8}");
- thousands separators are also dropped from signed and decimal numbers ("-1,000", "1,234.5");
- the text is treated as one line (the reference's `$...$`, `\\text{}` and `\\boxed{}` patterns stop
  at a newline; a ground truth is a single line in practice and a prediction always is);
- a response with no `Answer:` line is never correct (the reference would count it as correct for a
  ground truth that normalises to the literal string "[INVALID]").
Like the reference, full-width digits, emoji and direction marks are kept as text: "Answer: ４２"
does not equal 42, and "Answer: 42." does not equal 42 (only ".$" is fixed).
"""

from __future__ import annotations

import numbers
import re

TAIL_CHARS = 300  # the reference reads this much; the longest MATH-500 answer has 159 characters
INVALID = "[INVALID]"

_ANSWER = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)

# Units and filler, and the articles "a " and "an ", removed only as whole words: not glued to a letter
# on either side, nor part of a \command ("5cm" loses its unit, "\sigma" keeps its "gm").
_FILLER_WORDS = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "sue", "points",
                 "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
                 "students", "childrentickets", "multiples")
_FILLER = re.compile(r"(?<![A-Za-z\\])(?:an? |(?:" + "|".join(_FILLER_WORDS) + r")(?![A-Za-z]))")

# (before, after) literal rewrites, applied in order once the words are gone.
_SUBSTITUTIONS = ((".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("\\mbox{", "\\text{"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))

# Literal tokens deleted in order ("\ldots" before "\dots", "\text{s}" before "\text{}").
_REMOVED_TOKENS = ("\\ldots", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
                   "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots")

# One TeX argument: a flat braced group, a whole \command, or a single other character. The lookahead
# makes the command alternative fail at once instead of retrying shorter names.
_TEX_ARG = r"(\{[^{}]*\}|\\[A-Za-z]+(?![A-Za-z])|[^{}\\])"
_FRAC = re.compile(r"(\\[dt]?frac)" + _TEX_ARG + _TEX_ARG)
_SQRT = re.compile(r"\\sqrt(\\[A-Za-z]+(?![A-Za-z])|[^{}\\\[])")


def _braced(arg: str) -> str:
    return arg if arg.startswith("{") else "{" + arg + "}"


def _unwrap_to_first_brace(text: str, opening: str) -> str:
    """Replace every `opening` + X + "}" by X, X ending at the first "}" (a lazy match).

    A loop of `find`s rather than a regex: when no "}" follows, a regex would rescan the rest of the
    text from every later opening (quadratic); here the scan stops, since none can close either.
    """
    pieces, start = [], 0
    while (i := text.find(opening, start)) >= 0 and (j := text.find("}", i + len(opening))) >= 0:
        pieces += [text[start:i], text[i + len(opening):j]]
        start = j + 1
    return "".join(pieces) + text[start:]


def _drop_thousands_commas(text: str) -> str:
    """Drop commas from a number written with separators ("12,345", "-1,000", "1,234.5").

    Anything else keeps its commas: "(1,2)" is a tuple. Like the reference, a bare "1,2" becomes "12".
    """
    unsigned = text[1:] if text[:1] in "+-" else text
    whole, dot, fraction = unsigned.partition(".")
    if whole.replace(",", "").isdigit() and (not dot or fraction.isdigit()):
        return text.replace(",", "")
    return text


def normalize_final_answer(answer: str) -> str:
    """Canonical string form of a final answer, so that "x = \\$1,000 dollars" and "1000" compare equal."""
    answer = answer.split("=")[-1]
    answer = _FILLER.sub("", answer)  # before spaces go, while words still have their boundaries
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for token in _REMOVED_TOKENS:
        answer = answer.replace(token, "")

    first = answer.find("$")
    second = answer.find("$", first + 1) if first >= 0 else -1
    if second >= 0:  # keep only the first $...$ math span
        answer = answer[first + 1:second]
    for opening in ("\\text{", "\\textbf{", "\\overline{"):
        answer = _unwrap_to_first_brace(answer, opening)
    box, close = answer.find("\\boxed{"), answer.rfind("}")
    if box >= 0 and close >= box + len("\\boxed{"):  # \boxed{ runs to the last "}" (a greedy match)
        answer = answer[:box] + answer[box + len("\\boxed{"):close] + answer[close + 1:]

    answer = _FRAC.sub(lambda m: m[1] + _braced(m[2]) + _braced(m[3]), answer)
    answer = _SQRT.sub(lambda m: "\\sqrt{" + m[1] + "}", answer)
    answer = answer.replace("$", "").strip()
    return _drop_thousands_commas(answer)


def extract_answer(text: str) -> str | None:
    """The raw text of the last `Answer:` match in `text` (to the end of its line), or None.

    Matches do not overlap, as with `re.findall`: "Answer: 5 Answer: 7" on one line is one match,
    "5 Answer: 7". `\\s*` may cross newlines, so a bare "Answer:" takes the next non-empty line.
    """
    last = None
    for last in _ANSWER.finditer(text):
        pass
    return last[1] if last is not None else None


def _as_text(value, name: str, allow_int: bool) -> str:
    if isinstance(value, str):
        return value
    if allow_int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(value)  # some datasets store the integer answer as a number
    expected = "a str or an int" if allow_int else "a str (decode token ids or bytes first)"
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}: {value!r:.80}")


def compute_score(solution: str, ground_truth: str) -> dict:
    """Score one response: {"score": +1.0 or -1.0, "acc": bool, "pred": normalised prediction}.

    `pred` is "[INVALID]" when the last TAIL_CHARS characters of `solution` hold no `Answer:` line.
    `ground_truth` may also be an int.
    """
    solution = _as_text(solution, "solution", allow_int=False)
    ground_truth = _as_text(ground_truth, "ground_truth", allow_int=True)
    raw = extract_answer(solution[-TAIL_CHARS:])
    if raw is None:
        return {"score": -1.0, "acc": False, "pred": INVALID}
    pred = normalize_final_answer(raw)
    acc = pred == normalize_final_answer(ground_truth)
    return {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}
