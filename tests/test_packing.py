"""Packed train batches: first-fit decreasing placement, and an update on packed rows equal to the
same update on one left-padded sequence per row, for every aggregation mode."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

import dapo_jax
from dapo_jax import packing, sharding
from dapo_jax import train_step as ts


def test_first_fit_decreasing_places_every_sequence_once_within_the_budget():
    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    packed = packing.first_fit_decreasing(lengths, 10)
    placed = sorted(i for row in packed.rows for i, _ in row)
    assert placed == list(range(len(lengths)))
    for row in packed.rows:
        spans = sorted((start, start + lengths[i]) for i, start in row)
        assert spans[-1][1] <= 10 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
    assert len(packed.rows) == 4  # 40 tokens in rows of 10: 9+1, 8+2, 7+3, 5+5, no room wasted


def test_a_sequence_longer_than_the_budget_says_what_to_raise():
    with pytest.raises(ValueError, match="sequence 1 has 12 tokens, more than the packing budget of 10.*pack_budget"):
        packing.first_fit_decreasing([3, 12], 10)


def answers(seed, vocab, n=8, kl=False):
    """Answers with prompts of 2-6 tokens and responses of 1-20 (one filtered out of the loss)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(2, vocab, rng.integers(2, 7)).tolist()
        response = rng.integers(2, vocab, rng.integers(1, 21)).tolist()
        old = (np.log(1 / vocab) + rng.uniform(-0.3, 0.3, len(response))).astype(np.float32)
        ref = (old + rng.uniform(-0.2, 0.2, len(response))).astype(np.float32) if kl else None
        out.append(packing.Answer(prompt, response, old, float(rng.normal()), trained=i != 3, ref_logp=ref))
    return out


def one_per_row(items, width):
    """The same answers as left-padded rows (the unpacked layout)."""
    n, p = len(items), max(len(a.prompt) for a in items)
    batch = {k: np.zeros((n, width), np.float32 if k in ("loss_mask", "old_logp", "ref_logp") else np.int32)
             for k in ("tokens", "attention_mask", "loss_mask", "old_logp", "ref_logp")}
    for r, a in enumerate(items):
        start = p - len(a.prompt)
        batch["tokens"][r, start:start + len(a)] = a.prompt + a.response
        batch["attention_mask"][r, start:start + len(a)] = 1
        batch["loss_mask"][r, p:p + len(a.response)] = float(a.trained)
        batch["old_logp"][r, p:p + len(a.response)] = a.old_logp
        if a.ref_logp is not None:
            batch["ref_logp"][r, p:p + len(a.response)] = a.ref_logp
    if items[0].ref_logp is None:
        del batch["ref_logp"]
    batch["advantages"] = np.asarray([a.advantage for a in items], np.float32)
    return batch


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    return config, dapo_jax.init_params(config, jax.random.key(0))


def update(config, params, batch, loss_config, minibatches, microbatches=1, mesh=None):
    params = jax.tree_util.tree_map(jnp.copy, params)
    if mesh is not None:
        params = jax.device_put(params, dapo_jax.models.qwen2.param_shardings(config, mesh))
    sgd = optax.sgd(0.1)  # small steps: the second mini-batch's gradient is taken where the first left the params
    state = ts.init_train_state(params, sgd)
    step = ts.make_train_step(config, loss_config, sgd, num_minibatches=minibatches,
                              num_microbatches=microbatches, mesh=mesh)
    return step(state, batch)


def max_difference(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_a_packed_update_equals_the_one_sequence_per_row_update(model, mode):
    config, params = model
    items = answers(0, config.vocab_size, kl=True)
    loss_config = ts.LossConfig(agg_mode=mode, norm_constant=20.0, kl_coef=0.1)
    rows, rows_metrics = update(config, params, one_per_row(items, 28), loss_config, minibatches=2)
    batch = packing.train_batch(items, num_minibatches=2, per_minibatch=4, budget=32, rows_per_micro=1,
                                loss_config=loss_config)
    assert batch["tokens"].shape == (2, 4, 1, 32) and np.all(batch["micro_batches"] < 4)  # fewer rows than answers
    packed, packed_metrics = update(config, params, batch, loss_config, minibatches=2)
    assert max_difference(rows.params, params) > 1e-3  # the update moved the parameters
    assert max_difference(packed.params, rows.params) < 2e-6  # float32 sums in another order
    for key in ("loss", "pg_loss", "clip_frac", "approx_kl", "ref_kl", "entropy", "tokens"):
        np.testing.assert_allclose(packed_metrics[key], rows_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_a_packed_update_on_the_8_device_mesh_equals_one_device(model):
    config, params = model
    items = answers(1, config.vocab_size, n=16)
    loss_config = ts.LossConfig()
    batch = packing.train_batch(items, num_minibatches=1, per_minibatch=16, budget=48, rows_per_micro=8,
                                loss_config=loss_config)
    single, _ = update(config, params, batch, loss_config, minibatches=1)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = update(config, params, batch, loss_config, minibatches=1, mesh=mesh)
    assert max_difference(sharded.params, single.params) < 2e-6


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_a_mini_batch_without_loss_tokens_gets_no_weights(mode):
    weights = ts.loss_weights(np.zeros((2, 5)), np.zeros((2, 5), np.int32), mode, norm_constant=8.0)
    assert weights.shape == (2, 5) and not weights.any()


def test_the_train_bench_packs_long_tailed_answers_into_fewer_passes(capsys):
    import json

    from dapo_jax import bench

    bench.main(["train", "--checkpoint", "random:tiny,layers=1", "--answers", "12", "--max-response", "96",
                "--prompt-len", "8", "--rows", "2", "--attention", "blockwise", "--repeats", "1"])
    line = json.loads(capsys.readouterr().out)
    padded, packed = line["results"]["blockwise/padded"], line["results"]["blockwise/packed"]
    assert padded["passes"] == 6 and padded["rows"] == 12 and line["row_width"] == 104
    # the lengths are long-tailed (lognormal, mean ~1/4 of the cap), so several answers share a row
    assert packed["passes"] < padded["passes"] and packed["temp_gib"] == padded["temp_gib"]
    assert line["packed_vs_padded"]["blockwise"] > 0 and line["real_tokens"] == 12 * 8 + round(line["mean_response"] * 12)
