"""The built-in arithmetic task: right answers, set difficulty, disjoint splits, DAPO's row layout."""

import random
import re

import pytest

from dapo_jax.data import synthetic
from dapo_jax.data.synthetic import SyntheticTask
from dapo_jax.rewards import compute_score

STEP = re.compile(r"^(-?\d+)([+*-])(\d+)=(-?\d+)$")


def check_solution(problem):
    """Every worked step is right arithmetic (parsed, never evaluated) and chains into the answer."""
    *steps, last = problem.solution.split("\n")
    value = None
    for step in steps:
        a, op, b, c = STEP.match(step).groups()
        a, b, c = int(a), int(b), int(c)
        assert value is None or a == value
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
        value = c
    assert last == f"Answer: {problem.answer}" and value == problem.answer
    return len(steps)


def test_solutions_are_right_and_score_full_reward():
    task = SyntheticTask(min_ops=1, max_ops=4)
    rng = random.Random(0)
    for _ in range(300):
        problem = synthetic.make_problem(rng, task)
        assert check_solution(problem) == problem.num_ops
        assert compute_score(problem.solution, str(problem.answer)) == {"score": 1.0, "acc": True,
                                                                        "pred": str(problem.answer)}


def test_difficulty_settings_are_respected():
    task = SyntheticTask(min_ops=2, max_ops=3, max_operand=9, operators="+-")
    rng = random.Random(1)
    problems = [synthetic.make_problem(rng, task) for _ in range(200)]
    assert {p.num_ops for p in problems} == {2, 3}
    operands = [int(x) for p in problems for x in re.findall(r"\d+", p.expression)]
    assert max(operands) <= 9 and min(operands) >= 1 and all("*" not in p.expression for p in problems)


def test_more_operations_mean_longer_worked_solutions():
    short = [synthetic.make_problem(random.Random(i), SyntheticTask(min_ops=1, max_ops=1)) for i in range(50)]
    long = [synthetic.make_problem(random.Random(i), SyntheticTask(min_ops=6, max_ops=6)) for i in range(50)]
    assert min(len(p.solution) for p in long) > max(len(p.solution) for p in short)


def test_train_and_eval_splits_never_overlap():
    task = SyntheticTask()
    train = {r["prompt"][0]["content"] for r in synthetic.rows(task, "train", 3000, seed=0)}
    evaluation = {r["prompt"][0]["content"] for r in synthetic.rows(task, "eval", 300, seed=5)}
    assert len(train) == 3000 and len(evaluation) == 300 and not train & evaluation


def test_the_eval_bucket_holds_its_share_of_problems():
    task = SyntheticTask(eval_fraction=0.1)
    rng = random.Random(2)
    expressions = {synthetic.make_problem(rng, task).expression for _ in range(5000)}
    share = sum(synthetic.in_eval_split(e, 0.1) for e in expressions) / len(expressions)
    assert 0.08 < share < 0.12


def test_same_seed_same_rows_and_new_seed_new_rows():
    task = SyntheticTask()
    assert synthetic.rows(task, "train", 20, seed=3) == synthetic.rows(task, "train", 20, seed=3)
    assert synthetic.rows(task, "train", 20, seed=3) != synthetic.rows(task, "train", 20, seed=4)


def test_rows_have_the_dapo_math_layout():
    row = synthetic.rows(SyntheticTask(), "eval", 1)[0]
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith(synthetic.INSTRUCTION)
    assert row["reward_model"]["style"] == "rule" and row["reward_model"]["ground_truth"].lstrip("-").isdigit()
    assert row["extra_info"]["split"] == "eval" and row["extra_info"]["index"] == 0


def test_asking_for_more_distinct_problems_than_exist_says_so():
    tiny = SyntheticTask(min_ops=1, max_ops=1, max_operand=2, operators="+")  # 4 problems in all
    with pytest.raises(ValueError, match="fewer than 10 distinct problems"):
        synthetic.rows(tiny, "train", 10)
    assert len(synthetic.rows(tiny, "train", 10, unique=False)) == 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_ops=0), "min_ops"), (dict(min_ops=3, max_ops=2), "min_ops"), (dict(max_operand=1), "max_operand"),
    (dict(operators="/"), "operators"), (dict(eval_fraction=1.0), "eval_fraction"),
])
def test_bad_task_settings_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticTask(**kwargs)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        next(synthetic.problems(SyntheticTask(), "test"))
