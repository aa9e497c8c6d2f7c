"""The pure update step: log-probs under the current policy, the policy loss, AdamW.

One call trains on one rollout batch:

    rollout batch [N rows] -> M mini-batches (one optimizer update each, in order)
      mini-batch -> K micro-batches (gradients summed; only one micro-batch's activations live)

Every micro-batch's loss is divided by the *mini-batch's* token count (or sequence count), so the
micro-batch losses and gradients add up to exactly those of the whole mini-batch: token-mean stays a
true mean over the mini-batch's tokens however it is split (the reference averages per-micro-batch
means instead, which weights tokens unequally).

Batch layout, all [N, L] unless noted, rows = prompt + response:
    tokens          int32, prompt left-padded, response right-padded
    attention_mask  1 on real tokens
    loss_mask       1 on the response tokens the loss is taken over (0 for filtered rows)
    old_logp        log pi_old(tokens[t] | tokens[<t]); the value at t pairs with tokens[t]
    advantages      [N] or [N, L]
    ref_logp        optional: log pi_ref(tokens[t] | tokens[<t]) under the reference policy, for the KL penalty
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from dapo_jax import algorithm, sharding
from dapo_jax.models import qwen2
from dapo_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The policy-loss settings (DAPO defaults; GRPO: clip_high=0.2, agg_mode="seq-mean-token-mean")."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float | None = None  # dual clip for negative advantages; the public DAPO script uses 10
    agg_mode: str = "token-mean"
    kl_coef: float = 0.0  # GRPO's beta: the batch must then carry ref_logp
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    norm_constant: float | None = None  # seq-mean-token-sum-norm's divisor: the maximum response length
    temperature: float = 1.0  # the rollouts' sampling temperature: log-probs use logits / temperature

    def __post_init__(self):
        if self.agg_mode not in algorithm.AGG_MODES:
            raise ValueError(f"agg_mode={self.agg_mode!r} is not one of {algorithm.AGG_MODES}")
        if self.clip_c is not None and self.clip_c <= 1.0:
            raise ValueError(f"clip_c={self.clip_c} must be > 1 (or None to turn the dual clip off)")
        if self.agg_mode == "seq-mean-token-sum-norm" and not self.norm_constant:
            raise ValueError("agg_mode='seq-mean-token-sum-norm' divides by a constant: set norm_constant to the "
                             "maximum response length (rows here also hold the prompt, so their width is not it)")
        if self.kl_estimator not in algorithm.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} is not one of {algorithm.KL_ESTIMATORS}")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (the sampling temperature of the rollouts)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW as in the paper: constant lr after a linear warm-up counted in rollout steps."""

    learning_rate: float = 1e-6
    warmup_steps: int = 20  # rollout steps (the public script uses 10)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def learning_rate_schedule(cfg: OptimizerConfig, updates_per_step: int) -> Callable:
    """lr at optimizer update `count`: ramps to its peak over the first warmup_steps rollout steps
    (each of `updates_per_step` updates), lr * min(1, (rollout_step + 1) / warmup), then constant."""
    def schedule(count):
        if cfg.warmup_steps <= 0:
            return jnp.asarray(cfg.learning_rate, jnp.float32)
        rollout_step = count // updates_per_step
        return cfg.learning_rate * jnp.minimum(1.0, (rollout_step + 1) / cfg.warmup_steps)
    return schedule


def make_optimizer(cfg: OptimizerConfig, updates_per_step: int) -> optax.GradientTransformation:
    """clip_by_global_norm, then AdamW with `learning_rate_schedule`.

    The schedule counts applied updates, so a skipped (non-finite) update delays the ramp by one.
    """
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg, updates_per_step), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay),
    )


@flax.struct.dataclass
class TrainState:
    params: dict
    opt_state: optax.OptState
    step: jax.Array  # rollout steps trained on
    updates: jax.Array  # optimizer updates applied
    skipped: jax.Array  # updates skipped because the loss or a gradient was not finite


def _opt_state_shardings(params, optimizer: optax.GradientTransformation):
    """Each moment sharded like its parameter, scalars replicated (params: arrays or ShapeDtypeStructs
    placed on a mesh)."""
    replicated = NamedSharding(sharding.mesh_of(params), PartitionSpec())
    return optax.tree_map_params(
        optimizer, lambda _, param_sharding: param_sharding, jax.eval_shape(optimizer.init, params),
        jax.tree_util.tree_map(lambda x: x.sharding, params), transform_non_params=lambda _: replicated)


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """The optimizer state created in place: each moment sharded like its parameter, scalars replicated.

    (`zeros_like` inside jit does not inherit its input's sharding, so the layout is spelled out.)
    """
    mesh = sharding.mesh_of(params)
    if mesh is None:
        opt_state, place = jax.jit(optimizer.init)(params), lambda x: x
    else:
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_state = jax.jit(optimizer.init, out_shardings=_opt_state_shardings(params, optimizer))(params)
        place = lambda x: jax.device_put(x, replicated)  # noqa: E731
    counters = [place(jnp.zeros((), jnp.int32)) for _ in range(3)]  # distinct buffers: the state is donated
    return TrainState(params, opt_state, *counters)


def abstract_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """The train state as ShapeDtypeStructs with their shardings, for `params` given the same way
    (compiling ahead of time, e.g. for a TPU topology this machine does not have)."""
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_shapes,
                                       _opt_state_shardings(params, optimizer))
    counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(sharding.mesh_of(params), PartitionSpec()))
    return TrainState(params, opt_state, counter, counter, counter)


def token_logprobs(config: Qwen2Config, params, tokens_BxL, attention_mask_BxL, temperature: float = 1.0,
                   segment_ids_BxL=None, positions_BxL=None):
    """(log p(tokens[t] | tokens[<t]), entropy of that distribution), [B, L] float32; column 0 is 0.

    p is softmax(logits / temperature): the distribution the rollouts were sampled from (before any
    top-k/top-p truncation), as the reference computes it. The logits are never materialised whole:
    they are computed from the final hidden states a chunk of positions at a time
    (`algorithm.chunked_logprobs_and_entropy`). A packed row gives its segment ids and per-segment
    positions (default: one sequence after left padding).
    """
    inputs = lambda x: None if x is None else x[:, :-1]  # noqa: E731
    positions = inputs(positions_BxL) if positions_BxL is not None else \
        qwen2.positions_from_mask(attention_mask_BxL[:, :-1])
    hidden_BxLxE, _ = Qwen2ForCausalLM(config).apply({"params": params}, tokens_BxL[:, :-1], positions,
                                                     attention_mask_BxL[:, :-1], segment_ids_BxT=inputs(segment_ids_BxL),
                                                     return_hidden=True)
    logp, entropy = algorithm.chunked_logprobs_and_entropy(hidden_BxLxE, qwen2.vocab_head(config, params),
                                                           tokens_BxL[:, 1:], temperature=temperature,
                                                           compute_dtype=config.compute_dtype)
    pad = ((0, 0), (1, 0))
    return jnp.pad(logp, pad), jnp.pad(entropy, pad)


def check_batch(batch: dict, num_minibatches: int, num_microbatches: int, mesh=None) -> None:
    """Fail before compiling when the batch cannot be split as asked."""
    required = ("tokens", "attention_mask", "loss_mask", "old_logp", "advantages")
    missing = [k for k in required if k not in batch]
    if missing:
        raise ValueError(f"train batch lacks {missing}; it needs {list(required)} (and optionally ref_logp)")
    n, length = batch["tokens"].shape
    for key in ("attention_mask", "loss_mask", "old_logp") + (("ref_logp",) if "ref_logp" in batch else ()):
        if batch[key].shape != (n, length):
            raise ValueError(f"batch[{key!r}] has shape {batch[key].shape}, tokens have {(n, length)}")
    if n % (num_minibatches * num_microbatches):
        raise ValueError(f"{n} rows do not split into {num_minibatches} mini-batches x {num_microbatches} "
                         f"micro-batches; use a row count that is a multiple of {num_minibatches * num_microbatches}")
    rows = n // (num_minibatches * num_microbatches)
    shards = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if rows % shards:
        raise ValueError(f"micro-batches of {rows} rows do not split over the {shards} data-parallel devices; "
                         f"make rows per micro-batch a multiple of {shards} (fewer micro-batches or more rows)")


def make_train_step(config: Qwen2Config, loss_config: LossConfig, optimizer: optax.GradientTransformation, *,
                    num_minibatches: int, num_microbatches: int = 1, mesh=None) -> Callable:
    """A jitted `train_step(state, batch) -> (state, metrics)` over one rollout batch.

    metrics are means over the step's optimizer updates, plus `updates_skipped` (non-finite loss or
    gradient: parameters and optimizer state left untouched) and `empty_minibatches` (no token to
    train on). The state's buffers are donated: keep using the returned state, not the one passed in.
    """
    lc = loss_config

    def microbatch_loss(params, micro, num_tokens, num_sequences):
        logp, entropy = token_logprobs(config, params, micro["tokens"], micro["attention_mask"], lc.temperature)
        return algorithm.policy_loss(
            logp, micro["old_logp"], micro["advantages"], micro["loss_mask"], clip_low=lc.clip_low,
            clip_high=lc.clip_high, clip_c=lc.clip_c, agg_mode=lc.agg_mode, ref_logp=micro.get("ref_logp"),
            kl_coef=lc.kl_coef, kl_estimator=lc.kl_estimator, entropy=entropy, entropy_coef=lc.entropy_coef, num_tokens=num_tokens,
            num_sequences=num_sequences, norm_constant=lc.norm_constant)

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def one_update(state: TrainState, minibatch):
        """One optimizer update from a mini-batch given as [K, rows, ...] micro-batches."""
        loss_mask = minibatch["loss_mask"].astype(jnp.float32)
        num_tokens = jnp.sum(loss_mask)
        num_sequences = jnp.sum(jnp.any(loss_mask > 0, axis=-1))

        def accumulate(grads, micro):
            micro = {k: sharding.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in micro.items()}
            (_, metrics), micro_grads = grad_fn(state.params, micro, jnp.maximum(num_tokens, 1.0),
                                                jnp.maximum(num_sequences, 1))
            return jax.tree_util.tree_map(jnp.add, grads, micro_grads), metrics

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        grads, micro_metrics = jax.lax.scan(accumulate, zeros, minibatch)
        # Each micro-batch's metrics are sums over its tokens divided by the mini-batch's count.
        metrics = jax.tree_util.tree_map(lambda m: jnp.sum(m, axis=0), micro_metrics)
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        apply = finite & (num_tokens > 0)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
        state = state.replace(params=jax.tree_util.tree_map(keep, params, state.params),
                              opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state),
                              updates=state.updates + apply, skipped=state.skipped + ~finite)
        metrics.update(grad_norm=optax.tree.norm(grads), updates_skipped=(~finite).astype(jnp.float32),
                       empty_minibatches=(num_tokens == 0).astype(jnp.float32), tokens=num_tokens,
                       updates_applied=apply.astype(jnp.float32))
        return state, metrics

    def train_step(state: TrainState, batch: dict):
        # [N, ...] -> [M, K, rows, ...]: mini-batch m, micro-batch k hold consecutive rows.
        batch = {k: jnp.asarray(v).reshape(num_minibatches, num_microbatches, -1, *v.shape[1:])
                 for k, v in batch.items()}
        state, metrics = jax.lax.scan(one_update, state, batch)
        # Means over the applied updates only: a skipped update's NaN loss or an empty mini-batch's
        # zeros would otherwise distort the step's figures (both are counted separately).
        applied = metrics["updates_applied"]
        summed = ("updates_skipped", "empty_minibatches", "tokens", "updates_applied")
        metrics = {k: jnp.sum(v) if k in summed else
                   jnp.sum(jnp.where(applied > 0, v, 0.0)) / jnp.maximum(jnp.sum(applied), 1.0)
                   for k, v in metrics.items()}
        return state.replace(step=state.step + 1), metrics

    if mesh is None:
        single = jax.jit(train_step, donate_argnums=0)

        def run(state: TrainState, batch: dict):
            check_batch(batch, num_minibatches, num_microbatches)
            return single(state, batch)

        run.jitted = lambda state, batch: single
        return run

    # On a mesh the layouts are fixed: the state keeps the shardings it was created with (params by
    # the logical-axis rules, optimizer moments like their params), batch rows are split over the
    # data-parallel axes, metrics are replicated.
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    compiled: dict = {}

    def jitted(state: TrainState, batch: dict):
        """The jitted step for this state's layout and these batch keys (`.lower(state, batch)` compiles
        it ahead of time from ShapeDtypeStructs)."""
        key = tuple(sorted(batch))  # with or without ref_logp
        if key not in compiled:
            state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
            compiled[key] = jax.jit(
                train_step, donate_argnums=0,
                in_shardings=(state_shardings, {k: rows for k in batch}),
                out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())))
        return compiled[key]

    def run(state: TrainState, batch: dict):
        check_batch(batch, num_minibatches, num_microbatches, mesh)
        batch = {k: v if isinstance(v, jax.Array) else sharding.host_to_global(np.asarray(v), rows)
                 for k, v in batch.items()}
        with jax.set_mesh(mesh):
            return jitted(state, batch)(state, batch)

    run.jitted = jitted
    return run
