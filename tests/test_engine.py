"""The rollout engine: continuous batching over a paged KV cache gives the batch sampler's answers,
token for token, whatever the slot count, the host threads or the pool size (preemption)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import engine, paged, sampling
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
    for slots, threads, pages in ((18, 1, 0), (5, 1, 0), (3, 1, 0), (8, 2, 0), (4, 1, 9)):
        out = sampling.generate(config, params, PROMPTS, slots=slots, host_threads=threads, pages=pages, page_size=8,
                              segment=6, **kwargs)
        assert out.tokens == reference.tokens, (slots, threads, pages)
        assert out.truncated == reference.truncated and out.lengths == reference.lengths
        for got, want in zip(out.logprobs, reference.logprobs):
            np.testing.assert_allclose(got, want, atol=2e-5)


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
