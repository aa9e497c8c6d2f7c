"""Sampling: `generate` (on the rollout engine, `dapo_jax.engine`), the pieces that turn logits into
tokens, and the batch sampler the engine replaced (`generate_batched`, kept as its baseline):

Group rollouts: prefill each prompt once, copy its KV cache to G rows, decode in one jitted loop.

    prompts (left-padded to P) --prefill--> cache of P slots per row, logits of each prompt's last token
      --repeat G times--> cache of B*G rows x (P + N - 1) slots; sample token 0 of every row
      --while step < N and some row has not stopped--> feed token step-1, sample token step

Everything after the host-side padding runs inside one `jax.jit`; the loop is a `lax.while_loop`
that exits as soon as every row has emitted an end-of-sequence id, so a batch of short answers does
not pay for the longest possible one. It runs in segments whose attention span doubles (128, 256,
... new tokens), so early steps do not read the empty end of the cache. Spans are rounded up to
whole 64-byte rows of slots (`span_slots`): on XLA:CPU a decode step that read 287-slot rows took
~10% longer than one reading 288.

On a CPU host, `generate` may split the prompts over several such calls running side by side, one
per core (`host_threads`): XLA:CPU runs a small model's decode step on a single core.

Sampling is a chain of small pieces over the logits of each row: temperature, top-k, top-p, then one
categorical draw. The log-probability returned for each token is under that final (scaled,
truncated, renormalised) distribution; for greedy decoding (temperature 0) it is under the model's
own softmax.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax import sharding
from dapo_jax.models import qwen2
from dapo_jax.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. Hashable: it is a static argument of the jitted sampler."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1.0: no nucleus truncation (and no sort)
    top_k: int = 0  # 0: no top-k truncation
    eos_ids: tuple[int, ...] = ()
    num_samples: int = 1
    prompt_bucket: int = 32  # pad prompt length up to a multiple of this, to reuse compilations
    # How a decode step runs the layers: "scan" over stacked weights and cache (accelerators: the
    # slices fuse into the matmuls), "unrolled" over per-layer buffers (CPU: no per-step copies),
    # or "auto" for the right one on the current backend.
    layer_loop: str = "auto"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; ask for at least 1 new token")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; 1.0 turns nucleus sampling off")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0; 0 turns top-k off")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}; ask for at least 1 sample per prompt")
        if self.prompt_bucket < 1:
            raise ValueError(f"prompt_bucket={self.prompt_bucket} must be >= 1")
        if self.layer_loop not in ("auto", "scan", "unrolled"):
            raise ValueError(f"layer_loop={self.layer_loop!r}; use 'auto', 'scan' or 'unrolled'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass
class GenerateOutput:
    """One entry per (prompt, sample), prompt-major: row i*G + j is sample j of prompt i."""

    tokens: list[list[int]]  # generated ids, up to and including the end-of-sequence id
    logprobs: list[list[float]]  # log-probability of each generated id under the sampling distribution
    lengths: list[int]
    truncated: list[bool]  # stopped by max_new_tokens rather than by an end-of-sequence id
    decode_steps: int  # decode loop iterations, the most of any host thread (early exit: < max_new_tokens - 1)


# -- sampling pieces ------------------------------------------------------------------------------


def top_p_mask(sorted_logits_NxC, top_p: float):
    """Keep the nucleus: the smallest prefix of the (descending) candidates whose probability >= p.

    A candidate is kept when the probability of the candidates before it is still below p.
    """
    probs = jax.nn.softmax(sorted_logits_NxC, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.where(before < top_p, sorted_logits_NxC, -jnp.inf)


def categorical(uniform_Nx2, weights_NxC):
    """One draw per row in proportion to non-negative `weights` (unnormalised probabilities).

    Inverse CDF in two stages: the C candidates are cut into blocks of b ~ sqrt(C); the first
    uniform picks a block by its total weight, the second a candidate inside it,
    P(c) = P(block) * P(c | block). Two uniforms per row replace the C random numbers of Gumbel-max.
    """
    N, C = weights_NxC.shape
    b = 1 << max(0, math.ceil(math.log2(math.sqrt(C))))
    n_blocks = -(-C // b)
    weights_NxBxb = jnp.pad(weights_NxC, ((0, 0), (0, n_blocks * b - C))).reshape(N, n_blocks, b)
    u_Nx2 = 1.0 - uniform_Nx2  # in (0, 1]: a target of 0 could land on a zero-weight entry

    def first_reaching(cumulative, u):  # first index whose cumulative weight reaches u * total
        return jnp.minimum(jnp.sum(cumulative < u[:, None] * cumulative[:, -1:], axis=-1), cumulative.shape[-1] - 1)

    block_N = first_reaching(jnp.cumsum(weights_NxBxb.sum(-1), axis=-1), u_Nx2[:, 0])
    inner_Nxb = jnp.take_along_axis(weights_NxBxb, block_N[:, None, None], axis=1)[:, 0]
    return block_N * b + first_reaching(jnp.cumsum(inner_Nxb, axis=-1), u_Nx2[:, 1])


def sample_tokens(logits_NxV, uniform_Nx2, sampling: SamplingConfig):
    """(token ids [N], their log-probabilities [N]) from one row of logits and two uniforms each."""
    logits_NxV = logits_NxV.astype(jnp.float32)
    if sampling.greedy:
        token_N = jnp.argmax(logits_NxV, axis=-1)
        logprob_N = jnp.take_along_axis(jax.nn.log_softmax(logits_NxV), token_N[:, None], axis=-1)[:, 0]
        return token_N.astype(jnp.int32), logprob_N
    scaled_NxV = logits_NxV / sampling.temperature
    candidate_ids = None
    if sampling.top_k and sampling.top_k < scaled_NxV.shape[-1]:
        candidates, candidate_ids = jax.lax.top_k(scaled_NxV, sampling.top_k)  # sorted descending
    elif sampling.top_p < 1.0:
        candidate_ids = jnp.argsort(-scaled_NxV, axis=-1)
        candidates = jnp.take_along_axis(scaled_NxV, candidate_ids, axis=-1)
    else:
        candidates = scaled_NxV
    if sampling.top_p < 1.0:
        candidates = top_p_mask(candidates, sampling.top_p)
    # One pass of exp: unnormalised weights for the draw, and log Z for the chosen token's log-prob.
    shift_N1 = jnp.max(candidates, axis=-1, keepdims=True)
    weights_NxC = jnp.exp(candidates - shift_N1)
    log_z_N = jnp.log(jnp.sum(weights_NxC, axis=-1))
    choice_N = categorical(uniform_Nx2, weights_NxC)
    logprob_N = jnp.take_along_axis(candidates - shift_N1, choice_N[:, None], axis=-1)[:, 0] - log_z_N
    token_N = choice_N if candidate_ids is None else jnp.take_along_axis(candidate_ids, choice_N[:, None], -1)[:, 0]
    return token_N.astype(jnp.int32), logprob_N


# -- the jitted sampler ---------------------------------------------------------------------------


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # index of the next token to sample
    tokens_NxM: jax.Array
    logprobs_NxM: jax.Array
    lengths_N: jax.Array
    done_N: jax.Array
    next_position_N: jax.Array  # position id of the token fed next
    key_mask_NxS: jax.Array  # cache slots holding real tokens
    cache: KVCache | list[KVCache]  # stacked, or one per layer (layer_loop="unrolled")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(config: Qwen2Config, sampling: SamplingConfig, params, prompt_BxP, prompt_mask_BxP, active_B, rng,
              first_row):
    model = Qwen2ForCausalLM(config)
    B, P = prompt_BxP.shape
    G, M = sampling.num_samples, sampling.max_new_tokens
    N = B * G
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)

    positions_BxP = qwen2.positions_from_mask(prompt_mask_BxP)
    hidden_BxPxE, cache = model.apply({"params": params}, prompt_BxP, positions_BxP, prompt_mask_BxP,
                                      KVCache.zeros(config, B, P), 0, return_hidden=True)
    last_logits_BxV = qwen2.project_to_vocab(config, qwen2.vocab_head(config, params), hidden_BxPxE[:, -1:])[:, 0]

    # The loop runs in segments whose attention span doubles (segment_ends), so a step reads at most
    # about twice the cache it has filled, not the whole preallocated length. Scanned layers
    # (accelerators) read a full-length cache through a slice that fuses into attention there;
    # unrolled layers (XLA:CPU, where that slice would be a copy at every step) get a cache that
    # holds exactly the span and grows between segments, one copy per segment.
    unrolled = sampling.layer_loop == "unrolled"
    ends = segment_ends(M)
    span_for = functools.partial(span_slots, config, P)  # the cache slots a segment up to `end` tokens reads
    slots = span_for(ends[0] if unrolled else M) - P

    # Each prompt's cache, copied to its G sample rows and extended with empty slots for the answer.
    def expand(cache: KVCache) -> KVCache:
        return KVCache(k=jnp.repeat(cache.k, G, axis=-4), v=jnp.repeat(cache.v, G, axis=-4)).pad(slots).constrain()

    if unrolled:
        layers = qwen2.unstack_layers(params)  # sliced once here, not at every step
        head_ExV = qwen2.vocab_head(config, params).T  # likewise transposed once
        cache = [expand(KVCache(k=cache.k[i], v=cache.v[i])) for i in range(len(layers))]

        def step_logits(tokens, positions, key_mask, cache, slot):
            return qwen2.apply_unrolled(config, params, layers, head_ExV, tokens, positions, key_mask, cache, slot)
    else:
        cache = expand(cache)

        def step_logits(tokens, positions, key_mask, cache, slot):
            return model.apply({"params": params}, tokens, positions, key_mask, cache, slot)
    key_mask_NxS = jnp.pad(jnp.repeat(prompt_mask_BxP, G, axis=0), ((0, 0), (0, span_for(M) - P)))
    # All the randomness of the generation, drawn at once (the loop then needs no RNG calls). Each
    # row's draws come from its index in the whole request, so a request split over several calls
    # (host_threads) samples the same tokens as one call.
    draws = lambda row: jax.random.uniform(jax.random.fold_in(rng, row), (M, 2))  # noqa: E731
    row_N = first_row + jnp.arange(N, dtype=jnp.int32)
    uniforms_MxNx2 = sharding.constrain(jax.vmap(draws, out_axes=1)(row_N), (None, "batch", None))
    token_N, logprob_N = sample_tokens(jnp.repeat(last_logits_BxV, G, axis=0), uniforms_MxNx2[0], sampling)

    row = lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
    state = DecodeState(
        step=jnp.array(1, jnp.int32),
        tokens_NxM=row(jnp.zeros((N, M), jnp.int32).at[:, 0].set(token_N)),
        logprobs_NxM=row(jnp.zeros((N, M), jnp.float32).at[:, 0].set(logprob_N)),
        lengths_N=row(jnp.ones((N,), jnp.int32)),
        done_N=row(jnp.isin(token_N, eos) | ~jnp.repeat(active_B, G)),  # filler rows start done
        next_position_N=row(jnp.repeat(prompt_mask_BxP.sum(axis=-1), G).astype(jnp.int32)),
        key_mask_NxS=row(key_mask_NxS),
        cache=cache,
    )

    def decode_one(s: DecodeState, span: int):
        """Feed token step-1, sample token step; attention reads only the first `span` cache slots."""
        slot = P + s.step - 1  # where the previous token's keys and values go
        fed_N = jax.lax.dynamic_index_in_dim(s.tokens_NxM, s.step - 1, axis=1, keepdims=False)
        key_mask = jax.lax.dynamic_update_index_in_dim(s.key_mask_NxS, jnp.ones((N,), s.key_mask_NxS.dtype), slot, 1)
        logits_Nx1xV, cache = step_logits(fed_N[:, None], s.next_position_N[:, None], key_mask[:, :span], s.cache,
                                          slot)
        uniform_Nx2 = jax.lax.dynamic_index_in_dim(uniforms_MxNx2, s.step, axis=0, keepdims=False)
        token_N, logprob_N = sample_tokens(logits_Nx1xV[:, 0], uniform_Nx2, sampling)
        live_N = ~s.done_N
        token_N = jnp.where(live_N, token_N, 0)
        logprob_N = jnp.where(live_N, logprob_N, 0.0)
        return DecodeState(
            step=s.step + 1,
            tokens_NxM=jax.lax.dynamic_update_index_in_dim(s.tokens_NxM, token_N, s.step, 1),
            logprobs_NxM=jax.lax.dynamic_update_index_in_dim(s.logprobs_NxM, logprob_N, s.step, 1),
            lengths_N=s.lengths_N + live_N,
            done_N=s.done_N | (live_N & jnp.isin(token_N, eos)),
            next_position_N=s.next_position_N + 1,
            key_mask_NxS=key_mask,
            cache=cache,
        )

    for previous, end in zip([ends[0]] + ends, ends):
        if unrolled and end > previous:
            state = state.replace(cache=[c.pad(span_for(end) - span_for(previous)).constrain() for c in state.cache])
        state = jax.lax.while_loop(lambda s, end=end: (s.step < end) & ~jnp.all(s.done_N),
                                   functools.partial(decode_one, span=span_for(end)), state)
    return state.tokens_NxM, state.logprobs_NxM, state.lengths_N, ~state.done_N, state.step - 1


def segment_ends(max_new_tokens: int, first: int = 128) -> list[int]:
    """Token counts at which the decode loop's attention span grows: 128, 256, 512, ..., max."""
    ends, end = [], first
    while end < max_new_tokens:
        ends.append(end)
        end *= 2
    return ends + [max_new_tokens]


def span_slots(config: Qwen2Config, prompt_len: int, new_tokens: int) -> int:
    """Cache slots for `new_tokens` sampled after a `prompt_len` prompt, rounded up so that a row of
    slots fills whole 64-byte cache lines (keys are stored [.., head_dim, slots]).

    The last sampled token is never fed back, so it needs no slot.
    """
    per_row = max(1, 64 // jnp.dtype(config.compute_dtype).itemsize)
    return -(-(prompt_len + new_tokens - 1) // per_row) * per_row


# Flops of the largest matmul in one call's decode step (2 x rows x weight size) under which splitting
# the prompts over the host's cores paid. Measured on 2 cores, two half-batch calls side by side
# against one call: the tiny model at batch 8 to 64 (0.5-4 MFLOP per call) 1.5-1.85x the tokens/s,
# hidden 256 / vocab 4096 at batch 8 (8 MFLOP) 1.2x, the 40.9M model at batch 64 (1 GFLOP, whose
# matmuls XLA:CPU already spreads over both cores) 0.74x.
SMALL_STEP_FLOPS = 2**25


def auto_host_threads(config: Qwen2Config, prompts: int, num_samples: int, slots: int = 0) -> int:
    """How many decode calls (or engines) `generate` runs side by side on a CPU host when not told
    (see host_threads).

    One per core, as long as each one's decode step (its share of the `slots`, or of every answer
    when 0) stays small enough that XLA:CPU would run it on a single core anyway; 1 on accelerators.
    """
    if jax.default_backend() != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(cores, prompts))
    widest = config.hidden_size * max(config.intermediate_size, config.vocab_size)
    rows = -(-slots // threads) if slots else -(-prompts // threads) * num_samples
    return threads if 2 * rows * widest < SMALL_STEP_FLOPS else 1


def _batch_multiple(mesh) -> int:
    """How many ways the batch is split on `mesh` (data x fsdp)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape.get(axis, 1) for axis in ("data", "fsdp"))


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, bucket: int, batch_multiple: int = 1,
                pad_id: int = 0):
    """Left-pad token lists into (tokens [B', P], mask [B', P], real-row flags [B']).

    B' rounds the number of prompts up to `batch_multiple` so that the batch splits evenly on a mesh.
    """
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // bucket) * bucket
    rows = -(-len(prompts) // batch_multiple) * batch_multiple
    tokens = np.full((rows, width), pad_id, np.int64)
    mask = np.zeros((rows, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    outside = (mask > 0) & ((tokens < 0) | (tokens >= vocab_size))
    if outside.any():
        i, j = np.argwhere(outside)[0]
        raise ValueError(f"prompt {i} has token id {tokens[i, j]} outside the vocabulary [0, {vocab_size})")
    tokens = tokens.astype(np.int32)
    for i in range(len(prompts), rows):  # filler rows (dropped from the output) hold one token
        mask[i, -1] = 1
    return tokens, mask, np.arange(rows) < len(prompts)


def generate(config: Qwen2Config, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] = (),
             num_samples: int = 1, seed: int = 0, mesh=None, prompt_bucket: int = 32,
             layer_loop: str = "auto", host_threads: int | None = None, slots: int = 0, segment: int = 16,
             pages: int = 0, page_size: int = 64, lanes: int = 1) -> GenerateOutput:
    """Sample `num_samples` continuations of every prompt (lists of token ids), on the rollout engine
    (`dapo_jax.engine`: continuous batching; `slots` rows decode at once, 0 = every answer at once,
    and as answers finish with no work left the busy rows are compacted into fewer).

    Runs on the mesh the params live on (or `mesh`), the rows split over its data and fsdp axes,
    reading the params in place. The same seed gives the same tokens, and sample j of prompt i the
    same tokens whatever the slots, threads or pages (up to float rounding of the logits in a batch
    of another size).

    On a single device, `host_threads` > 1 splits the prompts into that many contiguous shares and
    runs an engine for each side by side, each from its own thread (with its share of the slots and
    pages): XLA:CPU runs a small model's decode step on one core, so this is how a CPU host puts its
    other cores to work. None picks `auto_host_threads`. `segment` is the number of decode steps
    between admissions; `pages` > 0 caps the KV cache at a pool of that many pages of `page_size`
    tokens (see `dapo_jax.engine`); `lanes` = 2 gives long answers slots of their own, so the others'
    attention reads a shorter cache (contiguous caches on one device; 1 = one lane, the default).
    """
    from dapo_jax import engine

    sampling, mesh, threads = _request(config, params, prompts, max_new_tokens, temperature, top_p, top_k, eos_ids,
                                       num_samples, prompt_bucket, layer_loop, host_threads, mesh, slots, pages)
    params = sampling_layout(config, params, mesh)
    return engine.generate_on_engine(config, params, prompts, sampling, seed=seed, mesh=mesh, host_threads=threads,
                                     slots=slots, segment=segment, pages=pages, page_size=page_size,
                                     lanes=lanes)


def generate_stream(config: Qwen2Config, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] = (),
                    num_samples: int = 1, seed: int = 0, mesh=None, prompt_bucket: int = 32,
                    layer_loop: str = "auto", host_threads: int | None = None, slots: int = 0, segment: int = 16,
                    pages: int = 0, page_size: int = 64, lanes: int = 1):
    """`generate` as a stream: (i, [Result(tokens, logprobs, truncated)] * num_samples) for prompt i,
    in prompt order, each as soon as it and every earlier prompt are done. The same answers as
    `generate`. Stop iterating (or close the generator) and the engine stops: work not yet admitted
    is never decoded, which is how dynamic sampling ends a rollout once its batch is full.
    """
    from dapo_jax import engine

    sampling, mesh, threads = _request(config, params, prompts, max_new_tokens, temperature, top_p, top_k, eos_ids,
                                       num_samples, prompt_bucket, layer_loop, host_threads, mesh, slots, pages)
    return engine.stream_on_engine(config, sampling_layout(config, params, mesh), prompts, sampling, seed=seed,
                                   mesh=mesh, host_threads=threads, slots=slots, segment=segment, pages=pages,
                                   page_size=page_size, lanes=lanes)


def sampling_layout(config: Qwen2Config, params, mesh=None):
    """The params as the decode loop reads them: in the compute dtype (the model casts every weight
    to it before use, so no token changes) and, on a mesh, split over its tensor axis only, whole on
    every data-parallel device (`sharding.SAMPLING_RULES`), so that a decode step reads them in
    place where the training layout would all-gather the fsdp-split weights at every token.

    A copy made device to device (a cast, then one reshard); params already laid out so come back
    as they are. The training loop makes it once per rollout step and hands it to `generate`.
    """
    dtype = config.compute_dtype
    if any(layout_dtype(x.dtype, dtype) != x.dtype for x in jax.tree_util.tree_leaves(params)):
        params = _cast(params, dtype)
    if mesh is None:
        return params
    target = _sampling_shardings(config, mesh)
    placed = jax.tree_util.tree_map(lambda x, s: getattr(x, "sharding", None) == s, params, target)
    return params if all(jax.tree_util.tree_leaves(placed)) else jax.device_put(params, target)


@functools.lru_cache(maxsize=8)
def _sampling_shardings(config: Qwen2Config, mesh):
    return qwen2.param_shardings(config, mesh, sharding.SAMPLING_RULES)


def layout_dtype(dtype, compute_dtype):
    """A parameter's dtype in the sampling layout: the compute dtype for floating-point ones."""
    return compute_dtype if jnp.issubdtype(dtype, jnp.floating) else dtype


@functools.partial(jax.jit, static_argnums=1)
def _cast(params, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(layout_dtype(x.dtype, dtype)), params)


def _request(config, params, prompts, max_new_tokens, temperature, top_p, top_k, eos_ids, num_samples, prompt_bucket,
             layer_loop, host_threads, mesh, slots=0, pages=0):
    """(SamplingConfig, mesh, host threads) for a generate call, after checking every argument."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                              top_k=int(top_k), eos_ids=tuple(int(e) for e in eos_ids), num_samples=num_samples,
                              prompt_bucket=prompt_bucket, layer_loop=layer_loop)
    if layer_loop == "auto":
        # (the TPU paged-attention kernel reads one layer's pool: a page pool is kept per layer)
        per_layer = jax.default_backend() == "cpu" or pages > 0
        sampling = dataclasses.replace(sampling, layer_loop="unrolled" if per_layer else "scan")
    mesh = mesh or sharding.mesh_of(params)
    if mesh is not None and mesh.size == 1:  # one device: nothing to split, and host threads may share it
        mesh = None
    if host_threads is not None and host_threads < 1:
        raise ValueError(f"host_threads={host_threads}: use 1 or more (or None to choose by the model's size)")
    if host_threads is not None and host_threads > 1 and mesh is not None:
        raise ValueError(f"host_threads={host_threads}: more than 1 only for params on one device; this call runs "
                         f"on a mesh of {dict(mesh.shape)}, which splits the batch itself")
    threads = 1 if mesh is not None else host_threads or auto_host_threads(config, len(prompts), num_samples, slots)
    tokens, _, _ = pad_prompts(prompts, config.vocab_size, prompt_bucket)
    total = tokens.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"padded prompt length {tokens.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}; shorten one of them")
    return sampling, mesh, threads


def generate_batched(config: Qwen2Config, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] = (),
                     num_samples: int = 1, seed: int = 0, mesh=None, prompt_bucket: int = 32,
                     layer_loop: str = "auto", host_threads: int | None = None) -> GenerateOutput:
    """`generate` on the batch sampler this module's docstring describes: every row of a call
    decodes until the call's longest answer ends (the engine's predecessor, kept as the baseline
    `python -m dapo_jax.bench engine` compares with). Each row draws the same random numbers as on
    the engine, so the tokens are the same."""
    sampling, mesh, threads = _request(config, params, prompts, max_new_tokens, temperature, top_p, top_k, eos_ids,
                                       num_samples, prompt_bucket, layer_loop, host_threads, mesh)
    tokens, mask, active = pad_prompts(prompts, config.vocab_size, prompt_bucket, _batch_multiple(mesh) * threads)
    rng = jax.random.key(seed)
    chunk = tokens.shape[0] // threads

    def run(c: int):  # prompts [c * chunk, (c + 1) * chunk), their rows numbered from c * chunk * num_samples
        part = slice(c * chunk, (c + 1) * chunk)
        out = _generate(config, sampling, params, tokens[part], mask[part], active[part], rng,
                        np.int32(c * chunk * num_samples))
        return [sharding.to_host(x) for x in out]

    if mesh is not None:
        with jax.set_mesh(mesh):
            outs = [run(0)]
    elif threads == 1:
        outs = [run(0)]
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            outs = list(pool.map(run, range(threads)))
    tokens_NxM, logprobs_NxM, lengths_N, truncated_N = (np.concatenate([out[i] for out in outs]) for i in range(4))
    steps = max(int(out[4]) for out in outs)
    n = len(prompts) * num_samples
    lengths = [int(x) for x in lengths_N[:n]]
    return GenerateOutput(
        tokens=[tokens_NxM[i, :lengths[i]].tolist() for i in range(n)],
        logprobs=[logprobs_NxM[i, :lengths[i]].tolist() for i in range(n)],
        lengths=lengths,
        truncated=[bool(x) for x in truncated_N[:n]],
        decode_steps=int(steps),
    )


def greedy_by_recomputing(config: Qwen2Config, params, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """Reference greedy decoder without a cache: one full forward pass per new token. Slow; for checks."""
    tokens, mask, _ = pad_prompts(prompts, config.vocab_size, bucket=1)
    for _ in range(max_new_tokens):
        logits = qwen2.forward(config, params, tokens, attention_mask=mask)
        token = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)[:, None]
        tokens, mask = np.concatenate([tokens, token], 1), np.concatenate([mask, np.ones_like(token)], 1)
    return tokens[:, -max_new_tokens:].tolist()
