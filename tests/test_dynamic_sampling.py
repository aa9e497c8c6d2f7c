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


def batches_of(batches):
    """(fresh groups of these generation batches, in order, generated lazily; the indices of the
    batches started so far)."""
    started = []

    def fresh():
        for index, batch in enumerate(batches):
            started.append(index)
            yield from batch
    return fresh(), started


def test_all_correct_and_all_wrong_groups_are_never_trained_on():
    mixed = [group([1, 0]), group([0, 1])]
    fresh, _ = batches_of([[group([1, 1]), mixed[0], group([0, 0])], [group([0, 0]), mixed[1], group([1, 1])]])
    out = dynamic_sampling.collect(0, 2, [], fresh, per_batch=3, whole_batches=True)
    assert [g.record.uid for g in out.groups] == [g.record.uid for g in mixed]
    assert all(g.informative for g in out.groups)
    assert out.gen_batches == 2 and out.filtered == 4 and len(out.generated) == 6


def test_a_stream_stops_at_the_group_that_fills_the_batch():
    fresh = [group([1, 0]), group([1, 1]), group([0, 1]), group([0, 0]), group([1, 0]), group([0, 1])]
    stream, started = batches_of([fresh[:3], fresh[3:], [group([1, 0])]])
    out = dynamic_sampling.collect(0, 3, [], stream, per_batch=3)
    assert out.groups == [fresh[0], fresh[2], fresh[4]] and out.generated == fresh[:5]
    assert out.carry == [] and started == [0, 1]  # the third batch's prompts were never generated
    assert out.gen_batches == 2 and out.metrics()["dynamic_sampling/groups_generated"] == 5


def test_whole_generation_batches_carry_their_surplus():
    fresh = [group([1, 0]) for _ in range(6)]
    stream, started = batches_of([fresh[:3], fresh[3:]])
    out = dynamic_sampling.collect(0, 4, [], stream, per_batch=3, whole_batches=True)
    assert started == [0, 1]
    assert out.groups == fresh[:4] and out.carry == fresh[4:]


def test_carried_groups_are_used_first_in_the_next_step():
    carried = [group([0, 1]), group([1, 0])]
    fresh, calls = batches_of([[group([1, 0]), group([0, 1])]])
    out = dynamic_sampling.collect(1, 3, carried, fresh, per_batch=2, whole_batches=True)
    assert out.groups[:2] == carried and out.carried_in == 2
    assert len(calls) == 1 and len(out.groups) == 3 and len(out.carry) == 1


def test_a_full_carry_needs_no_generation():
    carried = [group([0, 1]) for _ in range(3)]
    fresh, calls = batches_of([])
    out = dynamic_sampling.collect(1, 2, carried, fresh, per_batch=2)
    assert not calls and out.groups == carried[:2] and out.carry == carried[2:]


def test_without_carry_over_the_surplus_is_dropped():
    fresh, _ = batches_of([[group([1, 0]) for _ in range(3)]])
    assert dynamic_sampling.collect(0, 2, [], fresh, per_batch=3, whole_batches=True, carry_over=False).carry == []


def test_carried_groups_older_than_max_carry_age_are_dropped_and_counted():
    old, young = group([0, 1]), group([1, 0])
    old.step, young.step = 3, 4
    fresh, calls = batches_of([[group([1, 0])]])
    out = dynamic_sampling.collect(5, 2, [old, young], fresh, per_batch=1, max_carry_age=1)
    assert out.groups[0] is young and out.stale_dropped == 1 and out.carried_in == 1 and len(calls) == 1
    assert out.ages == [1, 0] and out.groups[1].step == 5


def test_max_carry_age_zero_keeps_no_surplus():
    fresh, _ = batches_of([[group([1, 0]) for _ in range(3)]])
    assert dynamic_sampling.collect(0, 2, [], fresh, per_batch=3, whole_batches=True, max_carry_age=0).carry == []


@pytest.mark.parametrize("informative", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("whole_batches", [True, False], ids=["batches", "stream"])
def test_at_the_paper_ratio_no_trained_group_is_older_than_max_carry_age(informative, whole_batches):
    """512 groups per step from generation batches of 1,536 prompts (the 32B config): in whole
    batches the carry grows whenever more than a third are informative, yet nothing older than the
    bound is trained; a stream carries nothing."""
    import random
    from pathlib import Path

    from dapo_jax.config import load_config_file

    cfg = load_config_file(Path(__file__).parents[1] / "configs" / "dapo_qwen2_5_32b.py").get_config()
    r = cfg.rollout
    rng = random.Random(int(informative * 10))

    def fresh():
        while True:
            yield group([1, 0] if rng.random() < informative else [1, 1])

    carry, keys, generation_free = [], None, 0
    for step in range(12):
        out = dynamic_sampling.collect(step, r.prompts_per_step, carry, fresh(), per_batch=r.gen_prompts_per_batch,
                                       whole_batches=whole_batches, max_carry_age=r.max_carry_age,
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
        if not whole_batches:
            assert out.carry == [] and out.ages == [0] * r.prompts_per_step
            assert out.generated[-1].informative  # it stopped at the group that filled the batch
    if informative >= 0.5 and whole_batches:  # the carry piles up until it fills a whole step
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
    fresh, calls = batches_of([[group([1, 1]), group([1, 1]), group([1, 0])] for _ in range(4)])
    with pytest.raises(dynamic_sampling.GenerationBatchLimit) as e:
        dynamic_sampling.collect(7, 4, [], fresh, per_batch=3, max_gen_batches=3)
    message = str(e.value)
    assert len(calls) == 3
    for expected in ("step 7", "max_gen_batches=3", "3 of the 4 groups", "9 groups generated", "6 were all correct",
                     "0 all wrong", "too easy", "train_partial"):
        assert expected in message, (expected, message)


def test_the_partial_option_trains_on_what_was_found():
    fresh, _ = batches_of([[group([0, 0]), group([1, 0])] for _ in range(3)])
    out = dynamic_sampling.collect(0, 4, [], fresh, per_batch=2, max_gen_batches=2, on_limit="train_partial")
    assert out.partial and len(out.groups) == 2 and out.carry == []


def test_without_dynamic_sampling_the_first_batch_is_trained_as_is():
    batch = [group([1, 1]), group([0, 1]), group([0, 0])]
    fresh, calls = batches_of([batch, [group([0, 1])]])
    out = dynamic_sampling.collect(0, 3, [], fresh, per_batch=3, dynamic=False)
    assert out.groups == batch and len(calls) == 1 and out.carry == []


def test_unknown_limit_policy_is_rejected():
    with pytest.raises(ValueError, match="on_limit"):
        dynamic_sampling.collect(0, 1, [], iter([]), per_batch=1, on_limit="wait")


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
