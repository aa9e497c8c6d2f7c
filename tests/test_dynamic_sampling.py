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
