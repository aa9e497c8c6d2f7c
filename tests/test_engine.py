"""The rollout engine: continuous batching over a paged KV cache gives the batch sampler's answers,
token for token, whatever the slot count, the host threads or the pool size (preemption)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from conftest import loop_instructions, result_bytes

from dapo_jax import engine, paged, sampling, sharding
from dapo_jax.models import qwen2
from dapo_jax.models.loading import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny,layers=2", seed=0)


def prompts_of(lengths, seed=0, vocab=512):
    rng = np.random.RandomState(seed)
    return [rng.randint(10, vocab, n).tolist() for n in lengths]


PROMPTS = prompts_of((5, 17, 9, 33, 2, 12))


def test_greedy_with_fewer_slots_than_answers_equals_recomputation(model):
    config, params = model
    out = sampling.generate(config, params, PROMPTS, max_new_tokens=12, temperature=0.0, slots=4, page_size=8,
                            segment=5)
    assert out.tokens == sampling.greedy_by_recomputing(config, params, PROMPTS, 12)
    assert out.lengths == [12] * len(PROMPTS) and all(out.truncated)


@pytest.mark.parametrize("layer_loop", ["unrolled", "scan"])
def test_sampled_answers_do_not_depend_on_slots_threads_or_pool(model, layer_loop):
    config, params = model
    kwargs = dict(max_new_tokens=40, temperature=1.0, top_p=0.9, top_k=50, num_samples=3, seed=3,
                  eos_ids=tuple(range(10, 40)), layer_loop=layer_loop)
    reference = sampling.generate_batched(config, params, PROMPTS, host_threads=1, **kwargs)
    assert 1 < np.mean(reference.lengths) < 40 and any(reference.truncated) and not all(reference.truncated)
    settings = ((18, 1, 0, 1), (5, 1, 0, 1), (3, 1, 0, 1), (8, 2, 0, 1), (4, 1, 9, 1), (5, 1, 0, 2))
    if layer_loop == "scan":  # the layer loop is below the engine's bookkeeping: fewer slots, and a pool
        settings = settings[1::3]
    for slots, threads, pages, lanes in settings:
        out = sampling.generate(config, params, PROMPTS, slots=slots, host_threads=threads, pages=pages, page_size=8,
                                segment=6, lanes=lanes, **kwargs)
        assert out.tokens == reference.tokens, (slots, threads, pages, lanes)
        assert out.truncated == reference.truncated and out.lengths == reference.lengths
        for got, want in zip(out.logprobs, reference.logprobs):
            np.testing.assert_allclose(got, want, atol=2e-5)


def test_with_nothing_waiting_and_no_stop_ids_a_segment_runs_to_the_next_span(model, monkeypatch):
    """Every answer decoded at once with no stop ids: nothing can change between segments before
    the cap, so the engine decodes to the batch sampler's span ends (128, then the cap of 200) in
    two calls, not 200 / 16, with the batch sampler's tokens. With stop ids it keeps its segments."""
    config, params = model
    calls = []
    decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda *args: (calls.append(int(args[2])), decode(*args))[1])
    kwargs = dict(max_new_tokens=200, temperature=1.0, num_samples=2, seed=4, host_threads=1)
    out = sampling.generate(config, params, PROMPTS, **kwargs)
    assert calls == [127, 72]  # (token 0 comes from the prefill)
    assert out.tokens == sampling.generate_batched(config, params, PROMPTS, **kwargs).tokens
    calls.clear()
    sampling.generate(config, params, PROMPTS, eos_ids=(7,), **kwargs)
    assert set(calls) == {16}


def test_the_stream_gives_each_prompt_in_order_whatever_finishes_first(model, monkeypatch):
    config, params = model
    kwargs = dict(max_new_tokens=40, temperature=1.0, num_samples=2, seed=5, eos_ids=tuple(range(10, 40)))
    engines = []
    init = engine.Engine.__init__
    monkeypatch.setattr(engine.Engine, "__init__", lambda self, *a, **k: (init(self, *a, **k), engines.append(self))[0])
    want = sampling.generate(config, params, PROMPTS, slots=12, host_threads=1, **kwargs)
    assert engines[0].finished != sorted(engines[0].finished)  # later prompts finished first...
    for slots, threads in ((12, 1), (3, 1), (6, 2)):
        stream = list(sampling.generate_stream(config, params, PROMPTS, slots=slots, host_threads=threads, **kwargs))
        assert [i for i, _ in stream] == list(range(len(PROMPTS)))  # ...yet the stream keeps prompt order
        assert [r.tokens for _, group in stream for r in group] == want.tokens


def test_a_stream_stopped_early_decodes_no_more(model, monkeypatch):
    config, params = model
    steps = []
    decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda *args: (steps.append(1), decode(*args))[1])
    kwargs = dict(max_new_tokens=40, temperature=1.0, num_samples=2, seed=5, slots=2, segment=4)
    full = sampling.generate(config, params, PROMPTS, host_threads=1, **kwargs)
    every = len(steps)
    stream = sampling.generate_stream(config, params, PROMPTS, host_threads=1, **kwargs)
    first = next(stream)
    stream.close()
    assert first[0] == 0 and [r.tokens for r in first[1]] == full.tokens[:2]
    assert len(steps) - every <= 40 // 4 + 1  # the first prompt's 40 tokens in segments of 4, and no more
    # with host threads, closing the stream stops every thread's engine: engine 0 has two of its
    # three prompts left when the first is read
    before = len(steps)
    sampling.generate(config, params, PROMPTS, host_threads=2, **kwargs)
    every_threaded, before = len(steps) - before, len(steps)
    threaded = sampling.generate_stream(config, params, PROMPTS, host_threads=2, **kwargs)
    next(threaded)
    threaded.close()
    assert len(steps) - before < every_threaded - 40 // 4


@pytest.mark.parametrize("layer_loop", ["unrolled", "scan"])
def test_long_answers_move_to_the_long_lane_and_keep_their_tokens(model, monkeypatch, layer_loop):
    """Rows growing past long_from trade places with the long lane's free or short rows (their cache
    rows and state), each lane is resized and compacted on its own, and every answer keeps the
    tokens and log-probs one lane gives."""
    config, params = model
    spec = sampling.SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=50, num_samples=3,
                                   eos_ids=tuple(range(10, 40)), layer_loop=layer_loop)
    trades, compactions, spans = [], [], []
    exchange, compact, decode = engine._exchange, engine._compact, engine._decode

    def spy_exchange(cache, slots, short_K, long_K):
        trades.append(int((short_K < len(slots.done_S)).sum()))
        return exchange(cache, slots, short_K, long_K)

    def spy_compact(cache, slots, rows, lane_rows):
        compactions.append(tuple(None if r is None else len(r) for r in lane_rows))
        return compact(cache, slots, rows, lane_rows)

    def spy_decode(config, spec, steps, params, cache, *rest):
        spans.append(tuple((engine._lane_rows(lane), engine._lane_length(lane)) for lane in cache))
        return decode(config, spec, steps, params, cache, *rest)

    one = engine.Engine(config, params, spec, engine.EngineConfig(slots=6, page_size=8, segment=4), prompt_bucket=8,
                        layer_loop=layer_loop)
    rng = jax.random.key(7)
    want = one.run(PROMPTS, rng)
    assert 1 < np.mean([len(r.tokens) for r in want]) < 40
    monkeypatch.setattr(engine, "_exchange", spy_exchange)
    monkeypatch.setattr(engine, "_compact", spy_compact)
    monkeypatch.setattr(engine, "_decode", spy_decode)
    for long_slots in ((2, 3) if layer_loop == "unrolled" else (3,)):
        trades.clear(), compactions.clear(), spans.clear()
        lanes = engine.Engine(config, params, spec, engine.EngineConfig(slots=6, page_size=8, segment=4,
                                                                        long_slots=long_slots, long_from=40),
                              prompt_bucket=8, layer_loop=layer_loop)
        got = lanes.run(PROMPTS, rng)
        assert [r.tokens for r in got] == [r.tokens for r in want], long_slots
        assert [r.truncated for r in got] == [r.truncated for r in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=2e-5)
        assert sum(trades) >= 3 and compactions, (trades, compactions)
        assert compactions and all(len(sizes) == 2 for sizes in compactions)
        assert any(short[1] < long[1] for short, long in spans)  # the short lane read a shorter cache


@pytest.mark.parametrize("per_layer", [True, False])
def test_an_exchange_trades_two_rows_between_the_lanes_and_touches_nothing_else(per_layer):
    config = qwen2.preset("tiny", num_hidden_layers=2)
    rng = np.random.RandomState(0)

    def lane(rows, length):
        cache = engine._contiguous(config, rows, length, per_layer)
        return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), cache)

    short, long = lane(3, 8), lane(2, 12)
    slots = engine.Slots.empty(5, 4)
    slots = slots.replace(tokens_SxM=jnp.arange(20, dtype=jnp.int32).reshape(5, 4), lengths_S=jnp.arange(5) + 1)
    # slot 1 (short lane) <-> slot 4 (the long lane's row 1); the second pair is padding (slot 5 = none)
    before = jax.tree_util.tree_map(np.asarray, (short, long, slots))  # (the call gives its inputs up)
    (new_short, new_long), new_slots = engine._exchange((short, long), slots, np.asarray([1, 5], np.int32),
                                                        np.asarray([4, 5], np.int32))
    short, long, slots = before
    layers = lambda c: c if per_layer else [c]  # noqa: E731
    for a, b, a2, b2 in zip(layers(short), layers(long), layers(new_short), layers(new_long)):
        for name, length_axis in (("k", -1), ("v", -2)):
            x, y, x2, y2 = (np.asarray(getattr(c, name)) for c in (a, b, a2, b2))
            x, y, x2, y2 = (np.moveaxis(z, -4, 0) for z in (x, y, x2, y2))  # the slot axis first
            cut = lambda z: np.take(z, range(8), axis=length_axis)  # noqa: E731
            np.testing.assert_array_equal(x2[1], cut(y[1]))
            np.testing.assert_array_equal(cut(y2[1]), x[1])
            np.testing.assert_array_equal(np.take(y2[1], range(8, 12), axis=length_axis),
                                          np.take(y[1], range(8, 12), axis=length_axis))
            np.testing.assert_array_equal(x2[[0, 2]], x[[0, 2]])
            np.testing.assert_array_equal(y2[0], y[0])
    np.testing.assert_array_equal(np.asarray(new_slots.tokens_SxM)[[0, 4, 2, 3, 1]], np.asarray(slots.tokens_SxM))
    np.testing.assert_array_equal(np.asarray(new_slots.lengths_S), [1, 5, 3, 4, 2])


def test_a_short_pool_preempts_and_recomputes_the_same_answers(model):
    config, params = model
    sampling_config = sampling.SamplingConfig(max_new_tokens=40, temperature=1.0, num_samples=2)
    small = engine.Engine(config, params, sampling_config, engine.EngineConfig(slots=6, page_size=8, pages=14,
                                                                             segment=8), prompt_bucket=8)
    large = engine.Engine(config, params, sampling_config, engine.EngineConfig(slots=6, page_size=8, segment=8),
                          prompt_bucket=8)
    rng = jax.random.key(0)
    got, want = small.run(PROMPTS, rng), large.run(PROMPTS, rng)
    assert small.preempted > 0 and large.preempted == 0
    assert [r.tokens for r in got] == [r.tokens for r in want]


def test_a_pool_that_cannot_hold_one_answer_says_how_many_pages_it_needs(model):
    config, params = model
    with pytest.raises(ValueError, match=r"engine pages=3 cannot hold one answer \(9 pages of 8 tokens for the "
                                         r"33-token prompt and 40 new tokens\)"):
        sampling.generate(config, params, PROMPTS, max_new_tokens=40, slots=2, pages=3, page_size=8, host_threads=1)
    with pytest.raises(ValueError, match="engine slots=0 must be >= 1"):
        engine.EngineConfig(slots=0)


def test_paged_writes_and_reads_give_each_slot_its_own_sequence():
    """Slots write keys at their own positions through scattered pages and read back exactly their
    sequence; positions past a slot's table are dropped, and pages no slot holds read as zeros."""
    config = qwen2.preset("tiny", num_hidden_layers=2)
    K, D, ps = config.num_key_value_heads, config.kv_head_dim, 4
    cache = paged.PagedKVCache.zeros(config, pages=10, page_size=ps)
    table = jnp.asarray([[7, 2, 5], [0, 9, 10]], jnp.int32)  # slot 1 has no third page (10 = no page)
    cache = cache.replace(table=table)
    rng = np.random.default_rng(0)
    written = np.zeros((2, 2, K, 12, D), np.float32)  # [layer, slot, K, position, D]
    for position in range(12):
        for layer in range(2):
            new = rng.normal(size=(2, K, D)).astype(np.float32)
            cache = cache.write(jnp.asarray(new), jnp.asarray(-new), jnp.asarray([position, position]), layer)
            written[layer, :, :, position] = new
    written[:, 1, :, 8:] = 0  # slot 1 has no third page: those writes went nowhere
    for layer in range(2):
        k, v = cache.read(layer)
        np.testing.assert_array_equal(np.asarray(k), written[layer])
        np.testing.assert_array_equal(np.asarray(v), -written[layer])
    past = cache.write(jnp.ones((2, K, D)), jnp.ones((2, K, D)), jnp.asarray([12, 40]), 0)
    np.testing.assert_array_equal(np.asarray(past.k), np.asarray(cache.k))


def test_a_decode_step_over_pages_matches_the_dense_cache(model):
    """One decode step of the model: rows at different positions over a paged cache give the logits
    of the same rows over dense caches."""
    config, params = model
    rows = prompts_of((6, 11, 3), seed=4)
    dense_logits = []
    for row in rows:
        logits = qwen2.forward(config, params, jnp.asarray([row]))
        dense_logits.append(np.asarray(logits[0, -1]))
    ps, width = 4, 12
    cache = paged.PagedKVCache.zeros(config, pages=12, page_size=ps)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row) - 1] = row[:-1]
    lengths = jnp.asarray([len(r) - 1 for r in rows])
    mask = (jnp.arange(width)[None] < lengths[:, None]).astype(jnp.int32)
    _, dense = qwen2.Qwen2ForCausalLM(config).apply({"params": params}, jnp.asarray(tokens),
                                                   qwen2.positions_from_mask(mask), mask,
                                                   qwen2.KVCache.zeros(config, len(rows), width), 0)
    table = jnp.asarray([[5, 0, 9], [1, 11, 3], [7, 2, 6]], jnp.int32)
    cache = paged.write_prompts(cache, dense.k, dense.v, table, jnp.arange(len(rows)))
    logits, _ = qwen2.Qwen2ForCausalLM(config).apply(
        {"params": params}, jnp.asarray([[r[-1]] for r in rows]), lengths, cache.replace(table=table),
        method=qwen2.Qwen2ForCausalLM.decode_paged)
    for i in range(len(rows)):
        np.testing.assert_allclose(np.asarray(logits[i, 0]), dense_logits[i], atol=2e-5, rtol=1e-5)


def decode_gathers(config, params, mesh, monkeypatch) -> list[str]:
    """The all-gathers of the decode segments the engine compiles for `params` on `mesh` (in the
    loop: at every token; before it: at every segment, as XLA may hoist a loop-invariant gather)."""
    hlos = []
    decode = engine._decode

    def spy(*args):
        hlos.append(decode.lower(*args).compile().as_text())
        return decode(*args)

    monkeypatch.setattr(engine, "_decode", spy)
    sampling.generate(config, params, PROMPTS[:4], max_new_tokens=6, num_samples=2, mesh=mesh, segment=4)
    monkeypatch.setattr(engine, "_decode", decode)
    assert all(loop_instructions(hlo, "_decode") for hlo in hlos)
    return [line.strip() for hlo in hlos for line in hlo.splitlines() if re.search(r" all-gather(-start)?\(", line)]


def test_decoding_on_an_fsdp_mesh_reads_the_weights_in_place(monkeypatch):
    # Trained on fsdp=8, every weight is split 8 ways; decoding in that layout gathers them for each
    # segment. The sampling layout (tensor-split only: here whole on each device) leaves nothing to
    # gather but per-row values.
    config, params = load_model("random:tiny,layers=2,hidden=256,mlp=512,vocab=1024", seed=0)
    mesh = sharding.make_mesh(fsdp=8)
    trained = jax.device_put(params, qwen2.param_shardings(config, mesh))
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    laid_out = sampling.sampling_layout(config, trained, mesh)
    assert all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(laid_out))
    assert sampling.sampling_layout(config, laid_out, mesh) is laid_out

    gathers = decode_gathers(config, trained, mesh, monkeypatch)
    assert sum(map(result_bytes, gathers)) <= 0.01 * param_bytes, gathers
    # The check can fail: decoding in the training layout gathers the weights.
    monkeypatch.setattr(sampling, "sampling_layout", lambda config, params, mesh: params)
    gathers = decode_gathers(config, trained, mesh, monkeypatch)
    assert sum(map(result_bytes, gathers)) >= 0.5 * param_bytes


def random_step(B=3, K=2, G=4, D=128, ps=16, pages=12, seed=0):
    """(q, new k, new v, positions, a bfloat16 pool with a table) for one paged decode step."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, K, G, D)), jnp.float32)
    k_new, v_new = (jnp.asarray(rng.normal(size=(B, K, D)), jnp.float32) for _ in range(2))
    pool = [jnp.asarray(rng.normal(size=(K, pages, ps, D)), jnp.bfloat16) for _ in range(2)]
    table = jnp.asarray([[3, 1, 7, 0], [2, 5, pages, pages], [11, 4, 6, 8]], jnp.int32)[:B]
    positions = jnp.asarray([40, 17, 63], jnp.int32)[:B]
    return q, k_new, v_new, positions, paged.PagedKVCache(*pool, table)


def test_the_tpu_paged_attention_kernel_matches_the_gather_reference():
    # run through the Pallas TPU interpreter: each slot's query over its scattered pages, after writing
    q, k_new, v_new, positions, cache = random_step()
    want, want_cache = cache.replace(kernel="gather").step(q, k_new, v_new, positions)
    with pltpu.force_tpu_interpret_mode():
        got, got_cache = cache.replace(kernel="pallas").step(q, k_new, v_new, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)  # bfloat16 keys
    assert np.abs(np.asarray(got) - np.asarray(want)).mean() < 2e-3
    np.testing.assert_array_equal(np.asarray(got_cache.k, np.float32), np.asarray(want_cache.k, np.float32))


def test_a_paged_step_on_the_mesh_reads_and_writes_each_shard_s_own_pages():
    # 4 slots over data x fsdp = 4 shards, 16 pages: shard d holds pages [4d, 4d + 4) and its slot's table
    # names only those; the step under the mesh equals the step on one device.
    q, k_new, v_new, _, cache = random_step(B=4, pages=16, seed=1)
    positions = jnp.asarray([40, 17, 63, 30], jnp.int32)
    table = jnp.asarray([[1, 0, 3, 2], [5, 16, 16, 16], [11, 8, 9, 10], [14, 12, 16, 16]], jnp.int32)
    cache = cache.replace(table=table, kernel="gather")
    want, want_cache = cache.step(q, k_new, v_new, positions)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        got, got_cache = jax.jit(lambda c: c.step(q, k_new, v_new, positions))(cache)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_cache.k, np.float32), np.asarray(want_cache.k, np.float32))
    laid_out = jax.sharding.NamedSharding(mesh, paged.pool_spec(cache.k.shape, dict(mesh.shape)))
    assert got_cache.k.sharding.is_equivalent_to(laid_out, cache.k.ndim)


def test_a_page_pool_on_the_mesh_gives_the_single_device_answers(model):
    config, params = model
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, qwen2.param_shardings(config, mesh))
    kwargs = dict(max_new_tokens=30, temperature=1.0, num_samples=2, seed=2, eos_ids=tuple(range(10, 40)),
                  page_size=8, segment=6)
    want = sampling.generate(config, params, PROMPTS, host_threads=1, **kwargs)
    # 8 slots (2 per shard) and 4 shares of 9 pages: one answer at full length each, so shards preempt
    got = sampling.generate(config, sharded, PROMPTS, slots=8, pages=36, **kwargs)
    assert got.tokens == want.tokens and got.truncated == want.truncated


def compile_paged_decode_for_a_tpu_slice(kernel: str):
    """The engine's decode segment over per-layer page pools for a v5p-8 (4 chips), ahead of time:
    16 slots with 256 pages (16,384 tokens) each in reach, a pool of 4,096 pages, both split 4 ways."""
    from dapo_jax import plan

    config = qwen2.preset("1.5B", num_hidden_layers=2, vocab_size=1024, dtype="bfloat16")  # head_dim 128
    mesh = sharding.make_mesh(devices=plan.target("v5p-8").devices)
    S, pages, ps, width = 16, 4096, 64, 256
    spec = sampling.SamplingConfig(max_new_tokens=512, num_samples=1, layer_loop="unrolled")
    with jax.set_mesh(mesh):
        params = plan.sampling_params(config, mesh)
        pool = jax.eval_shape(lambda: paged.PagedKVCache.zeros(config, pages, ps, per_layer=True, kernel=kernel))
        laid_out = jax.sharding.NamedSharding(mesh, paged.pool_spec(pool[0].k.shape, dict(mesh.shape)))
        pool = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=laid_out), pool)
        slots = jax.eval_shape(lambda: engine.Slots.empty(S, spec.max_new_tokens))
        lowered = engine._decode.lower(config, spec, 16, params, pool, slots,
                                       jax.ShapeDtypeStruct((S, width), jnp.int32), jax.ShapeDtypeStruct((S,), bool))
        compiled = lowered.compile()
        return lowered.as_text(), compiled.as_text(), compiled.memory_analysis()


def test_the_paged_decode_segment_compiles_for_a_tpu_slice_with_the_kernel():
    lowered, hlo, _ = compile_paged_decode_for_a_tpu_slice("auto")  # on TPU: the Pallas kernel, in shard_map
    assert "paged_flash_attention_kernel" in lowered
    # The pool stays where it lies: no step copies a layer's share of it (1,024 pages here, 32 MiB).
    # (Written by a scatter, the pool took a layout of XLA's choosing in the loop, and each step
    # copied it back to the kernel's, twice per layer.)
    share = 1024 * 64 * 2 * 128 * 2
    copies = [line for line in loop_instructions(hlo, "_decode")
              if re.search(r" copy(-start)?\(", line) and result_bytes(line) >= share]
    assert copies == [], copies[:2]
