"""The pure train step: exact token-mean under micro-batching, sharding, skipped updates, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

import dapo_jax
from dapo_jax import algorithm, sharding
from dapo_jax import train_step as ts
from dapo_jax.models import qwen2


def rollout_batch(seed, n, length, vocab, response_lengths):
    """Rows of prompt (4 tokens) + response of the given lengths, right-padded; random advantages."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(2, vocab, (n, length)).astype(np.int32)
    attention = np.zeros((n, length), np.int32)
    loss_mask = np.zeros((n, length), np.float32)
    for i, r in enumerate(response_lengths):
        attention[i, :4 + r] = 1
        loss_mask[i, 4:4 + r] = 1
    tokens = np.where(attention > 0, tokens, 0)
    return dict(tokens=tokens, attention_mask=attention, loss_mask=loss_mask,
                old_logp=(np.log(1 / vocab) + rng.uniform(-0.3, 0.3, (n, length))).astype(np.float32) * loss_mask,
                advantages=rng.randn(n).astype(np.float32))


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    return config, dapo_jax.init_params(config, jax.random.key(0))


def updated_params(config, params, batch, optimizer, microbatches, loss_config=ts.LossConfig(), mesh=None):
    state = ts.init_train_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
    step = ts.make_train_step(config, loss_config, optimizer, num_minibatches=1, num_microbatches=microbatches,
                              mesh=mesh)
    state, metrics = step(state, batch)
    return state, metrics


def max_relative_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_token_mean_is_exact_under_gradient_accumulation(setup):
    config, params = setup
    # Very different response lengths, so a per-micro-batch mean would weigh tokens unequally.
    batch = rollout_batch(1, 8, 40, config.vocab_size, [1, 36, 2, 30, 3, 35, 1, 20])
    sgd = optax.sgd(1.0)  # the update is the gradient itself
    whole, m_whole = updated_params(config, params, batch, sgd, microbatches=1)
    split, m_split = updated_params(config, params, batch, sgd, microbatches=4)
    assert max_relative_diff(split.params, whole.params) < 1e-6
    assert float(m_split["loss"]) == pytest.approx(float(m_whole["loss"]), rel=1e-6)

    # What the reference does (mean per micro-batch, then averaged) moves the parameters differently.
    def naive_loss(p):
        losses = []
        for k in range(4):
            rows = slice(2 * k, 2 * k + 2)
            logp, _ = ts.token_logprobs(config, p, batch["tokens"][rows], batch["attention_mask"][rows])
            losses.append(algorithm.policy_loss(logp, batch["old_logp"][rows], batch["advantages"][rows],
                                                batch["loss_mask"][rows])[0])
        return sum(losses) / 4
    naive = jax.tree_util.tree_map(lambda p, g: p - g, params, jax.grad(naive_loss)(params))
    assert max_relative_diff(naive, whole.params) > 1e-3


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_sequence_modes_are_exact_under_gradient_accumulation(setup, mode):
    config, params = setup
    batch = rollout_batch(2, 8, 24, config.vocab_size, [1, 20, 2, 18, 0, 15, 1, 10])  # one empty row
    sgd, loss_config = optax.sgd(1.0), ts.LossConfig(agg_mode=mode, norm_constant=20.0)
    whole, _ = updated_params(config, params, batch, sgd, 1, loss_config)
    split, _ = updated_params(config, params, batch, sgd, 4, loss_config)
    assert max_relative_diff(split.params, whole.params) < 1e-6


def test_train_step_on_the_8_device_mesh_matches_one_device(setup):
    config, params = setup
    batch = rollout_batch(3, 16, 20, config.vocab_size, [5, 12, 3, 16, 8, 1, 14, 9] * 2)
    # SGD: the update is the gradient, so the two runs differ only by summation order. (Adam's first
    # steps are ~lr * sign(g), which turns rounding noise in near-zero gradients into lr-sized flips.)
    optimizer = optax.sgd(0.05)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_params = jax.device_put(jax.tree_util.tree_map(jnp.copy, params), qwen2.param_shardings(config, mesh))
    step_kwargs = dict(num_minibatches=2, num_microbatches=2)
    one = ts.make_train_step(config, ts.LossConfig(clip_c=3.0), optimizer, **step_kwargs)
    many = ts.make_train_step(config, ts.LossConfig(clip_c=3.0), optimizer, mesh=mesh, **step_kwargs)
    state_one, m_one = one(ts.init_train_state(jax.tree_util.tree_map(jnp.copy, params), optimizer), batch)
    state_many, m_many = many(ts.init_train_state(sharded_params, optimizer), batch)
    np.testing.assert_allclose(float(m_many["loss"]), float(m_one["loss"]), rtol=1e-5)
    moved = max_relative_diff(state_one.params, params)
    assert moved > 1e-3, "the update must be large enough for the comparison to mean something"
    for a, b in zip(jax.tree_util.tree_leaves(state_many.params), jax.tree_util.tree_leaves(state_one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    state_many, _ = many(state_many, batch)  # the next step keeps the layout it was given
    q = state_many.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert int(state_many.step) == 2 and q.sharding.is_equivalent_to(qwen2.param_shardings(config, mesh)["layers"]["self_attn"]["q_proj"]["kernel"],
                                       q.ndim)


def test_optimizer_state_is_sharded_like_the_params(setup):
    config, params = setup
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    shardings = qwen2.param_shardings(config, mesh)
    optimizer = ts.make_optimizer(ts.OptimizerConfig(), updates_per_step=1)
    state = ts.init_train_state(jax.device_put(jax.tree_util.tree_map(jnp.copy, params), shardings), optimizer)
    adam = state.opt_state[1][0]
    for moment in (adam.mu, adam.nu):
        for leaf, want in zip(jax.tree_util.tree_leaves(moment), jax.tree_util.tree_leaves(shardings)):
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    big = adam.mu["layers"]["mlp"]["gate_proj"]["kernel"]
    assert set(sharding.bytes_per_device(big).values()) == {big.nbytes // 8}


def test_a_non_finite_loss_skips_the_update_and_is_counted(setup):
    config, params = setup
    batch = rollout_batch(4, 4, 16, config.vocab_size, [5, 6, 7, 8])
    batch["old_logp"][2, 6] = np.nan
    optimizer = ts.make_optimizer(ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=0), updates_per_step=1)
    state = ts.init_train_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
    opt_before = jax.tree_util.tree_map(np.asarray, state.opt_state)
    step = ts.make_train_step(config, ts.LossConfig(), optimizer, num_minibatches=1)
    state, metrics = step(state, batch)
    assert int(state.skipped) == 1 and int(state.updates) == 0 and float(metrics["updates_skipped"]) == 1
    assert float(metrics["updates_applied"]) == 0 and np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(state.opt_state), jax.tree_util.tree_leaves(opt_before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_minibatch_without_tokens_changes_nothing(setup):
    config, params = setup
    batch = rollout_batch(5, 4, 16, config.vocab_size, [0, 0, 0, 0])  # e.g. all overlong-filtered
    optimizer = ts.make_optimizer(ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=0), updates_per_step=1)
    state, metrics = updated_params(config, params, batch, optimizer, 1)
    assert int(state.updates) == 0 and int(state.skipped) == 0 and float(metrics["empty_minibatches"]) == 1
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_updates_raise_the_probability_of_positive_advantage_tokens(setup):
    config, params = setup
    batch = rollout_batch(6, 8, 16, config.vocab_size, [10] * 8)
    batch["advantages"] = np.array([1, -1] * 4, np.float32)
    before, _ = ts.token_logprobs(config, params, batch["tokens"], batch["attention_mask"])
    batch["old_logp"] = np.asarray(before) * batch["loss_mask"]
    optimizer = ts.make_optimizer(ts.OptimizerConfig(learning_rate=3e-3, warmup_steps=0), updates_per_step=2)
    state = ts.init_train_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
    step = ts.make_train_step(config, ts.LossConfig(), optimizer, num_minibatches=2)
    state, _ = step(state, batch)
    after, _ = ts.token_logprobs(config, state.params, batch["tokens"], batch["attention_mask"])
    change = np.asarray((after - before) * batch["loss_mask"]).sum(-1)
    assert (change[0::2] > 0).all() and (change[1::2] < 0).all()


def test_warmup_is_counted_in_rollout_steps():
    cfg = ts.OptimizerConfig(learning_rate=1.0, warmup_steps=4, weight_decay=0.0, grad_clip=1e9)
    optimizer = ts.make_optimizer(cfg, updates_per_step=3)
    params = {"w": jnp.zeros(())}
    state = optimizer.init(params)
    lrs = []
    for _ in range(15):  # 5 rollout steps of 3 updates; Adam's first-step update size is the lr
        updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    np.testing.assert_allclose(lrs[0::3], [0.25, 0.5, 0.75, 1.0, 1.0], rtol=1e-3)
    np.testing.assert_allclose(lrs[:3], [0.25] * 3, rtol=1e-3)


def test_token_logprobs_are_the_models_next_token_log_probs(setup):
    config, params = setup
    batch = rollout_batch(7, 2, 10, config.vocab_size, [4, 6])
    logp, entropy = ts.token_logprobs(config, params, batch["tokens"], batch["attention_mask"])
    logits = np.asarray(dapo_jax.forward(config, params, batch["tokens"], attention_mask=batch["attention_mask"]))
    want = jax.nn.log_softmax(logits[:, :-1], -1)
    want = np.take_along_axis(np.asarray(want), batch["tokens"][:, 1:, None], -1)[..., 0]
    real = batch["attention_mask"][:, 1:] > 0
    np.testing.assert_allclose(np.asarray(logp)[:, 1:][real], want[real], atol=1e-5)
    assert (np.asarray(entropy)[:, 1:][real] > 0).all() and np.all(np.asarray(logp)[:, 0] == 0)


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("old_logp"), "lacks"),
    (lambda b: b.update(loss_mask=b["loss_mask"][:, :5]), "loss_mask"),
])
def test_malformed_batches_fail_before_compiling(setup, change, message):
    config, params = setup
    batch = rollout_batch(8, 4, 12, config.vocab_size, [3, 3, 3, 3])
    change(batch)
    optimizer = optax.sgd(0.1)
    with pytest.raises(ValueError, match=message):
        ts.make_train_step(config, ts.LossConfig(), optimizer, num_minibatches=1)(
            ts.init_train_state(params, optimizer), batch)


def test_indivisible_splits_say_what_to_change(setup):
    config, params = setup
    batch = rollout_batch(9, 6, 12, config.vocab_size, [3] * 6)
    optimizer = optax.sgd(0.1)
    with pytest.raises(ValueError, match="multiple of 4"):
        ts.make_train_step(config, ts.LossConfig(), optimizer, num_minibatches=2, num_microbatches=2)(
            ts.init_train_state(params, optimizer), batch)
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    with pytest.raises(ValueError, match="8 data-parallel devices"):
        ts.make_train_step(config, ts.LossConfig(), optimizer, num_minibatches=1, mesh=mesh)(
            ts.init_train_state(params, optimizer), batch)


def test_sum_norm_mode_needs_its_constant():
    with pytest.raises(ValueError, match="set norm_constant to the maximum response length"):
        ts.LossConfig(agg_mode="seq-mean-token-sum-norm")


def test_log_probs_are_taken_at_the_sampling_temperature(setup):
    config, params = setup
    batch = rollout_batch(10, 2, 8, config.vocab_size, [3, 3])
    hot, _ = ts.token_logprobs(config, params, batch["tokens"], batch["attention_mask"], temperature=2.0)
    logits = np.asarray(dapo_jax.forward(config, params, batch["tokens"], attention_mask=batch["attention_mask"]))
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, :-1] / 2.0, -1)), batch["tokens"][:, 1:, None],
                              -1)[..., 0]
    np.testing.assert_allclose(np.asarray(hot)[:, 1:], want, atol=1e-5)
