"""A rollout engine: continuous batching over a paged KV cache.

    work: (prompt i, sample j) for every prompt and sample, in order
    repeat until the work is done:
        admit   free slots take the next work; each new prompt is prefilled once and its keys and
                values copied into the pages of each of its samples' slots; token 0 is sampled
        decode  every busy slot decodes `segment` tokens on device (one jitted loop that stops early
                when all are done), its pages handed out beforehand. Once nothing waits and no
                stop ids are set, nothing can happen between segments until the first busy row
                reaches its cap, so a segment runs up to that, or to the batch sampler's next span
                (128, 256, ... answer tokens): fewer host round trips for a batch decoded at once
        collect finished slots' answers are read back; their pages and the slots are freed

A slot holds one (prompt, sample) at a time, so a long answer occupies one slot while the short ones
around it finish and are replaced: the device keeps decoding useful rows instead of waiting for the
longest row of a batch.

Two cache layouts (`EngineConfig.pages`):

    pages > 0   a pool of that many pages (`dapo_jax.paged`) that slots draw from as they grow, so
                the cache is sized by the tokens held, not slots x the longest answer. When the pool
                runs short, the most recently admitted slots give their pages back and their work is
                queued again from the start (a recomputation, as vLLM does): its tokens are the same
                when it runs again. On TPU the Pallas paged-attention kernel reads a slot's pages,
                elsewhere a gather (`dapo_jax.paged`). On a mesh each data shard owns its share of
                the pool and its share of the slots, and the host hands a slot pages of its own
                shard only, so a decode step never moves keys or values between devices.
    pages = 0   each slot its own contiguous stretch of cache (the batch sampler's layout), read in
                place and sized to the longest span the busy slots need (resized between segments):
                no gathers, the fastest layout where no paged-attention kernel runs.

Lanes (contiguous layout, one device): a decode step's attention reads every slot's cache up to the
span of the longest busy slot, so with long-tailed answers one long answer would make every row read
~the full length. With `long_slots` > 0 the slots form two lanes, each its own cache sized to its
own longest row: a slot whose answer grows past `long_from` tokens trades places (cache rows and
state, one copy each way) with a free slot of the long lane, or else with a long-lane row that is
still short (admissions fill both lanes), so the short lane's rows keep reading a short span. With
no such slot, rows stay where they are and the short lane's span grows (correct, only slower). A
step runs the model once per lane; `dapo_jax.generate(lanes=2)` turns lanes on (measured slower on
the CPU bench at a 1,024-token cap: see the README).

Determinism: the random numbers of (prompt i, sample j) come from its row index i * G + j in the
request (as in `dapo_jax.sampling`), and every decision of the host loop follows from what the
device returned, so sample j of prompt i gets the same tokens whatever slot it lands in and however
many slots there are (up to float rounding of the logits in a batch of another size).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax import paged, sharding
from dapo_jax.models import qwen2
from dapo_jax.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from dapo_jax.sampling import SamplingConfig, sample_tokens, segment_ends, span_slots


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's sizes. Hashable: part of its jitted functions' static arguments."""

    slots: int  # rows decoded together
    page_size: int = 64  # tokens per page
    pages: int = 0  # pages in the pool; 0 = enough for every slot at the longest length (never preempts)
    segment: int = 16  # decode steps per device call between admissions
    prefill: int = 8  # prompts per prefill call at most (bounds its activations; an admission makes several)
    long_slots: int = 0  # contiguous layout: slots of the long lane (0 = one lane; see the module docstring)
    # tokens (prompt + answer) past which a row moves to the long lane; 0 = a quarter of the longest
    # prompt + max_new_tokens (at least the padded prompt width + a segment)
    long_from: int = 0

    def __post_init__(self):
        for name in ("slots", "page_size", "segment", "prefill"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine {name}={getattr(self, name)} must be >= 1")
        if self.pages < 0:
            raise ValueError(f"engine pages={self.pages} must be >= 0 (0 = enough for every slot)")
        if not 0 <= self.long_slots < self.slots or self.long_from < 0:
            raise ValueError(f"engine long_slots={self.long_slots} must be in [0, slots={self.slots}) and "
                             f"long_from={self.long_from} >= 0")
        if self.long_slots and self.pages:
            raise ValueError("engine lanes (long_slots > 0) are for the contiguous layout (pages=0); a page pool "
                             "already reads each slot's own pages")


@flax.struct.dataclass
class Slots:
    """What the device holds per slot."""

    tokens_SxM: jax.Array
    logprobs_SxM: jax.Array
    lengths_S: jax.Array  # tokens sampled so far
    done_S: jax.Array
    stopped_S: jax.Array  # ended by a stop id (not by the length cap)
    prompt_len_S: jax.Array
    uniforms_SxMx2: jax.Array  # the row's random numbers, drawn at admission

    @classmethod
    def empty(cls, slots: int, max_new_tokens: int) -> Slots:
        return _empty_slots(slots, max_new_tokens)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _empty_slots(S: int, M: int) -> Slots:  # (one program: one dispatch instead of one per array)
    return Slots(jnp.zeros((S, M), jnp.int32), jnp.zeros((S, M), jnp.float32), jnp.zeros((S,), jnp.int32),
                 jnp.ones((S,), bool), jnp.zeros((S,), bool), jnp.zeros((S,), jnp.int32),
                 jnp.zeros((S, M, 2), jnp.float32))


def _draws(rng, row_A, max_new_tokens: int):
    """[A, M, 2] uniforms of rows row_A: the same as `sampling._generate` draws for those rows."""
    return jax.vmap(lambda row: jax.random.uniform(jax.random.fold_in(rng, row), (max_new_tokens, 2)))(row_A)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def _admit(config: Qwen2Config, sampling: SamplingConfig, params, cache, slots: Slots, prompt_QxP, prompt_len_Q,
           slot_A, source_A, row_A, pages_AxN, rng):
    """Prefill Q right-padded prompts once, copy prompt source_A[a] into the pages of slot slot_A[a]
    (entries with slot_A = slots are padding: dropped) and sample its token 0."""
    Q, P = prompt_QxP.shape
    M = sampling.max_new_tokens
    mask_QxP = (jnp.arange(P)[None, :] < prompt_len_Q[:, None]).astype(jnp.int32)
    hidden_QxPxE, dense = Qwen2ForCausalLM(config).apply(
        {"params": params}, prompt_QxP, qwen2.positions_from_mask(mask_QxP), mask_QxP, KVCache.zeros(config, Q, P), 0,
        return_hidden=True)
    last_QxE = jnp.take_along_axis(hidden_QxPxE, (prompt_len_Q - 1)[:, None, None], axis=1)
    logits_QxV = qwen2.project_to_vocab(config, qwen2.vocab_head(config, params), last_QxE)[:, 0]
    if _is_paged(cache):
        cache = paged.write_prompts(cache, dense.k, dense.v, pages_AxN, source_A)
    else:  # each admitted slot's first P slots of cache, in its lane
        def put_prompt(c: KVCache, k, v, slot_A) -> KVCache:
            lead = (slice(None),) * (c.k.ndim - 4)
            return KVCache(k=c.k.at[lead + (slot_A, Ellipsis, slice(0, P))].set(k[..., source_A, :, :, :], mode="drop"),
                           v=c.v.at[lead + (slot_A, slice(None), slice(0, P))].set(v[..., source_A, :, :, :],
                                                                                  mode="drop"))
        lanes, offset = [], 0
        for lane in cache:
            n = _lane_rows(lane)
            local_A = jnp.where((slot_A >= offset) & (slot_A < offset + n), slot_A - offset, n)  # n: elsewhere, dropped
            lanes.append([put_prompt(c, dense.k[i], dense.v[i], local_A) for i, c in enumerate(lane)]
                         if isinstance(lane, list) else put_prompt(lane, dense.k, dense.v, local_A))
            offset += n
        cache = tuple(lanes)

    uniforms_AxMx2 = _draws(rng, row_A, M)
    token_A, logprob_A = sample_tokens(logits_QxV[source_A], uniforms_AxMx2[:, 0], sampling)
    stopped_A = jnp.isin(token_A, jnp.asarray(sampling.eos_ids or (-1,), jnp.int32))
    put = lambda x, new: x.at[slot_A].set(new, mode="drop")  # noqa: E731
    slots = Slots(
        tokens_SxM=put(slots.tokens_SxM, jnp.zeros((len(slot_A), M), jnp.int32).at[:, 0].set(token_A)),
        logprobs_SxM=put(slots.logprobs_SxM, jnp.zeros((len(slot_A), M), jnp.float32).at[:, 0].set(logprob_A)),
        lengths_S=put(slots.lengths_S, jnp.ones_like(slot_A)),
        done_S=put(slots.done_S, stopped_A | (M == 1)),
        stopped_S=put(slots.stopped_S, stopped_A),
        prompt_len_S=put(slots.prompt_len_S, prompt_len_Q[source_A]),
        uniforms_SxMx2=put(slots.uniforms_SxMx2, uniforms_AxMx2))
    return cache, slots


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4, 5))
def _decode(config: Qwen2Config, sampling: SamplingConfig, steps, params, cache, slots: Slots, table_SxN, busy_S):
    """Up to `steps` (a traced count: one program for every segment length) decode steps of every
    busy, unfinished slot (fewer when all finish). The table lists each slot's pages up to the span
    this call reads."""
    M = sampling.max_new_tokens
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
    is_paged = _is_paged(cache)
    unrolled = isinstance(cache if is_paged else cache[0], list)
    if unrolled:
        layers = qwen2.unstack_layers(params)
        head_ExV = qwen2.vocab_head(config, params).T
    if is_paged:
        cache = [c.replace(table=table_SxN) for c in cache] if unrolled else cache.replace(table=table_SxN)
        span_S = table_SxN.shape[1] * (cache[0] if unrolled else cache).page_size
    else:  # each lane's rows read its cache up to its length
        sizes = [_lane_rows(lane) for lane in cache]
        span_S = jnp.asarray(np.repeat([_lane_length(lane) for lane in cache], sizes), jnp.int32)
        bounds = np.cumsum([0] + sizes)
    S = busy_S.shape[0]
    rows = jnp.arange(S)

    def contiguous(lane, fed_B, position_B):
        every_key_BxT = jnp.ones((len(fed_B), _lane_length(lane)), jnp.int32)  # a slot's keys are all real up to its position
        if unrolled:
            return qwen2.apply_unrolled(config, params, layers, head_ExV, fed_B[:, None], position_B[:, None],
                                        every_key_BxT, lane, position_B)
        return Qwen2ForCausalLM(config).apply({"params": params}, fed_B[:, None], position_B[:, None], every_key_BxT,
                                              lane, position_B)

    def step(carry):
        i, cache, s = carry
        live_S = busy_S & ~s.done_S
        fed_S = s.tokens_SxM[rows, jnp.maximum(s.lengths_S - 1, 0)]
        position_S = s.prompt_len_S + s.lengths_S - 1
        # Finished and idle slots still run (fixed shapes) but write nowhere: their position is
        # moved past their cache, so their keys and values are dropped.
        position_S = jnp.where(live_S, position_S, span_S)
        if is_paged and unrolled:
            logits_Sx1xV, new_cache = qwen2.apply_unrolled_paged(config, params, layers, head_ExV, fed_S[:, None],
                                                                 position_S, cache)
        elif is_paged:
            logits_Sx1xV, new_cache = Qwen2ForCausalLM(config).apply(
                {"params": params}, fed_S[:, None], position_S, cache, method=Qwen2ForCausalLM.decode_paged)
        else:
            out = [contiguous(lane, fed_S[lo:hi], position_S[lo:hi])
                   for lane, lo, hi in zip(cache, bounds[:-1], bounds[1:])]
            logits_Sx1xV = jnp.concatenate([logits for logits, _ in out]) if len(out) > 1 else out[0][0]
            new_cache = tuple(lane for _, lane in out)
        index_S = jnp.minimum(s.lengths_S, M - 1)
        token_S, logprob_S = sample_tokens(logits_Sx1xV[:, 0], s.uniforms_SxMx2[rows, index_S], sampling)
        token_S = jnp.where(live_S, token_S, 0)
        stop_S = live_S & jnp.isin(token_S, eos)
        s = s.replace(
            tokens_SxM=s.tokens_SxM.at[rows, index_S].set(jnp.where(live_S, token_S, s.tokens_SxM[rows, index_S])),
            logprobs_SxM=s.logprobs_SxM.at[rows, index_S].set(
                jnp.where(live_S, logprob_S, s.logprobs_SxM[rows, index_S])),
            lengths_S=s.lengths_S + live_S,
            done_S=s.done_S | stop_S | (live_S & (s.lengths_S + 1 >= M)),
            stopped_S=s.stopped_S | stop_S)
        return i + 1, new_cache, s

    _, cache, slots = jax.lax.while_loop(lambda c: (c[0] < steps) & jnp.any(busy_S & ~c[2].done_S), step,
                                         (jnp.array(0, jnp.int32), cache, slots))
    if is_paged:
        cache = [c.replace(table=None) for c in cache] if unrolled else cache.replace(table=None)
    return cache, slots


@jax.jit
def _compact(cache, slots: Slots, rows_K, lane_rows):
    """The slots rows_K, in that order: their state and (contiguous layout) their caches, lane l
    keeping its rows lane_rows[l] (numbered within the lane)."""
    def take(c: KVCache, rows) -> KVCache:
        axis = c.k.ndim - 4  # the slot axis, after the layer axis if stacked
        return KVCache(k=jnp.take(c.k, rows, axis=axis), v=jnp.take(c.v, rows, axis=axis))
    if not _is_paged(cache):  # (None: the lane keeps its rows as they are)
        cache = tuple(lane if rows is None else _each_layer(functools.partial(take, rows=rows), lane)
                      for lane, rows in zip(cache, lane_rows))
    return cache, jax.tree_util.tree_map(lambda x: x[rows_K], slots)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _exchange(cache, slots: Slots, short_K, long_K):
    """Contiguous lanes: slot short_K[k] of the short lane and slot long_K[k] of the long lane (slot
    numbers of the whole engine; padding pairs point past both) trade their state and cache rows,
    the first min(lane lengths) positions (which hold every token of both rows)."""
    short, long = cache
    offset = _lane_rows(short)
    n = min(_lane_length(short), _lane_length(long))

    def trade(a, b, length_axis):  # a short lane's and the long lane's array of one kind
        axis = a.ndim - 4
        def at(rows):
            index = [slice(None)] * a.ndim
            index[axis], index[length_axis] = rows, slice(0, n)
            return tuple(index)
        a_rows = jnp.take(a, short_K, axis=axis, mode="clip")[at(slice(None))]
        b_rows = jnp.take(b, long_K - offset, axis=axis, mode="clip")[at(slice(None))]
        return a.at[at(short_K)].set(b_rows, mode="drop"), b.at[at(long_K - offset)].set(a_rows, mode="drop")

    def trade_cache(a: KVCache, b: KVCache):
        (ak, bk), (av, bv) = trade(a.k, b.k, a.k.ndim - 1), trade(a.v, b.v, a.v.ndim - 2)
        return KVCache(k=ak, v=av), KVCache(k=bk, v=bv)

    if isinstance(short, list):
        pairs = [trade_cache(a, b) for a, b in zip(short, long)]
        cache = ([a for a, _ in pairs], [b for _, b in pairs])
    else:
        cache = trade_cache(short, long)
    slots = jax.tree_util.tree_map(
        lambda x: x.at[short_K].set(x[long_K], mode="drop").at[long_K].set(x[short_K], mode="drop"), slots)
    return cache, slots


@jax.jit
def _rows(slots: Slots, rows_K):
    """(tokens, log-probs, stopped) of the slots rows_K."""
    return slots.tokens_SxM[rows_K], slots.logprobs_SxM[rows_K], slots.stopped_S[rows_K]


def contiguous_span(config: Qwen2Config, width: int, longest: int, max_new_tokens: int) -> int:
    """The most slots a contiguous cache row holds: the padded prompts' `width`, or the `longest`
    prompt and its answer at full length rounded to whole 64-byte rows of slots as the batch sampler's
    spans are (not to pages)."""
    return max(width, span_slots(config, longest, max_new_tokens))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _contiguous(config: Qwen2Config, slots: int, length: int, per_layer: bool):
    """One lane of empty contiguous caches: a KVCache with a layer axis, or one per layer."""
    if not per_layer:
        return KVCache.zeros(config, slots, length)
    return [KVCache.zeros(config, slots, length, layer_axis=False) for _ in range(config.num_hidden_layers)]


def _is_paged(cache) -> bool:
    """A page pool (or one per layer), else a tuple of contiguous lanes."""
    return not isinstance(cache, tuple)


def _each_layer(fn, lane):
    return [fn(c) for c in lane] if isinstance(lane, list) else fn(lane)


def _lane_rows(lane) -> int:
    return (lane[0] if isinstance(lane, list) else lane).v.shape[-4]


def _lane_length(lane) -> int:
    return (lane[0] if isinstance(lane, list) else lane).length


@functools.partial(jax.jit, static_argnums=(1,))
def _resize_lane(lane, length: int):
    """A contiguous lane cut or extended (with empty positions) to `length` positions."""
    def fit(c: KVCache) -> KVCache:
        if c.length >= length:
            return KVCache(k=c.k[..., :length], v=c.v[..., :length, :])
        return c.pad(length - c.length)
    return _each_layer(fit, lane)


def _resize(cache, lengths: tuple[int, ...]):
    """Contiguous lanes at lengths[l] positions: one copy of each lane whose length changes."""
    return tuple(lane if _lane_length(lane) == n else _resize_lane(lane, n) for lane, n in zip(cache, lengths))


@dataclasses.dataclass
class Result:
    tokens: list[int]
    logprobs: list[float]
    truncated: bool


def _bucket(n: int, most: int) -> int:
    """n rounded up to a power of two, at most `most`."""
    return min(most, 1 << max(0, (n - 1).bit_length()))


class _Pages:
    """The host's page accounting: each data shard's free pages, and each slot's (its table row).
    Slot s belongs to shard s // (slots / shards) and draws pages only from that shard's share of
    the pool, pages [d * n, (d + 1) * n) for shard d: the share its device holds."""

    def __init__(self, pool: int, shards: int, slots: int, width: int):
        self.pool, self.shards = pool, shards
        n = pool // shards
        self.free = [collections.deque(range(d * n, (d + 1) * n)) for d in range(shards)]
        self.table = np.full((slots, width), pool, np.int32)  # `pool`: no page
        self.held = np.zeros(slots, np.int64)

    def shard(self, slot: int) -> int:
        return slot // (len(self.table) // self.shards)

    def available(self, slot: int) -> int:
        return len(self.free[self.shard(slot)])

    def give(self, slot: int, count: int) -> None:
        free = self.free[self.shard(slot)]
        for k in range(self.held[slot], count):
            self.table[slot, k] = free.popleft()
        self.held[slot] = max(self.held[slot], count)

    def release(self, slot: int) -> None:
        self.free[self.shard(slot)].extend(int(p) for p in self.table[slot, :self.held[slot]])
        self.table[slot] = self.pool
        self.held[slot] = 0

    def keep(self, rows: Sequence[int]) -> None:
        self.table, self.held = self.table[rows], self.held[rows]

    def swap(self, a: int, b: int) -> None:  # (slots of one shard)
        self.table[[a, b]], self.held[[a, b]] = self.table[[b, a]], self.held[[b, a]]


class Engine:
    """Continuous batching for one model's params on one device, or on a mesh with its slots split
    over `shards` data-parallel devices (see the module docstring)."""

    def __init__(self, config: Qwen2Config, params, sampling: SamplingConfig, engine: EngineConfig, *,
                 prompt_bucket: int = 32, layer_loop: str = "unrolled", shards: int = 1):
        if engine.slots % shards:
            raise ValueError(f"engine slots={engine.slots} do not split over {shards} data-parallel devices; "
                             f"use a multiple of {shards}")
        if engine.long_slots and shards > 1:
            raise ValueError(f"engine lanes (long_slots={engine.long_slots}) run on one device; on a mesh of "
                             f"{shards} data-parallel devices use long_slots=0")
        self.config, self.params, self.sampling, self.engine = config, params, sampling, engine
        self.layer_loop = layer_loop
        self.shards = shards
        ps = engine.page_size
        # prompts are padded to a multiple of the bucket, whole pages for a pool (an admission writes
        # whole padded prompts into pages)
        self.bucket = -(-max(prompt_bucket, 1) // ps) * ps if engine.pages else max(prompt_bucket, 1)
        self.decode_steps = 0
        self.preempted = 0
        self.finished: list[int] = []  # prompts in the order their last answer finished

    def run(self, prompts: Sequence[Sequence[int]], rng) -> list[Result]:
        """Every prompt's num_samples answers, prompt-major."""
        return [r for _, group in self.stream(prompts, rng) for r in group]

    def stream(self, prompts: Sequence[Sequence[int]], rng, stop: Callable[[], bool] | None = None,
               take: Callable[[], int | None] | None = None) -> Iterator[tuple[int, list[Result]]]:
        """(i, prompt i's num_samples answers) for each prompt in the order this engine took them,
        each as soon as it and every prompt taken before it are done. Sample j of prompt i draws the
        random stream of row i * G + j. The engine takes the next prompt with `take()` (an index
        into `prompts`, None once there are none left; default: each in order) whenever its free
        slots are at least its waiting work (with none free and none waiting too: to learn whether
        the feed is empty), so several engines can share one feed. Nothing more is decoded once the
        caller stops iterating or `stop()` returns True, checked between segments (with no stop ids
        and nothing waiting, a segment may run on to the answers' next span end: 128, 256, ... tokens).
        """
        cfg, e, G, M = self.config, self.engine, self.sampling.num_samples, self.sampling.max_new_tokens
        ps, S, shards = e.page_size, e.slots, self.shards
        longest = max(len(p) for p in prompts)
        width = -(-longest // self.bucket) * self.bucket
        most = -(-(longest + M - 1) // ps)  # the pages of the longest prompt's answer at full length
        pages_per_slot = max(most, width // ps)  # (the prefill writes whole padded prompts)
        is_paged = e.pages > 0
        pool = e.pages // shards * shards or S * pages_per_slot  # contiguous slots: the accounting never runs short
        if pool // shards < most:
            raise ValueError(f"engine pages={e.pages} cannot hold one answer ({most} pages of {ps} tokens for the "
                             f"{longest}-token prompt and {M} new tokens) in each of the {shards} data-parallel "
                             f"shares of the pool; give it at least {most * shards} (each of several host threads "
                             f"gets its share of the pages)")
        per_layer = self.layer_loop == "unrolled"
        if is_paged:
            cache = paged.PagedKVCache.zeros(cfg, pool, ps, per_layer=per_layer)
            sizes = [S]
        else:  # span-sized contiguous lanes, at least the padded prompts' width (admissions write it)
            longest_span = contiguous_span(cfg, width, longest, M)
            length = self._span(width, width, longest_span)
            sizes = [S - e.long_slots, e.long_slots] if e.long_slots else [S]
            cache = tuple(_contiguous(cfg, n, length, per_layer) for n in sizes)
        long_from = e.long_from or max(width + e.segment, (longest + M) // 4)  # (tokens)
        slots = Slots.empty(S, M)
        pages = _Pages(pool, shards, S, pages_per_slot)
        free_slots = set(range(S))
        queue = collections.deque()  # waiting work items i * G + j
        taken: list[int] = []  # prompts in the order this engine took them
        take = take or functools.partial(next, iter(range(len(prompts))), None)
        owner: dict[int, int] = {}  # slot -> work item
        admitted: dict[int, int] = {}  # slot -> admission order (the latest give way first)
        lengths = np.zeros(S, np.int64)
        results: dict[int, Result] = {}
        order, next_out, fed = 0, 0, True

        def pages_for(tokens) -> int:
            return int(-(-tokens // ps))

        def release(slot: int) -> None:
            pages.release(slot)
            owner.pop(slot)
            admitted.pop(slot)
            free_slots.add(slot)

        def need_for(steps: int) -> dict[int, int]:  # cache slots each busy row fills after `steps` steps
            return {s: min(len(prompts[owner[s] // G]) + int(lengths[s]) + steps - 1,
                           len(prompts[owner[s] // G]) + M - 1) for s in owner}

        def shortage(need: dict[int, int]) -> list[int]:  # the pages each shard lacks for `need`
            return [sum(max(0, pages_for(n) - pages.held[s]) for s, n in need.items() if pages.shard(s) == d)
                    - len(pages.free[d]) for d in range(shards)]

        while True:
            # work for every free slot, if there is any (and one more prompt's, so that the engine
            # knows when none is left)
            while fed and len(queue) <= len(free_slots):
                i = take()
                if i is None:
                    fed = False
                else:
                    taken.append(i)
                    queue.extend(range(i * G, (i + 1) * G))
            if not (queue or owner) or (stop is not None and stop()):
                return
            # admit: the next work into free slots (the one whose shard has the most free pages), as
            # long as that shard has the pages of its prompt and first segment
            admit, prefilled = [], set()
            while queue and free_slots:
                item = queue[0]
                if item // G not in prefilled and len(prefilled) == e.prefill:  # a full prefill: run it
                    cache, slots = self._admit(cache, slots, prompts, admit, owner, pages.table, width, rng)
                    admit, prefilled = [], set()
                plen = len(prompts[item // G])
                need = pages_for(min(plen + e.segment, plen + M - 1))
                slot = max(sorted(free_slots), key=pages.available)
                if pages.available(slot) < need:
                    break
                queue.popleft()
                prefilled.add(item // G)
                free_slots.remove(slot)
                pages.give(slot, need)
                owner[slot], admitted[slot], lengths[slot] = item, order, 1
                order += 1
                admit.append(slot)
            if admit:
                cache, slots = self._admit(cache, slots, prompts, admit, owner, pages.table, width, rng)
            # the tail: no work is left and the busy slots fit in half the rows of their shard (or
            # lane). They move to the front of its rows and decoding goes on with fewer rows (one
            # copy per halving).
            if not queue and not fed:
                groups = ([(d * S // shards, (d + 1) * S // shards) for d in range(shards)] if len(sizes) == 1
                          else [(0, sizes[0]), (sizes[0], S)])
                busy_g = [sorted(s for s in owner if lo <= s < hi) for lo, hi in groups]
                fewer = [_bucket(max(1, len(b)), hi - lo) for b, (lo, hi) in zip(busy_g, groups)]
                if len(sizes) == 1:  # shards keep equal shares
                    fewer = [max(fewer)] * shards
                fewer = [n if n <= (hi - lo) // 2 else hi - lo for n, (lo, hi) in zip(fewer, groups)]
                if sum(fewer) < S:
                    kept = [list(range(lo, hi)) if n == hi - lo  # (a lane that does not shrink stays as it is)
                            else busy_d + [s for s in range(lo, hi) if s not in owner][:n - len(busy_d)]
                            for busy_d, n, (lo, hi) in zip(busy_g, fewer, groups)]
                    rows = [s for group in kept for s in group]
                    S = sum(fewer)
                    if len(sizes) > 1:
                        sizes = fewer
                        lane_rows = tuple(None if n == hi - lo else np.asarray(group, np.int32) - lo
                                          for group, n, (lo, hi) in zip(kept, fewer, groups))
                    else:
                        sizes, lane_rows = [S], (np.asarray(rows, np.int32),)
                    cache, slots = _compact(cache, slots, np.asarray(rows, np.int32), () if is_paged else lane_rows)
                    new = {old: k for k, old in enumerate(rows)}
                    owner = {new[s]: w for s, w in owner.items()}
                    admitted = {new[s]: a for s, a in admitted.items()}
                    pages.keep(rows)
                    lengths = lengths[rows]
                    free_slots = set(range(S)) - set(owner)
            steps = e.segment
            if owner and not queue and not fed and not self.sampling.eos_ids:
                # Nothing waits and no answer ends before its cap, so until the first busy row
                # reaches its cap nothing happens between segments but the cache growing: the
                # segment runs that far, or until the furthest row's answer reaches the batch
                # sampler's next span (128, 256, 512, ... tokens), if the pages allow.
                furthest = int(max(lengths[s] for s in owner))
                end = next((n for n in segment_ends(M) if n > furthest), M)
                longer = max(e.segment, min(min(M - int(lengths[s]) for s in owner), end - furthest))
                if max(shortage(need_for(longer))) <= 0:
                    steps = longer
            # every busy slot's pages for the next segment; short of pages in a shard, its latest
            # admitted slots give way
            while True:
                need = need_for(steps)
                short = shortage(need)
                d = int(np.argmax(short))
                if short[d] <= 0:
                    break
                victim = max((s for s in admitted if pages.shard(s) == d), key=admitted.get)
                queue.appendleft(owner[victim])
                release(victim)
                self.preempted += 1
            for s, n in need.items():
                pages.give(s, pages_for(n))
            if len(sizes) > 1:  # rows past long_from move to the long lane (see the module docstring)
                cache, slots = self._to_long_lane(cache, slots, sizes, need, owner, admitted, lengths, pages,
                                                  free_slots, long_from, width, longest_span)
            busy = np.zeros(S, bool)
            busy[list(owner)] = True
            if is_paged:
                table_now = pages.table[:, :_bucket(int(pages.held.max()), pages_per_slot)]
            else:  # the cache each lane's busy slots read this segment, resized when its bucket changes
                table_now = np.zeros((S, 0), np.int32)
                spans = self._lane_spans(sizes, need, width, longest_span)
                if spans != tuple(_lane_length(lane) for lane in cache):
                    cache = _resize(cache, spans)
            cache, slots = _decode(cfg, self.sampling, np.int32(steps), self.params, cache, slots, table_now, busy)
            # (every host takes part in a read-back that spans several: sharding.to_host)
            done, new_lengths = sharding.to_host(slots.done_S), sharding.to_host(slots.lengths_S)
            self.decode_steps += int((new_lengths[busy] - lengths[busy]).max(initial=0))
            lengths[busy] = new_lengths[busy]
            finished = [s for s in owner if done[s]]
            if finished:  # their rows, read back padded to a power of two (one program per size)
                index = np.zeros(_bucket(len(finished), S), np.int32)
                index[:len(finished)] = finished
                tokens, logprobs, stopped = (sharding.to_host(x) for x in _rows(slots, index))
                for k, s in enumerate(finished):
                    n = int(lengths[s])
                    i = owner[s] // G
                    results[owner[s]] = Result(tokens[k, :n].tolist(), logprobs[k, :n].tolist(), not bool(stopped[k]))
                    release(s)
                    if all(i * G + j in results for j in range(G)):
                        self.finished.append(i)
            while next_out < len(taken) and all(taken[next_out] * G + j in results for j in range(G)):
                i = taken[next_out]
                yield i, [results.pop(i * G + j) for j in range(G)]
                next_out += 1

    def _lane_spans(self, sizes, need: dict[int, int], width: int, most: int) -> tuple[int, ...]:
        """Each contiguous lane's length: the span its busy slots need this segment (`need`: cache
        slots by row)."""
        bounds = np.cumsum([0] + list(sizes))
        return tuple(self._span(max((n for s, n in need.items() if lo <= s < hi), default=0), width, most)
                     for lo, hi in zip(bounds[:-1], bounds[1:]))

    def _to_long_lane(self, cache, slots, sizes, need, owner, admitted, lengths, pages, free_slots, long_from, width,
                      most):
        """Short-lane rows whose next segment goes past long_from tokens trade places with free
        long-lane slots, then with long-lane rows that are still short (the longest and the shortest
        first). The bookkeeping (need, owner, admitted, lengths, pages, free_slots) follows them."""
        n0 = sizes[0]
        up = sorted((s for s in owner if s < n0 and need[s] > long_from), key=lambda s: (-need[s], s))
        down = (sorted(s for s in free_slots if s >= n0)
                + sorted((s for s in owner if s >= n0 and need[s] <= long_from), key=lambda s: (need[s], s)))
        pairs = list(zip(up, down))
        if not pairs:
            return cache, slots
        for a, b in pairs:
            for book in (owner, admitted, need):
                va, vb = book.pop(a, None), book.pop(b, None)
                if va is not None:
                    book[b] = va
                if vb is not None:
                    book[a] = vb
            lengths[[a, b]] = lengths[[b, a]]
            pages.swap(a, b)
            if b in free_slots:
                free_slots.remove(b)
                free_slots.add(a)
        # grow the lanes to what their new rows need (never shorter than their rows now: _exchange
        # copies min(lane lengths) positions, which then hold every token of both rows of a pair);
        # the short lane shrinks after the trade
        now = tuple(_lane_length(lane) for lane in cache)
        grown = tuple(max(x, y) for x, y in zip(now, self._lane_spans(sizes, need, width, most)))
        if grown != now:
            cache = _resize(cache, grown)
        S = sum(sizes)
        count = _bucket(len(pairs), S)
        short_K, long_K = np.full(count, S, np.int32), np.full(count, S, np.int32)
        short_K[:len(pairs)], long_K[:len(pairs)] = zip(*pairs)
        return _exchange(cache, slots, short_K, long_K)

    @staticmethod
    def _span(tokens: int, width: int, most: int) -> int:
        """Contiguous cache slots for `tokens`, at least `width`, at most `most`: rounded up to a
        quarter of the power of two below it (at most 1.25x the tokens, 4 sizes to compile per
        doubling; a decode step's attention reads all of them)."""
        quarter = max(1, (1 << max(0, (tokens - 1).bit_length())) // 8)
        return max(width, min(most, -(-tokens // quarter) * quarter))

    def _admit(self, cache, slots, prompts, admit, owner, table, width, rng):
        G, S = self.sampling.num_samples, len(table)  # (fewer than engine.slots after the tail's compaction)
        sources = sorted({owner[s] // G for s in admit})
        # prompts prefilled (a power of two) and slots admitted (G per prompt, at most S): one shape
        # per prompt count to compile
        q = _bucket(len(sources), S)
        a = min(S, q * G)
        prompt_QxP = np.zeros((q, width), np.int32)
        prompt_len_Q = np.ones(q, np.int32)
        for k, i in enumerate(sources):
            prompt_QxP[k, :len(prompts[i])] = prompts[i]
            prompt_len_Q[k] = len(prompts[i])
        where = {i: k for k, i in enumerate(sources)}
        slot_A = np.full(a, S, np.int32)
        source_A = np.zeros(a, np.int32)
        row_A = np.zeros(a, np.int32)
        # the pages each admitted slot's prompt goes to, `pool` (no page: dropped) in padding rows; a
        # contiguous cache has no pages
        if _is_paged(cache):
            pool = (cache[0] if isinstance(cache, list) else cache).pages
            pages_AxN = np.full((a, width // self.engine.page_size), pool, np.int32)
        else:
            pages_AxN = np.zeros((a, 0), np.int32)
        for k, s in enumerate(admit):
            slot_A[k], source_A[k], row_A[k] = s, where[owner[s] // G], owner[s]
            pages_AxN[k] = table[s, :pages_AxN.shape[1]]
        return _admit(self.config, self.sampling, self.params, cache, slots, prompt_QxP, prompt_len_Q, slot_A,
                      source_A, row_A, pages_AxN, rng)


class Stream:
    """(i, prompt i's answers) for every prompt, in prompt order: an iterator over one or several
    engines' streams. `decode_steps` is the most decode steps any engine has run so far; `close()`
    stops every engine."""

    def __init__(self, engines: list[Engine], items: Iterator[tuple[int, list[Result]]]):
        self.engines, self._items = engines, items

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, list[Result]]:
        return next(self._items)

    def close(self) -> None:
        self._items.close()

    @property
    def decode_steps(self) -> int:
        return max((e.decode_steps for e in self.engines), default=0)


def stream_on_engine(config: Qwen2Config, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                     seed: int = 0, mesh=None, host_threads: int = 1, slots: int = 0, segment: int = 16,
                     pages: int = 0, page_size: int = 64, lanes: int = 1) -> Stream:
    """(i, prompt i's answers) in prompt order, each as soon as it and every earlier prompt are done
    (`dapo_jax.sampling.generate_stream` once its arguments are checked): `slots` rows (0 = every
    answer at once), split over `host_threads` engines side by side on one device, each with its
    share of the slots and pages and every host_threads-th prompt; on a mesh, one engine whose rows
    are split over the data-parallel axes. Closing the stream stops every engine. `lanes` = 2 splits
    each engine's slots into a short and a long lane where the cache is contiguous (pages = 0) and on
    one device (see the module docstring). Off by default: a step runs the model once per lane, and
    on the CPU bench (cap 1,024) that cost more than the shorter attention saved (README)."""
    if lanes not in (1, 2):
        raise ValueError(f"lanes={lanes}: use 1 (one contiguous cache for every slot) or 2 (a short and a long lane)")
    threads = max(1, min(host_threads, len(prompts)))
    G = sampling.num_samples
    total = slots or -(-len(prompts) // threads) * threads * G
    data_parallel = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    size = EngineConfig(slots=-(-max(1, -(-total // threads)) // data_parallel) * data_parallel,
                        page_size=page_size, pages=pages // threads // data_parallel * data_parallel,
                        segment=segment)
    if lanes == 2 and not pages and mesh is None and size.slots > 1:
        size = dataclasses.replace(size, long_slots=size.slots // 2)
    engines = [Engine(config, params, sampling, size, prompt_bucket=sampling.prompt_bucket,
                      layer_loop=sampling.layer_loop, shards=data_parallel) for _ in range(threads)]
    rng = jax.random.key(seed)
    if threads == 1:
        def alone():
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                yield from engines[0].stream(prompts, rng)
        return Stream(engines, alone())
    return Stream(engines, _side_by_side(engines, prompts, rng))


def _side_by_side(engines: list[Engine], prompts: Sequence[Sequence[int]], rng) -> Iterator[tuple[int, list[Result]]]:
    """The engines' streams, each from its own thread, merged in prompt order. Engine t takes
    prompts t, t + n, ... (n engines): a fixed share, so that a request always runs the same
    shapes (a feed shared on demand balanced the threads' work, but which thread took a prompt
    then followed the threads' timing, and so did the shapes each compiled: measured, seconds of
    compiling in every run)."""
    stop = threading.Event()
    outboxes = [queue.SimpleQueue() for _ in engines]

    def run(t: int) -> None:
        take = functools.partial(next, iter(range(t, len(prompts), len(engines))), None)
        try:
            for item in engines[t].stream(prompts, rng, stop=stop.is_set, take=take):
                outboxes[t].put(item)
        except BaseException as error:  # raised again by the reader
            outboxes[t].put(error)

    workers = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(len(engines))]
    for worker in workers:
        worker.start()
    try:
        for i in range(len(prompts)):
            item = outboxes[i % len(engines)].get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def generate_on_engine(config: Qwen2Config, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                       **kwargs):
    """`dapo_jax.sampling.generate` once its arguments are checked: every answer of
    `stream_on_engine`, prompt-major."""
    from dapo_jax.sampling import GenerateOutput

    stream = stream_on_engine(config, params, prompts, sampling, **kwargs)
    results = [r for _, group in stream for r in group]
    return GenerateOutput(tokens=[r.tokens for r in results], logprobs=[r.logprobs for r in results],
                          lengths=[len(r.tokens) for r in results], truncated=[r.truncated for r in results],
                          decode_steps=stream.decode_steps)
