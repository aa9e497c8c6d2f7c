"""The paper's equations, checked against values worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import algorithm
from dapo_jax.algorithm import aggregate, group_advantages, policy_loss
from dapo_jax.rewards.overlong import overlong_filter_weights, overlong_penalty

# -- group advantages -------------------------------------------------------------------------------


def test_advantage_is_centred_and_divided_by_the_unbiased_std():
    adv = group_advantages([1.0, -1.0, -1.0, 1.0], ["q"] * 4)
    std = math.sqrt(4 / 3)  # unbiased: sum of squares 4 over N - 1 = 3
    np.testing.assert_allclose(adv, np.array([1, -1, -1, 1]) / (std + 1e-6), rtol=1e-6)


def test_groups_are_normalised_separately_whatever_their_order():
    adv = group_advantages([1.0, 0.0, 3.0, 2.0, 5.0], ["a", "b", "a", "b", "b"])
    np.testing.assert_allclose(adv[[0, 2]], [-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6)], rtol=1e-6)
    np.testing.assert_allclose(adv[[1, 3, 4]], np.array([-7 / 3, -1 / 3, 8 / 3]) / (np.std([0, 2, 5], ddof=1) + 1e-6),
                               rtol=1e-6)


def test_all_equal_group_and_single_answer_group_get_zero():
    np.testing.assert_array_equal(group_advantages([1.0, 1.0, 1.0, 0.5], [0, 0, 0, 1]), [0, 0, 0, 0])


def test_dr_grpo_advantage_is_not_divided_by_std():
    np.testing.assert_allclose(group_advantages([1.0, -1.0, -1.0], [7] * 3, norm_by_std=False),
                               [4 / 3, -2 / 3, -2 / 3], rtol=1e-6)


def test_bad_advantage_inputs_are_rejected():
    with pytest.raises(ValueError, match="equal-length"):
        group_advantages([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, float("nan")], [0, 0])


# -- the clip ------------------------------------------------------------------------------------------


def one_token_loss(ratio, advantage, **kwargs):
    logp = jnp.log(jnp.array([[ratio]], jnp.float32))
    loss, metrics = policy_loss(logp, jnp.zeros((1, 1)), jnp.array([advantage]), jnp.ones((1, 1)), **kwargs)
    return float(loss), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("ratio, advantage, want, clipped, high, low", [
    (1.5, 1.0, -1.28, 1, 1, 0),   # A > 0, ratio above 1 + eps_high: clipped, gradient stops
    (0.5, 1.0, -0.5, 0, 0, 0),    # A > 0, ratio below 1 - eps_low: not clipped (pushing up is fine)
    (0.5, -1.0, 0.8, 1, 0, 1),    # A < 0, ratio below 1 - eps_low: clipped
    (1.5, -1.0, 1.5, 0, 0, 0),    # A < 0, ratio above 1 + eps_high: not clipped (pushing down is fine)
    (1.1, 2.0, -2.2, 0, 0, 0),    # inside the trust region: -A r
])
def test_each_clip_region(ratio, advantage, want, clipped, high, low):
    loss, m = one_token_loss(ratio, advantage)
    assert loss == pytest.approx(want, rel=1e-6)
    assert (m["clip_frac"], m["clip_frac_high"], m["clip_frac_low"]) == (clipped, high, low)


def test_clip_higher_lets_a_positive_advantage_token_grow_further():
    symmetric, _ = one_token_loss(1.25, 1.0, clip_low=0.2, clip_high=0.2)
    decoupled, _ = one_token_loss(1.25, 1.0, clip_low=0.2, clip_high=0.28)
    assert symmetric == pytest.approx(-1.2) and decoupled == pytest.approx(-1.25)


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    loss, m = one_token_loss(5.0, -1.0, clip_c=3.0)
    assert loss == pytest.approx(3.0) and m["dual_clip_frac"] == 1.0
    loss, m = one_token_loss(2.0, -1.0, clip_c=3.0)  # below the bound: unchanged
    assert loss == pytest.approx(2.0) and m["dual_clip_frac"] == 0.0
    loss, m = one_token_loss(5.0, 1.0, clip_c=3.0)  # positive advantages are never dual-clipped
    assert loss == pytest.approx(-1.28) and m["dual_clip_frac"] == 0.0


def test_gradient_matches_the_analytic_form():
    rng = np.random.RandomState(0)
    B, T = 4, 6
    logp = jnp.asarray(np.log(rng.uniform(0.05, 0.9, (B, T))), jnp.float32)
    old = logp + jnp.asarray(rng.uniform(-0.6, 0.6, (B, T)), jnp.float32)
    adv = jnp.asarray([1.5, -0.7, 0.3, -2.0], jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(B, T)) < 0.8, jnp.float32).at[1, 2].set(1.0)
    old = old.at[1, 2].set(logp[1, 2] - math.log(4.0))  # ratio 4 with A < 0: the dual clip holds
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, clip_c=3.0)[0])(logp)
    # d(-A r)/d logp = -A r where the unclipped branch is taken; 0 where a clip holds the loss constant.
    r = np.exp(np.asarray(logp - old))
    A = np.asarray(adv)[:, None] * np.ones((B, T))
    clipped = np.where(A > 0, r > 1.28, r < 0.8)
    dual = (A < 0) & (-A * r > -A * 3.0)
    want = np.where(clipped | dual, 0.0, -A * r) * np.asarray(mask) / np.asarray(mask).sum()
    assert clipped.any() and (~clipped).any() and dual.any()
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-8)


# -- aggregation ---------------------------------------------------------------------------------------

LOSSES = jnp.array([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
MASK = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # a 3-token answer, a 1-token answer, an empty row


@pytest.mark.parametrize("mode, want", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),
    ("seq-mean-token-sum", (6 + 4) / 2),
    ("seq-mean-token-sum-norm", (6 + 4) / 3),
])
def test_each_aggregation_mode(mode, want):
    assert float(aggregate(LOSSES, MASK, mode)) == pytest.approx(want)
    # Through the loss: with ratio 1 every token's loss is -A, so the loss is -aggregate(A).
    loss, _ = policy_loss(jnp.zeros((3, 3)), jnp.zeros((3, 3)), -LOSSES, MASK, agg_mode=mode)
    assert float(loss) == pytest.approx(want)


def test_sum_norm_takes_a_constant():
    assert float(aggregate(LOSSES, MASK, "seq-mean-token-sum-norm", norm_constant=5.0)) == pytest.approx(2.0)


def test_token_level_loss_weighs_long_answers_by_their_length():
    # One long (3 tokens) and one short (1 token) answer: per token, the long one counts 3x in
    # token-mean but the two count equally per sample in seq-mean-token-mean.
    grad_token = jax.grad(lambda x: aggregate(x, MASK, "token-mean"))(LOSSES)
    grad_seq = jax.grad(lambda x: aggregate(x, MASK, "seq-mean-token-mean"))(LOSSES)
    np.testing.assert_allclose(grad_token[:2], [[0.25] * 3, [0.25, 0, 0]])
    np.testing.assert_allclose(grad_seq[:2], [[1 / 6] * 3, [0.5, 0, 0]])


def test_slices_with_global_counts_add_up_to_the_whole():
    whole = float(aggregate(LOSSES, MASK, "token-mean"))
    parts = sum(float(aggregate(LOSSES[i:i + 1], MASK[i:i + 1], "token-mean", num_tokens=4.0)) for i in range(3))
    assert parts == pytest.approx(whole)
    whole = float(aggregate(LOSSES, MASK, "seq-mean-token-mean"))
    parts = sum(float(aggregate(LOSSES[i:i + 1], MASK[i:i + 1], "seq-mean-token-mean", num_sequences=2))
                for i in range(3))
    assert parts == pytest.approx(whole)


# -- metrics and the GRPO terms ---------------------------------------------------------------------


def test_metrics_are_token_means():
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.9]]))
    old = logp + jnp.array([[0.1, -0.3, 0.5]])
    _, m = policy_loss(logp, old, jnp.array([1.0]), jnp.array([[1, 1, 0]]))
    assert float(m["approx_kl"]) == pytest.approx((0.1 - 0.3) / 2)
    assert float(m["token_prob"]) == pytest.approx((0.5 + 0.25) / 2)


def test_kl_penalty_uses_the_k3_estimator_and_entropy_bonus_lowers_the_loss():
    logp, mask, adv = jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.array([0.0])
    k3 = math.exp(0.5) - 0.5 - 1  # ref - logp = 0.5
    loss, m = policy_loss(logp, logp, adv, mask, ref_logp=logp + 0.5, kl_coef=0.1)
    assert float(loss) == pytest.approx(0.1 * k3) and float(m["ref_kl"]) == pytest.approx(k3)
    loss, m = policy_loss(logp, logp, adv, mask, entropy=jnp.full((1, 2), 2.0), entropy_coef=0.01)
    assert float(loss) == pytest.approx(-0.02) and float(m["entropy"]) == pytest.approx(2.0)


def _kl_oracle(logp, ref, estimator):
    """KL(pi || pi_ref) per token in float64, written out from the estimators' definitions."""
    d = ref.astype(np.float64) - logp.astype(np.float64)
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return d * d / 2
    d = np.clip(d, -20, 20)
    return np.clip(np.exp(d) - d - 1, -10, 10)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_matches_a_float64_oracle(estimator, agg_mode):
    rng = np.random.default_rng(3)
    logp = np.log(rng.uniform(0.05, 1.0, (4, 6)))
    ref = np.log(rng.uniform(0.05, 1.0, (4, 6)))
    ref[0, 0] = np.nan  # a masked-out position must not leak in
    mask = (rng.uniform(size=(4, 6)) < 0.7).astype(np.int32)
    mask[0, 0] = 0
    mask[1] = 0  # an empty sequence
    zero_adv = np.zeros(4)
    loss, m = policy_loss(logp, logp, zero_adv, mask, ref_logp=ref, kl_coef=0.05, kl_estimator=estimator,
                          agg_mode=agg_mode)
    kl = np.where(mask > 0, _kl_oracle(logp, np.nan_to_num(ref), estimator), 0.0)
    if agg_mode == "token-mean":
        expected = kl.sum() / mask.sum()
    else:
        present = mask.sum(1) > 0
        expected = (kl.sum(1)[present] / mask.sum(1)[present]).mean()
    assert float(loss) == pytest.approx(0.05 * expected, rel=1e-5, abs=1e-7)
    assert float(m["ref_kl"]) == pytest.approx(kl.sum() / mask.sum(), rel=1e-5, abs=1e-7)


def test_k1_and_k3_agree_on_the_mean_when_the_policy_samples_its_own_tokens():
    """Both are unbiased for KL(pi || pi_ref) under tokens drawn from pi; k3 with lower variance."""
    rng = np.random.default_rng(0)
    p, q = np.array([0.6, 0.3, 0.1]), np.array([0.3, 0.3, 0.4])
    tokens = rng.choice(3, size=(1, 20000), p=p)
    logp, ref = jnp.log(p)[tokens], jnp.log(q)[tokens]
    exact = float(np.sum(p * np.log(p / q)))
    estimates = {e: np.asarray(algorithm.kl_to_reference(logp, ref, e)) for e in ("k1", "k3")}
    for values in estimates.values():
        assert values.mean() == pytest.approx(exact, abs=0.02)
    assert estimates["k3"].std() < estimates["k1"].std()


@pytest.mark.parametrize("kwargs, message", [
    (dict(clip_c=1.0), "must be > 1"),
    (dict(kl_coef=0.1, ref_logp=jnp.zeros((1, 2)), kl_estimator="k4"), "k4"),
    (dict(agg_mode="mean"), "agg_mode='mean'"),
    (dict(kl_coef=0.1), "needs ref_logp"),
    (dict(entropy_coef=0.1), "needs the per-token entropy"),
])
def test_bad_loss_settings_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)), **kwargs)


def test_token_logprobs_and_entropy():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
    logp, entropy = algorithm.token_logprobs_and_entropy(logits, jnp.array([[1]]))
    assert float(logp[0, 0]) == pytest.approx(math.log(0.25), rel=1e-6)
    assert float(entropy[0, 0]) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), rel=1e-6)


# -- overlong shaping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length, want", [
    (0, 0.0), (16384, 0.0),            # within the expected length
    (16385, -1 / 4096), (18432, -0.5),  # the linear ramp through the buffer
    (20480, -1.0), (30000, -1.0),      # at and beyond the maximum
])
def test_soft_overlong_punishment_with_the_papers_lengths(length, want):
    assert overlong_penalty(length, max_response_length=20480, buffer_length=4096) == pytest.approx(want)


def test_overlong_penalty_scales_and_vectorises():
    got = overlong_penalty(np.array([10, 14, 16]), max_response_length=16, buffer_length=4, penalty_factor=0.5)
    np.testing.assert_allclose(got, [0.0, -0.25, -0.5])


@pytest.mark.parametrize("kwargs, message", [
    (dict(length=5, max_response_length=16, buffer_length=0), "buffer_length=0"),
    (dict(length=5, max_response_length=16, buffer_length=20), "buffer_length=20"),
    (dict(length=5.5, max_response_length=16, buffer_length=4), "token count"),
    (dict(length=-1, max_response_length=16, buffer_length=4), "token count"),
])
def test_overlong_penalty_rejects_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlong_penalty(kwargs.pop("length"), **kwargs)


def test_overlong_filtering_zeroes_truncated_answers():
    np.testing.assert_array_equal(overlong_filter_weights([True, False, True]), [0.0, 1.0, 0.0])


def test_garbage_at_masked_positions_does_not_leak_into_loss_or_gradient():
    logp = jnp.log(jnp.full((2, 3), 0.5))
    old = jnp.asarray([[-0.7, -0.6, -jnp.inf], [jnp.nan, -0.7, -0.7]])  # padding the loss never sees
    mask = jnp.asarray([[1, 1, 0], [0, 1, 1]])
    for mode in algorithm.AGG_MODES:
        loss, grad = jax.value_and_grad(lambda lp: policy_loss(lp, old, jnp.asarray([-1.0, 1.0]), mask,
                                                               agg_mode=mode)[0])(logp)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad))), mode


def test_a_huge_ratio_under_the_dual_clip_has_a_finite_gradient():
    # log ratio 99: exp overflows without the reference's clamp, and 0 * inf would poison the gradient.
    loss, grad = jax.value_and_grad(lambda lp: policy_loss(lp, jnp.asarray([[-100.0, -1.0]]), jnp.asarray([-1.0]),
                                                           jnp.ones((1, 2)), clip_c=3.0)[0])(jnp.asarray([[-1.0, -1.0]]))
    assert float(loss) == pytest.approx((3.0 + 1.0) / 2) and np.all(np.isfinite(np.asarray(grad)))


def test_an_empty_mask_gives_zero_not_nan():
    for mode in algorithm.AGG_MODES:
        assert float(aggregate(LOSSES, jnp.zeros((3, 3)), mode)) == 0.0


def _head_inputs(B=2, T=37, E=16, V=50, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32), jnp.asarray(rng.normal(size=(V, E)), jnp.float32),
            jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32))


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_chunked_logprobs_equal_the_full_logits_values_and_gradients(chunk):
    hidden, head, targets = _head_inputs()

    def full(h, w):
        return algorithm.token_logprobs_and_entropy(jnp.einsum("bte,ve->btv", h, w) / 0.7, targets)

    def chunked(h, w):
        return algorithm.chunked_logprobs_and_entropy(h, w, targets, temperature=0.7, chunk=chunk)

    for got, want in zip(chunked(hidden, head), full(hidden, head)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    def loss(fn):
        return lambda h, w: jnp.sum(fn(h, w)[0] * jnp.cos(jnp.arange(37.0))) + 0.3 * jnp.sum(fn(h, w)[1])
    for got, want in zip(jax.grad(loss(chunked), argnums=(0, 1))(hidden, head),
                         jax.grad(loss(full), argnums=(0, 1))(hidden, head)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_chunked_logprobs_never_hold_the_whole_logits():
    """Forward and backward over a 32,768-token vocabulary: the full logits grow with the positions
    (256 MiB of float32 at 2,048, 1 GiB at 8,192); the chunked pass holds a few chunk-sized buffers
    (logits, softmax, their gradient) whatever the length."""
    B, E, V, chunk = 1, 64, 32768, 256

    def temp(fn, T):
        args = (jax.ShapeDtypeStruct((B, T, E), jnp.float32), jax.ShapeDtypeStruct((V, E), jnp.float32),
                jax.ShapeDtypeStruct((B, T), jnp.int32))
        grad = jax.grad(lambda h, w, t: jnp.sum(fn(h, w, t)[0]), argnums=(0, 1))
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    def chunked(h, w, t):
        return algorithm.chunked_logprobs_and_entropy(h, w, t, chunk=chunk)

    short, long = temp(chunked, 2048), temp(chunked, 8192)
    full = temp(lambda h, w, t: algorithm.token_logprobs_and_entropy(jnp.einsum("bte,ve->btv", h, w), t), 8192)
    logits = B * 8192 * V * 4
    assert full >= logits
    assert long < 1.1 * short and long < 5 * B * chunk * V * 4 and long < logits / 4, (short, long, logits)
