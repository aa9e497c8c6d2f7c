"""A built-in math task with integer answers, so the embedded default needs no download.

A problem is a chain of operations applied left to right, written with explicit parentheses:

    ((7 + 5) * 3) - 4          worked solution:  7+5=12 / 12*3=36 / 36-4=32 / Answer: 32

Difficulty is set by the number of operations (min_ops..max_ops), the operand range and the
operators; the worked solution, and so the answer a model has to write, grows with the number of
operations. Rows come in DAPO-Math-17k's layout (data_source, prompt as chat messages, ability,
reward_model {ground_truth, style}, extra_info), so the same pipeline reads both.

Train and evaluation splits are disjoint by construction: a problem belongs to the evaluation split
when a hash of its text falls in the evaluation bucket, and each split only ever yields its own
problems, whatever the seed or the number drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator

DATA_SOURCE = "synthetic_arithmetic"
INSTRUCTION = "Work it out step by step; end with 'Answer: <integer>'."
_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    min_ops: int = 1
    max_ops: int = 3
    max_operand: int = 20
    operators: str = "+-*"
    eval_fraction: float = 0.1  # share of the problem space reserved for evaluation
    instruction: str = INSTRUCTION  # the text before the expression ("" for the bare expression)

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, max_ops={self.max_ops}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand={self.max_operand} must be >= 2")
        unknown = set(self.operators) - set(_OPERATORS)
        if not self.operators or unknown:
            raise ValueError(f"operators={self.operators!r}: use a non-empty subset of '+-*'")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class Problem:
    expression: str
    answer: int
    solution: str  # the worked steps and the final `Answer:` line (for supervised warm-up)
    num_ops: int


def make_problem(rng: random.Random, task: SyntheticTask) -> Problem:
    num_ops = rng.randint(task.min_ops, task.max_ops)
    value = rng.randint(1, task.max_operand)
    expression, steps = str(value), []
    for _ in range(num_ops):
        op, operand = rng.choice(task.operators), rng.randint(1, task.max_operand)
        result = _OPERATORS[op](value, operand)
        steps.append(f"{value}{op}{operand}={result}")
        expression, value = f"({expression} {op} {operand})", result
    expression = expression[1:-1]  # the outermost parentheses say nothing
    return Problem(expression, value, "\n".join(steps + [f"Answer: {value}"]), num_ops)


def in_eval_split(expression: str, eval_fraction: float) -> bool:
    """Whether a problem belongs to the evaluation split (a stable hash of its text)."""
    digest = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big")
    return digest / 2**64 < eval_fraction


def problems(task: SyntheticTask, split: str, seed: int = 0) -> Iterator[Problem]:
    """An endless stream of the split's problems, the same for the same seed."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: use 'train' or 'eval'")
    rng = random.Random(f"{seed}/{split}")
    want_eval = split == "eval"
    while True:
        problem = make_problem(rng, task)
        if in_eval_split(problem.expression, task.eval_fraction) == want_eval:
            yield problem


def to_row(problem: Problem, index: int, split: str, instruction: str = INSTRUCTION) -> dict:
    """A row in DAPO-Math-17k's layout."""
    content = f"{instruction}\n{problem.expression}" if instruction else problem.expression
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": content}],
        "ability": "MATH",
        "reward_model": {"ground_truth": str(problem.answer), "style": "rule"},
        "extra_info": {"index": index, "split": split, "num_ops": problem.num_ops, "solution": problem.solution},
    }


def rows(task: SyntheticTask, split: str, n: int, seed: int = 0, unique: bool = True) -> list[dict]:
    """n rows of the split (distinct problems unless unique=False)."""
    out, seen = [], set()
    stream = problems(task, split, seed)
    attempts = 0
    while len(out) < n:
        problem = next(stream)
        attempts += 1
        if unique and problem.expression in seen:
            if attempts > 100 * n + 10_000:
                raise ValueError(f"the {split} split of {task} has fewer than {n} distinct problems; "
                                 f"raise max_ops or max_operand, or ask for fewer rows")
            continue
        seen.add(problem.expression)
        out.append(to_row(problem, len(out), split, task.instruction))
    return out
