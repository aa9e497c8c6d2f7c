"""Dynamic sampling: which groups are trained on, the carry-over buffer, the generation-batch limit."""

import itertools

import pytest

from dapo_jax import dynamic_sampling
from dapo_jax.data.datasets import PromptRecord
from dapo_jax.rollout import Group

_uid = itertools.count()


def group(accs):
    uid = str(next(_uid))
    record = PromptRecord((1, 2), "7", "test", uid, f"test:{uid}")
    n = len(accs)
    return Group(record, [[5, 6]] * n, [[0.0, 0.0]] * n, ["x"] * n, [1.0 if a else -1.0 for a in accs],
                 [1.0 if a else -1.0 for a in accs], list(accs), ["7" if a else "3" for a in accs], [False] * n)


def drawer(batches):
    """draw(i) returning the given generation batches in order, recording the indices asked for."""
    it = iter(batches)
    calls = []

    def draw(index):
        assert index == len(calls)  # the step's generation batches are numbered 0, 1, ...
        calls.append(index)
        return next(it)
    return draw, calls


def test_all_correct_and_all_wrong_groups_are_never_trained_on():
    mixed = [group([1, 0]), group([0, 1])]
    draw, _ = drawer([[group([1, 1]), mixed[0], group([0, 0])], [group([0, 0]), mixed[1], group([1, 1])]])
    out = dynamic_sampling.collect(0, 2, [], draw)
    assert [g.record.uid for g in out.groups] == [g.record.uid for g in mixed]
    assert all(g.informative for g in out.groups)
    assert out.gen_batches == 2 and out.filtered == 4 and len(out.generated) == 6


def test_generation_stops_once_the_batch_is_full_and_the_surplus_is_carried():
    fresh = [group([1, 0]) for _ in range(5)]
    draw, calls = drawer([fresh[:3], fresh[3:]])
    out = dynamic_sampling.collect(0, 4, [], draw)
    assert len(calls) == 2
    assert out.groups == fresh[:4] and out.carry == fresh[4:]


def test_carried_groups_are_used_first_in_the_next_step():
    carried = [group([0, 1]), group([1, 0])]
    draw, calls = drawer([[group([1, 0]), group([0, 1])]])
    out = dynamic_sampling.collect(1, 3, carried, draw)
    assert out.groups[:2] == carried and out.carried_in == 2
    assert len(calls) == 1 and len(out.groups) == 3 and len(out.carry) == 1


def test_a_full_carry_needs_no_generation():
    carried = [group([0, 1]) for _ in range(3)]
    draw, calls = drawer([])
    out = dynamic_sampling.collect(1, 2, carried, draw)
    assert not calls and out.groups == carried[:2] and out.carry == carried[2:]


def test_without_carry_over_the_surplus_is_dropped():
    draw, _ = drawer([[group([1, 0]) for _ in range(3)]])
    assert dynamic_sampling.collect(0, 2, [], draw, carry_over=False).carry == []


def test_carried_groups_older_than_max_carry_age_are_dropped_and_counted():
    old, young = group([0, 1]), group([1, 0])
    old.step, young.step = 3, 4
    draw, calls = drawer([[group([1, 0])]])
    out = dynamic_sampling.collect(5, 2, [old, young], draw, max_carry_age=1)
    assert out.groups[0] is young and out.stale_dropped == 1 and out.carried_in == 1 and len(calls) == 1
    assert out.ages == [1, 0] and out.groups[1].step == 5


def test_max_carry_age_zero_keeps_no_surplus():
    draw, _ = drawer([[group([1, 0]) for _ in range(3)]])
    assert dynamic_sampling.collect(0, 2, [], draw, max_carry_age=0).carry == []


@pytest.mark.parametrize("informative", [0.3, 0.5, 0.7, 0.9])
def test_at_the_paper_ratio_no_trained_group_is_older_than_max_carry_age(informative):
    """512 groups per step from generation batches of 1,536 prompts (the 32B config): the carry
    grows whenever more than a third are informative, yet nothing older than the bound is trained."""
    import random
    from pathlib import Path

    from dapo_jax.config import load_config_file

    cfg = load_config_file(Path(__file__).parents[1] / "configs" / "dapo_qwen2_5_32b.py").get_config()
    r = cfg.rollout
    rng = random.Random(int(informative * 10))

    def draw(_):
        return [group([1, 0] if rng.random() < informative else [1, 1]) for _ in range(r.gen_prompts_per_batch)]

    carry, keys, generation_free = [], None, 0
    for step in range(12):
        out = dynamic_sampling.collect(step, r.prompts_per_step, carry, draw, max_carry_age=r.max_carry_age,
                                       max_gen_batches=r.max_gen_batches)
        carry = out.carry
        assert len(out.groups) == r.prompts_per_step
        assert max(out.ages) <= r.max_carry_age and all(step - g.step <= r.max_carry_age for g in carry + out.groups)
        metrics = out.metrics()
        keys = keys or set(metrics)
        assert set(metrics) == keys and all(v == v for v in metrics.values())  # every figure, every step
        assert metrics["dynamic_sampling/age_max"] == max(out.ages)
        assert metrics["dynamic_sampling/stale_frac"] == sum(a > 0 for a in out.ages) / len(out.groups)
        generation_free += out.gen_batches == 0
        if out.gen_batches == 0:
            assert metrics["dynamic_sampling/stale_frac"] == 1.0
    if informative >= 0.5:  # the carry piles up until it fills a whole step: the carry-only path ran
        assert generation_free


def test_a_step_that_generates_nothing_still_reports_every_rollout_figure():
    from dapo_jax import metrics as metrics_lib

    carried = [group([0, 1]), group([1, 0])]
    full = metrics_lib.rollout_metrics(carried, carried)
    empty = metrics_lib.rollout_metrics([], carried)
    assert set(empty) == set(full)
    assert all(v != v for k, v in empty.items() if k.startswith("rollout/"))  # NaN: nothing was generated
    assert empty["batch/acc_mean"] == 0.5


def test_reaching_the_generation_batch_limit_explains_what_was_seen():
    draw, calls = drawer([[group([1, 1]), group([1, 1]), group([1, 0])]] * 3)
    with pytest.raises(dynamic_sampling.GenerationBatchLimit) as e:
        dynamic_sampling.collect(7, 4, [], draw, max_gen_batches=3)
    message = str(e.value)
    assert len(calls) == 3
    for expected in ("step 7", "max_gen_batches=3", "3 of the 4 groups", "9 groups generated", "6 were all correct",
                     "0 all wrong", "too easy", "train_partial"):
        assert expected in message, (expected, message)


def test_the_partial_option_trains_on_what_was_found():
    draw, _ = drawer([[group([0, 0]), group([1, 0])]] * 2)
    out = dynamic_sampling.collect(0, 4, [], draw, max_gen_batches=2, on_limit="train_partial")
    assert out.partial and len(out.groups) == 2 and out.carry == []


def test_without_dynamic_sampling_the_first_batch_is_trained_as_is():
    batch = [group([1, 1]), group([0, 1]), group([0, 0])]
    draw, calls = drawer([batch])
    out = dynamic_sampling.collect(0, 3, [], draw, dynamic=False)
    assert out.groups == batch and len(calls) == 1 and out.carry == []


def test_unknown_limit_policy_is_rejected():
    with pytest.raises(ValueError, match="on_limit"):
        dynamic_sampling.collect(0, 1, [], lambda _: [], on_limit="wait")


def test_a_carried_group_survives_a_checkpoint_round_trip():
    import json

    import numpy as np

    g = group([1, 0])
    g.sampler_logp = [np.array([-0.5, -0.25], np.float32)] * 2
    g.old_logp = [np.array([-0.5, -0.125], np.float32), np.array([-1.0, -2.0], np.float32)]
    back = Group.from_json(json.loads(json.dumps(g.to_json())))
    assert back.record == g.record and back.accs == g.accs and back.responses == g.responses
    for a, b in zip(back.old_logp + back.sampler_logp, g.old_logp + g.sampler_logp):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
