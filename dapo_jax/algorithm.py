"""The paper's equations: group advantages and the decoupled-clip policy loss.

DAPO (arXiv 2503.14476, eq. 8) maximises, over a batch of groups of G answers o_i to a question,

    J = 1/sum_i |o_i| * sum_i sum_t min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)

    r_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)          (importance ratio)
    A_i  = (R_i - mean_j R_j) / std_j R_j                                  (group advantage)

`policy_loss` returns -J (a quantity to minimise), aggregated over tokens as DAPO does or per
sample first as GRPO does, with the GRPO baseline's KL penalty and entropy bonus available.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax import sharding

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")  # the reference's "kl", "mse" and "low_var_kl"


def group_advantages(rewards: Sequence[float], group_ids: Sequence[Hashable], *, norm_by_std: bool = True,
                     eps: float = 1e-6) -> np.ndarray:
    """A_i = (R_i - mean_g R) / (std_g R + eps) within each group g (answers to the same prompt).

    std is the unbiased (N - 1) standard deviation, as in the reference. norm_by_std=False gives
    Dr. GRPO's A_i = R_i - mean_g R. A group of one answer has no baseline to compare with and gets
    advantage 0 (the reference's verl code instead passes its reward through unchanged).
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1 or len(group_ids) != len(rewards):
        raise ValueError(f"rewards ({rewards.shape}) and group_ids ({len(group_ids)}) must be equal-length 1-D")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"rewards must be finite; got {rewards[~np.isfinite(rewards)][:3].tolist()}")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    advantages = np.zeros_like(rewards)
    for index in members.values():
        if len(index) < 2:
            continue
        r = rewards[index]
        centred = r - r.mean()
        advantages[index] = centred / (r.std(ddof=1) + eps) if norm_by_std else centred
    return advantages.astype(np.float32)


def _masked_sum(x, mask, axis=None):
    """sum(x * mask), where a NaN or inf at a masked-out position cannot leak in (NaN * 0 = NaN)."""
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)


def _masked_mean(x, mask, denominator=None):
    return _masked_sum(x, mask) / (jnp.maximum(jnp.sum(mask), 1.0) if denominator is None else denominator)


def aggregate(loss_BxT, mask_BxT, agg_mode: str, *, num_tokens=None, num_sequences=None, norm_constant=None):
    """Reduce per-token losses to one number.

        token-mean               sum_bt L m / sum_bt m                        (DAPO)
        seq-mean-token-mean      1/B' sum_b (sum_t L m / sum_t m)             (GRPO)
        seq-mean-token-sum       1/B' sum_b sum_t L m
        seq-mean-token-sum-norm  sum_bt L m / C                               (Dr. GRPO, C = T by default)

    B' counts sequences with at least one token. `num_tokens` / `num_sequences` replace this
    batch's own sum_bt m / B' by those of a larger batch it is a slice of: the slices' values then
    add up exactly to the whole batch's, which keeps token-mean exact under gradient accumulation.
    """
    if agg_mode not in AGG_MODES:
        raise ValueError(f"agg_mode={agg_mode!r} is not one of {AGG_MODES}")
    mask_BxT = mask_BxT.astype(loss_BxT.dtype)
    if agg_mode == "token-mean":
        return _masked_sum(loss_BxT, mask_BxT) / (jnp.maximum(jnp.sum(mask_BxT), 1.0) if num_tokens is None
                                                  else num_tokens)
    if agg_mode == "seq-mean-token-sum-norm":
        return _masked_sum(loss_BxT, mask_BxT) / (mask_BxT.shape[-1] if norm_constant is None else norm_constant)
    tokens_B = jnp.sum(mask_BxT, axis=-1)
    present_B = tokens_B > 0
    seq_B = _masked_sum(loss_BxT, mask_BxT, axis=-1)
    if agg_mode == "seq-mean-token-mean":
        seq_B = seq_B / jnp.maximum(tokens_B, 1.0)
    count = jnp.maximum(jnp.sum(present_B), 1) if num_sequences is None else num_sequences
    return jnp.sum(jnp.where(present_B, seq_B, 0.0)) / count


def kl_to_reference(logp, ref_logp, estimator: str = "k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs (Schulman's
    estimators, as the reference names them), with d = ref_logp - logp:

        k1 = -d                       ("kl": unbiased, high variance, can be negative)
        k2 = d^2 / 2                  ("mse")
        k3 = exp(d) - d - 1           ("low_var_kl", GRPO's: unbiased, >= 0; d clamped to [-20, 20]
                                       and k3 to [-10, 10], as the reference does)
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r} is not one of {KL_ESTIMATORS}")
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    d = jnp.clip(d, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.28,
                clip_c: float | None = None, agg_mode: str = "token-mean", ref_logp=None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", entropy=None, entropy_coef: float = 0.0, num_tokens=None,
                num_sequences=None, norm_constant=None, weights=None):
    """(loss to minimise, metrics) for [batch, length] log-probs of the sampled tokens.

    Per token, with delta = logp - old_logp, r = exp(delta) and advantage A (per sequence [B] or
    per token [B, T]):

        L1 = -A r,   L2 = -A clip(r, 1 - clip_low, 1 + clip_high),   L = max(L1, L2)
        dual clip (clip_c = c > 1), for A < 0 only:  L = min(L, -A c)

    then `aggregate`d by agg_mode (delta is clamped to [-20, 20] as the reference does). Optional
    GRPO terms: + kl_coef * aggregate(KL) with KL = `kl_to_reference(logp, ref_logp, kl_estimator)`
    (GRPO's beta * KL(pi_theta || pi_ref), k3 by default), and - entropy_coef * aggregate(entropy).
    num_tokens / num_sequences / norm_constant: see `aggregate`. `weights` (per token, e.g.
    `train_step.loss_weights`) replaces the aggregation: every term is sum(term x weights) over the
    masked tokens, which is how packed rows and micro-batches keep the mini-batch's aggregation.

    Metrics (means over the masked tokens): clip_frac (the clip is active, L2 > L1),
    clip_frac_high (clipped at 1 + clip_high with A > 0), clip_frac_low (clipped at 1 - clip_low
    with A < 0), dual_clip_frac (A < 0 and the dual clip is active), approx_kl = mean(-delta)
    (KL to the old policy), token_prob = mean(exp(logp)), entropy (when given), ref_kl (the KL
    estimate, when ref_logp is given).
    """
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"clip_c={clip_c}: the dual-clip constant must be > 1 (the reference uses 3 to 10)")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low={clip_low}, clip_high={clip_high}: clip ranges must be >= 0")
    logp, old_logp = jnp.asarray(logp, jnp.float32), jnp.asarray(old_logp, jnp.float32)
    mask = jnp.asarray(mask).astype(jnp.float32)
    advantages = jnp.asarray(advantages, jnp.float32)
    A_BxT = advantages[:, None] if advantages.ndim == 1 else advantages
    # Masked positions are zeroed before any arithmetic: a NaN there would otherwise reach the
    # gradient through 0 * NaN in the backward pass even though the forward pass masks it out.
    valid = mask > 0
    A_BxT = jnp.where(valid, jnp.broadcast_to(A_BxT, logp.shape), 0.0)

    # Clamped as in the reference: a ratio of exp(88) would overflow, and 0 * inf in the backward
    # pass of a clipped token would turn the whole update's gradient into NaN.
    delta = jnp.clip(jnp.where(valid, logp - old_logp, 0.0), -20.0, 20.0)
    ratio = jnp.exp(delta)
    loss_unclipped = -A_BxT * ratio
    loss_clipped = -A_BxT * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_BxT = jnp.maximum(loss_unclipped, loss_clipped)
    dual_active = jnp.zeros_like(loss_BxT, dtype=bool)
    if clip_c is not None:
        dual_bound = -A_BxT * clip_c
        dual_active = (A_BxT < 0) & (loss_BxT > dual_bound)
        loss_BxT = jnp.where(A_BxT < 0, jnp.minimum(loss_BxT, dual_bound), loss_BxT)

    counts = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_constant=norm_constant)

    def agg(x):
        if weights is None:
            return aggregate(x, mask, agg_mode, **counts)
        return _masked_sum(x * jnp.asarray(weights, jnp.float32), mask)
    loss = agg(loss_BxT)
    denominator = num_tokens  # metrics are token means over the same tokens as token-mean
    metrics = {
        "pg_loss": loss,
        "clip_frac": _masked_mean((loss_clipped > loss_unclipped).astype(jnp.float32), mask, denominator),
        "clip_frac_high": _masked_mean(((A_BxT > 0) & (ratio > 1.0 + clip_high)).astype(jnp.float32), mask,
                                       denominator),
        "clip_frac_low": _masked_mean(((A_BxT < 0) & (ratio < 1.0 - clip_low)).astype(jnp.float32), mask,
                                      denominator),
        "dual_clip_frac": _masked_mean(dual_active.astype(jnp.float32), mask, denominator),
        "approx_kl": _masked_mean(-delta, mask, denominator),
        "token_prob": _masked_mean(jnp.exp(logp), mask, denominator),
    }
    if ref_logp is not None:
        ref_logp = jnp.where(valid, jnp.asarray(ref_logp, jnp.float32), logp)  # masked positions: KL 0
        kl = kl_to_reference(logp, ref_logp, kl_estimator)
        metrics["ref_kl"] = _masked_mean(kl, mask, denominator)
        if kl_coef:
            loss = loss + kl_coef * agg(kl)
    elif kl_coef:
        raise ValueError("kl_coef > 0 needs ref_logp (log-probs of the reference policy)")
    if entropy is not None:
        entropy = jnp.asarray(entropy, jnp.float32)
        metrics["entropy"] = _masked_mean(entropy, mask, denominator)
        if entropy_coef:
            loss = loss - entropy_coef * agg(entropy)
    elif entropy_coef:
        raise ValueError("entropy_coef > 0 needs the per-token entropy of the current policy")
    metrics["loss"] = loss
    return loss, metrics


def token_logprobs_and_entropy(logits_BxTxV, targets_BxT):
    """log p(target) and the entropy of each position's distribution, in float32."""
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_BxTxV) * logp_BxTxV, axis=-1)
    return target_logp, entropy


LOGPROB_CHUNK = 512  # positions per block of logits in `chunked_logprobs_and_entropy`


def chunked_logprobs_and_entropy(hidden_BxTxE, head_VxE, targets_BxT, *, temperature: float = 1.0,
                                 chunk: int = LOGPROB_CHUNK, compute_dtype=None):
    """`token_logprobs_and_entropy(hidden @ head^T / temperature, targets)` without the [B, T, V] logits.

    Positions go through the vocabulary head `chunk` at a time in a scan whose body is
    rematerialised: the forward pass keeps one chunk's [B, chunk, V] float32 logits, and the
    backward pass recomputes each chunk's logits from its hidden states instead of storing them.
    At Qwen's 151,936-token vocabulary and 22.5k positions that is the difference between ~13 GiB
    and ~0.3 GiB per sequence.
    """
    B, T, E = hidden_BxTxE.shape
    chunk = min(chunk, T)
    padded = -(-T // chunk) * chunk
    if padded != T:
        hidden_BxTxE = jnp.pad(hidden_BxTxE, ((0, 0), (0, padded - T), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, padded - T)))
    n = padded // chunk
    head_VxE = head_VxE if compute_dtype is None else head_VxE.astype(compute_dtype)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def one_chunk(hidden_BxCxE, targets_BxC):
        logits_BxCxV = jnp.einsum("bce,ve->bcv", hidden_BxCxE, head_VxE, preferred_element_type=jnp.float32)
        logits_BxCxV = sharding.constrain(logits_BxCxV / temperature, ("batch", "length", "vocab"))
        return token_logprobs_and_entropy(logits_BxCxV, targets_BxC)

    def step(_, xs):
        return None, one_chunk(*xs)

    chunks = (hidden_BxTxE.reshape(B, n, chunk, E).swapaxes(0, 1), targets_BxT.reshape(B, n, chunk).swapaxes(0, 1))
    _, (logp_NxBxC, entropy_NxBxC) = jax.lax.scan(step, None, chunks)
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, padded)[:, :T]  # noqa: E731
    return unchunk(logp_NxBxC), unchunk(entropy_NxBxC)
