"""The pure update step: log-probs under the current policy, the policy loss, AdamW.

One call trains on one rollout batch, given as M mini-batches of up to K micro-batches:

    rollout batch -> M mini-batches (one optimizer update each, in order)
      mini-batch -> its micro-batches (gradients summed; only one micro-batch's activations live)

Rows hold sequences (prompt + answer): one per row, left-padded (`from_rows`), or several packed one
after another (`dapo_jax.packing`), told apart by segment ids. Every token carries its weight in the
mini-batch's loss (`loss_weights`: 1 / the mini-batch's token count for token-mean, 1 / (its
sequence's tokens x the mini-batch's sequences) for seq-mean-token-mean, ...), so the micro-batch
losses and gradients add up to exactly those of the whole mini-batch however it is split or packed
(the reference averages per-micro-batch means instead, which weights tokens unequally).

Batch layout, [M, K, R, W] unless noted (R rows of W tokens per micro-batch):
    tokens          int32
    segment_ids     int32: 1, 2, ... per sequence in its row; 0 on padding
    positions       int32: each token's position within its own sequence
    loss_mask       1 on the answer tokens the loss is taken over (0 for filtered answers)
    old_logp        log pi_old(tokens[t] | tokens[<t]); the value at t pairs with tokens[t]
    advantages      float32, each token its sequence's advantage
    loss_weights    float32, each loss token's weight in its mini-batch's loss (`loss_weights`)
    ref_logp        optional: log pi_ref(tokens[t] | tokens[<t]) under the reference policy, for the KL penalty
    num_tokens      [M] float32: loss tokens per mini-batch (the metrics' denominators)
    micro_batches   [M] int32: the micro-batches in use per mini-batch (the rest are not computed)
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
    hidden_BxLxE, _ = Qwen2ForCausalLM(config).apply(
        {"params": params}, tokens_BxL[:, :-1], positions, attention_mask_BxL[:, :-1],
        segment_ids_BxT=inputs(segment_ids_BxL), return_hidden=True)
    logp, entropy = algorithm.chunked_logprobs_and_entropy(hidden_BxLxE, qwen2.vocab_head(config, params),
                                                           tokens_BxL[:, 1:], temperature=temperature,
                                                           compute_dtype=config.compute_dtype)
    pad = ((0, 0), (1, 0))
    return jnp.pad(logp, pad), jnp.pad(entropy, pad)


ROW_KEYS = ("tokens", "segment_ids", "positions", "loss_mask", "old_logp", "advantages", "loss_weights")


def loss_weights(loss_mask, sequence_ids, agg_mode: str, norm_constant: float | None = None) -> np.ndarray:
    """Each token's weight in one mini-batch's loss (float32, 0 off the loss mask), so that the
    aggregated loss is sum(per-token loss x weight):

        token-mean               1 / (loss tokens of the mini-batch)
        seq-mean-token-mean      1 / (loss tokens of its sequence x sequences of the mini-batch)
        seq-mean-token-sum       1 / (sequences of the mini-batch)
        seq-mean-token-sum-norm  1 / norm_constant

    `sequence_ids` (same shape) names each token's sequence; sequences count when they have a loss token.
    """
    mask = np.asarray(loss_mask) > 0
    if agg_mode not in algorithm.AGG_MODES:
        raise ValueError(f"agg_mode={agg_mode!r} is not one of {algorithm.AGG_MODES}")
    if agg_mode == "token-mean":
        return (mask / max(mask.sum(), 1)).astype(np.float32)
    if agg_mode == "seq-mean-token-sum-norm":
        if not norm_constant:
            raise ValueError("seq-mean-token-sum-norm needs norm_constant (the maximum response length)")
        return (mask / norm_constant).astype(np.float32)
    ids = np.asarray(sequence_ids)[mask]
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    out = np.zeros(mask.shape, np.float64)
    sequences = max(len(counts), 1)  # a mini-batch with no loss token has no weights at all
    per_token = 1.0 / sequences if agg_mode == "seq-mean-token-sum" else 1.0 / (counts[inverse] * sequences)
    out[mask] = per_token
    return out.astype(np.float32)


def from_rows(batch: dict, num_minibatches: int, num_microbatches: int, loss_config: LossConfig) -> dict:
    """The step's batch from [N, L] rows that each hold one left-padded sequence (tokens,
    attention_mask, loss_mask, old_logp, advantages [N] or [N, L], optional ref_logp): mini-batch m,
    micro-batch k hold consecutive rows."""
    missing = [k for k in ("tokens", "attention_mask", "loss_mask", "old_logp", "advantages") if k not in batch]
    if missing:
        raise ValueError(f"train batch lacks {missing}; rows need tokens, attention_mask, loss_mask, old_logp, "
                         f"advantages (and optionally ref_logp)")
    tokens = np.asarray(batch["tokens"])
    n, length = tokens.shape
    for key in ("attention_mask", "loss_mask", "old_logp") + (("ref_logp",) if "ref_logp" in batch else ()):
        if np.shape(batch[key]) != (n, length):
            raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, tokens have {(n, length)}")
    M, K = num_minibatches, num_microbatches
    if n % (M * K):
        raise ValueError(f"{n} rows do not split into {M} mini-batches x {K} micro-batches; use a row count that "
                         f"is a multiple of {M * K}")
    mask = np.asarray(batch["attention_mask"]).astype(np.int32)
    advantages = np.asarray(batch["advantages"], np.float32)
    loss_mask = np.asarray(batch["loss_mask"])
    rows_per_minibatch = n // M
    weights = np.concatenate([
        loss_weights(loss_mask[m * rows_per_minibatch:(m + 1) * rows_per_minibatch],
                     np.repeat(np.arange(rows_per_minibatch)[:, None], length, axis=1), loss_config.agg_mode,
                     loss_config.norm_constant) for m in range(M)])
    out = {"tokens": tokens.astype(np.int32), "segment_ids": mask,
           "positions": np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32),
           "loss_mask": loss_mask.astype(np.float32), "old_logp": np.asarray(batch["old_logp"], np.float32),
           "advantages": np.broadcast_to(advantages[:, None] if advantages.ndim == 1 else advantages, (n, length)),
           "loss_weights": weights}
    if "ref_logp" in batch:
        out["ref_logp"] = np.asarray(batch["ref_logp"], np.float32)
    out = {k: np.ascontiguousarray(v).reshape(M, K, n // (M * K), length) for k, v in out.items()}
    out["num_tokens"] = (loss_mask.reshape(M, -1) > 0).sum(axis=1).astype(np.float32)
    out["micro_batches"] = np.full((M,), K, np.int32)
    return out


def batch_shapes(minibatches: int, microbatches: int, rows: int, width: int, *, ref_logp: bool = False,
                 row_sharding=None, replicated=None) -> dict:
    """ShapeDtypeStructs of a step's batch (compiling ahead of time)."""
    shape = (minibatches, microbatches, rows, width)
    ints = ("tokens", "segment_ids", "positions")
    keys = ROW_KEYS + (("ref_logp",) if ref_logp else ())
    out = {k: jax.ShapeDtypeStruct(shape, jnp.int32 if k in ints else jnp.float32, sharding=row_sharding)
           for k in keys}
    out["num_tokens"] = jax.ShapeDtypeStruct((minibatches,), jnp.float32, sharding=replicated)
    out["micro_batches"] = jax.ShapeDtypeStruct((minibatches,), jnp.int32, sharding=replicated)
    return out


def check_batch(batch: dict, mesh=None) -> None:
    """Fail before compiling when the batch is not a step's batch or cannot split over the mesh."""
    missing = [k for k in ROW_KEYS + ("num_tokens", "micro_batches") if k not in batch]
    if missing:
        raise ValueError(f"train batch lacks {missing}; build it with train_step.from_rows or dapo_jax.packing")
    shape = np.shape(batch["tokens"])
    if len(shape) != 4:
        raise ValueError(f"batch['tokens'] has shape {shape}; a step's batch is [mini-batches, micro-batches, rows, "
                         f"tokens] (train_step.from_rows builds it from [rows, tokens])")
    for key in ROW_KEYS[1:] + (("ref_logp",) if "ref_logp" in batch else ()):
        if np.shape(batch[key]) != shape:
            raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, tokens have {shape}")
    counts = np.asarray(batch["micro_batches"])
    if counts.shape != shape[:1] or np.any(counts < 0) or np.any(counts > shape[1]):
        raise ValueError(f"micro_batches {counts.tolist()} must give 0..{shape[1]} micro-batches for each of the "
                         f"{shape[0]} mini-batches")
    shards = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if shape[2] % shards:
        raise ValueError(f"micro-batches of {shape[2]} rows do not split over the {shards} data-parallel devices; "
                         f"make rows per micro-batch a multiple of {shards} (fewer micro-batches or more rows)")


def make_train_step(config: Qwen2Config, loss_config: LossConfig, optimizer: optax.GradientTransformation, *,
                    num_minibatches: int, num_microbatches: int = 1, mesh=None) -> Callable:
    """A jitted `train_step(state, batch) -> (state, metrics)` over one rollout batch.

    `batch` is the step's batch (see the module docstring), or [N, L] rows of one sequence each, which
    `from_rows` splits into num_minibatches x num_microbatches. metrics are means over the step's
    optimizer updates, plus `updates_skipped` (non-finite loss or gradient: parameters and optimizer
    state left untouched) and `empty_minibatches` (no token to train on). The state's buffers are
    donated: keep using the returned state, not the one passed in.
    """
    lc = loss_config

    def microbatch_loss(params, micro, num_tokens):
        logp, entropy = token_logprobs(config, params, micro["tokens"], (micro["segment_ids"] > 0).astype(jnp.int32),
                                       lc.temperature, micro["segment_ids"], micro["positions"])
        return algorithm.policy_loss(
            logp, micro["old_logp"], micro["advantages"], micro["loss_mask"], clip_low=lc.clip_low,
            clip_high=lc.clip_high, clip_c=lc.clip_c, agg_mode=lc.agg_mode, ref_logp=micro.get("ref_logp"),
            kl_coef=lc.kl_coef, kl_estimator=lc.kl_estimator, entropy=entropy, entropy_coef=lc.entropy_coef,
            num_tokens=num_tokens, weights=micro["loss_weights"])

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)
    rows_keys = ROW_KEYS + (("ref_logp",) if lc.kl_coef else ())

    def one_update(state: TrainState, minibatch):
        """One optimizer update from a mini-batch's micro-batches ([K, R, W] each, the first
        `micro_batches` of them in use: a while loop, so unused ones cost nothing)."""
        num_tokens = minibatch["num_tokens"]
        micro_count = minibatch["micro_batches"]
        rows = {k: v for k, v in minibatch.items() if v.ndim == 3}

        def accumulate(k, carry):
            grads, metrics = carry
            micro = {key: sharding.constrain(jax.lax.dynamic_index_in_dim(v, k, keepdims=False), ("batch", None))
                     for key, v in rows.items()}
            (_, micro_metrics), micro_grads = grad_fn(state.params, micro, jnp.maximum(num_tokens, 1.0))
            return (jax.tree_util.tree_map(jnp.add, grads, micro_grads),
                    jax.tree_util.tree_map(jnp.add, metrics, micro_metrics))

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        metric_shapes = jax.eval_shape(lambda p, m: grad_fn(p, m, 1.0)[0][1], state.params,
                                       {k: v[0] for k, v in rows.items()})
        no_metrics = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), metric_shapes)
        # Each micro-batch's loss and metrics are sums over its tokens weighted for the whole mini-batch.
        grads, metrics = jax.lax.fori_loop(0, micro_count, accumulate, (zeros, no_metrics))
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
        batch = {k: v for k, v in batch.items() if k in rows_keys + ("num_tokens", "micro_batches")}
        state, metrics = jax.lax.scan(one_update, state, batch)
        # Means over the applied updates only: a skipped update's NaN loss or an empty mini-batch's
        # zeros would otherwise distort the step's figures (both are counted separately).
        applied = metrics["updates_applied"]
        summed = ("updates_skipped", "empty_minibatches", "tokens", "updates_applied")
        metrics = {k: jnp.sum(v) if k in summed else
                   jnp.sum(jnp.where(applied > 0, v, 0.0)) / jnp.maximum(jnp.sum(applied), 1.0)
                   for k, v in metrics.items()}
        return state.replace(step=state.step + 1), metrics

    def prepare(batch: dict) -> dict:
        if "segment_ids" not in batch:
            batch = from_rows(batch, num_minibatches, num_microbatches, lc)
        if lc.kl_coef and "ref_logp" not in batch:
            raise ValueError("the loss has a KL penalty (kl_coef > 0): the batch needs ref_logp")
        check_batch(batch, mesh)
        return {k: v for k, v in batch.items() if k in rows_keys + ("num_tokens", "micro_batches")}

    if mesh is None:
        single = jax.jit(train_step, donate_argnums=0)

        def run(state: TrainState, batch: dict):
            return single(state, prepare(batch))

        run.jitted = lambda state, batch: single
        return run

    # On a mesh the layouts are fixed: the state keeps the shardings it was created with (params by
    # the logical-axis rules, optimizer moments like their params), batch rows are split over the
    # data-parallel axes, metrics are replicated.
    rows = NamedSharding(mesh, PartitionSpec(None, None, ("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled: dict = {}

    def jitted(state: TrainState, batch: dict):
        """The jitted step for this state's layout and these batch keys (`.lower(state, batch)` compiles
        it ahead of time from ShapeDtypeStructs)."""
        key = tuple(sorted(batch))  # with or without ref_logp
        if key not in compiled:
            state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
            compiled[key] = jax.jit(
                train_step, donate_argnums=0,
                in_shardings=(state_shardings, {k: replicated if np.ndim(v) == 1 else rows for k, v in batch.items()}),
                out_shardings=(state_shardings, replicated))
        return compiled[key]

    def run(state: TrainState, batch: dict):
        batch = prepare(batch)
        batch = {k: v if isinstance(v, jax.Array) else
                 sharding.host_to_global(np.asarray(v), replicated if np.ndim(v) == 1 else rows)
                 for k, v in batch.items()}
        with jax.set_mesh(mesh):
            return jitted(state, batch)(state, batch)

    run.jitted = jitted
    return run
