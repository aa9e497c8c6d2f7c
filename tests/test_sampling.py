"""The jitted KV-cache sampler: exact greedy decoding, correct sampling statistics, early exit."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import loop_instructions, make_hf_model, result_elements, tiny_config

import dapo_jax
from dapo_jax import bench, sampling, sharding
from dapo_jax.models import qwen2

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [30]]


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    return config, dapo_jax.init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def peaked_model():
    """Larger weights give a spread of next-token probabilities (max ~0.6), so that temperature,
    top-p and top-k change the distribution a lot and the statistical tests have power."""
    config = tiny_config(initializer_range=0.3)
    return config, dapo_jax.init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    hf = make_hf_model()
    path = tmp_path_factory.mktemp("hf_sampler")
    hf.save_pretrained(path)
    return hf, *dapo_jax.load_hf_checkpoint(path)


def test_greedy_with_cache_equals_recomputing_every_step(model):
    config, params = model
    out = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=12, temperature=0.0)
    assert out.tokens == sampling.greedy_by_recomputing(config, params, PROMPTS, 12)
    assert out.lengths == [12] * 4 and out.truncated == [True] * 4


def test_greedy_matches_transformers_generate_for_64_tokens(hf_model):
    import torch

    hf, config, params = hf_model
    out = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=64, temperature=0.0)
    for prompt, ours in zip(PROMPTS, out.tokens):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ours == ref[0, len(prompt):].tolist()


def first_token_distribution(config, params, prompt, temperature):
    logits = np.asarray(dapo_jax.forward(config, params, [prompt]))[0, -1].astype(np.float64) / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


def chi_square_pvalue(counts, want, n):
    """Goodness of fit of token counts to probabilities `want`, rare tokens pooled (expected >= 5)."""
    assert counts[want == 0].sum() == 0, "a token of probability 0 was drawn"
    common, rare = want * n >= 5, (want > 0) & (want * n < 5)
    observed, expected = counts[common], want[common] * n
    if rare.any():
        observed, expected = np.append(observed, counts[rare].sum()), np.append(expected, want[rare].sum() * n)
    return scipy.stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_sampled_frequencies_match_softmax_at_temperature(peaked_model, temperature):
    config, params = peaked_model
    prompt, n = PROMPTS[0], 6000
    out = dapo_jax.generate(config, params, [prompt], max_new_tokens=1, temperature=temperature, num_samples=n, seed=3)
    counts = np.bincount([t[0] for t in out.tokens], minlength=config.vocab_size)
    want = first_token_distribution(config, params, prompt, temperature)
    assert chi_square_pvalue(counts, want, n) > 1e-3
    # The test has power: the same counts are rejected against a temperature 15% off.
    assert chi_square_pvalue(counts, first_token_distribution(config, params, prompt, temperature * 1.15), n) < 1e-6
    got_logprobs = np.array([lp[0] for lp in out.logprobs])
    np.testing.assert_allclose(got_logprobs, np.log(want[[t[0] for t in out.tokens]]), atol=1e-4)


def step_distributions(config, params, prompt, tokens, temperature):
    """The model's next-token distribution at every generated position (full forward, no cache)."""
    logits = np.asarray(dapo_jax.forward(config, params, [prompt + tokens]))[0].astype(np.float64)
    logits = logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)] / temperature
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_top_p_never_emits_a_token_outside_the_nucleus(peaked_model):
    config, params = peaked_model
    top_p, temperature = 0.6, 1.0
    out = dapo_jax.generate(config, params, PROMPTS[:2], max_new_tokens=8, temperature=temperature, top_p=top_p,
                            num_samples=64, seed=5)
    sizes = []
    for row, tokens in enumerate(out.tokens):
        prompt = PROMPTS[row // 64]
        for step, (p, token) in enumerate(zip(step_distributions(config, params, prompt, tokens, temperature), tokens)):
            order = np.argsort(-p)
            before = np.cumsum(p[order]) - p[order]
            nucleus = order[before < top_p]
            assert token in nucleus
            np.testing.assert_allclose(out.logprobs[row][step], np.log(p[token] / p[nucleus].sum()), atol=1e-4)
            sizes.append(len(nucleus))
    assert len(sizes) == 2 * 64 * 8
    assert np.mean(np.array(sizes) > 1) > 0.5, "most steps should have a real choice inside the nucleus"


def test_top_k_only_emits_the_k_most_likely_tokens(peaked_model):
    config, params = peaked_model
    out = dapo_jax.generate(config, params, PROMPTS[:1], max_new_tokens=6, temperature=1.0, top_k=3, num_samples=32)
    for row, tokens in enumerate(out.tokens):
        for step, (p, token) in enumerate(zip(step_distributions(config, params, PROMPTS[0], tokens, 1.0), tokens)):
            top3 = np.argsort(-p)[:3]
            assert token in top3
            np.testing.assert_allclose(out.logprobs[row][step], np.log(p[token] / p[top3].sum()), atol=1e-4)


def test_the_loop_exits_as_soon_as_every_row_has_stopped(model):
    config, params = model
    free = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=64, temperature=0.0)
    assert free.decode_steps == 63
    stop_ids = {tokens[3] for tokens in free.tokens}  # every row meets one of these within 4 tokens
    stopped = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=64, temperature=0.0, eos_ids=stop_ids)
    assert stopped.decode_steps <= 3
    for short, long in zip(stopped.tokens, free.tokens):
        assert short == long[:len(short)] and short[-1] in stop_ids and len(short) <= 4
    assert stopped.truncated == [False] * 4 and stopped.lengths == [len(t) for t in stopped.tokens]


def test_a_row_that_stops_keeps_its_end_token_and_others_run_on(model):
    config, params = model
    free = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=10, temperature=0.0)
    eos = free.tokens[1][4]
    out = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=10, temperature=0.0, eos_ids=[eos])
    for row, tokens in enumerate(free.tokens):
        n = tokens.index(eos) + 1 if eos in tokens else 10
        assert out.tokens[row] == tokens[:n] and out.lengths[row] == n and out.truncated[row] == (eos not in tokens)


def test_same_seed_same_samples_and_new_seed_new_samples(model):
    config, params = model
    kwargs = dict(max_new_tokens=8, temperature=1.0, num_samples=4)
    a = dapo_jax.generate(config, params, PROMPTS, seed=11, **kwargs)
    b = dapo_jax.generate(config, params, PROMPTS, seed=11, **kwargs)
    c = dapo_jax.generate(config, params, PROMPTS, seed=12, **kwargs)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens


def test_groups_are_prompt_major_and_samples_differ(model):
    config, params = model
    greedy = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=6, temperature=0.0, num_samples=3)
    single = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=6, temperature=0.0)
    assert greedy.tokens == [t for t in single.tokens for _ in range(3)]
    sampled = dapo_jax.generate(config, params, PROMPTS, max_new_tokens=6, temperature=1.0, num_samples=3)
    assert len(sampled.tokens) == 12
    assert any(len({tuple(t) for t in sampled.tokens[i * 3:i * 3 + 3]}) > 1 for i in range(4))


def test_greedy_on_the_8_device_mesh_equals_one_device(model):
    config, params = model
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, qwen2.param_shardings(config, mesh))
    prompts = PROMPTS[:3]  # 3 prompts x 2 samples: padded to split over data x fsdp = 4
    want = dapo_jax.generate(config, params, prompts, max_new_tokens=16, temperature=0.0, num_samples=2)
    got = dapo_jax.generate(config, sharded, prompts, max_new_tokens=16, temperature=0.0, num_samples=2)
    assert got.tokens == want.tokens and got.lengths == want.lengths
    np.testing.assert_allclose(np.array(got.logprobs), np.array(want.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="more than 1 only for params on one device; this call runs on a mesh"):
        dapo_jax.generate(config, sharded, prompts, max_new_tokens=4, host_threads=2)


def test_prompts_split_over_host_threads_sample_the_same_tokens(model):
    config, params = model
    # 3 prompts over 2 threads: chunks of 2 prompts, the second with a filler prompt.
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_p=0.9, num_samples=2, seed=7, eos_ids=[3])
    one = dapo_jax.generate(config, params, PROMPTS[:3], host_threads=1, **kwargs)
    split = dapo_jax.generate(config, params, PROMPTS[:3], host_threads=2, **kwargs)
    assert split.tokens == one.tokens and split.lengths == one.lengths and split.truncated == one.truncated
    np.testing.assert_allclose(np.concatenate(split.logprobs), np.concatenate(one.logprobs), atol=1e-5)
    assert split.decode_steps == one.decode_steps
    assert len({tuple(t) for t in one.tokens}) > 1


def test_auto_host_threads_uses_the_cores_only_for_small_decode_steps(model, monkeypatch):
    config, _ = model
    monkeypatch.setattr(sampling.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert sampling.auto_host_threads(config, prompts=8, num_samples=1) == 4
    assert sampling.auto_host_threads(config, prompts=3, num_samples=1) == 3  # at most one per prompt
    assert sampling.auto_host_threads(config, prompts=1, num_samples=16) == 1
    # The 40.9M benchmark shape at batch 64: XLA:CPU already spreads its matmuls over the cores.
    wide = config.replace(hidden_size=512, intermediate_size=1536, vocab_size=32768)
    assert sampling.auto_host_threads(wide, prompts=64, num_samples=1) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(host_threads=0), "host_threads=0: use 1 or more"),
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1], [999]]), "prompt 1 has token id 999 outside the vocabulary"),
    (dict(prompts=[]), "at least one prompt"),
    (dict(top_p=0.0), "top_p=0.0 must be in"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(max_new_tokens=0), "at least 1 new token"),
    (dict(max_new_tokens=300), "exceeds max_position_embeddings=256"),
])
def test_bad_requests_say_what_to_change(model, kwargs, message):
    config, params = model
    args = {"prompts": PROMPTS, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        dapo_jax.generate(config, params, args.pop("prompts"), **args)


def test_scan_and_unrolled_layer_loops_give_the_same_tokens(model):
    config, params = model
    # 150 new tokens cross the first attention-span segment (128): the scan loop widens its slice of
    # a full-length cache there, the unrolled loop grows its cache by 22 slots.
    assert sampling.segment_ends(150) == [128, 150]
    kwargs = dict(max_new_tokens=150, temperature=1.0, top_p=0.9, num_samples=2, seed=4)
    scan = dapo_jax.generate(config, params, PROMPTS, layer_loop="scan", **kwargs)
    unrolled = dapo_jax.generate(config, params, PROMPTS, layer_loop="unrolled", **kwargs)
    assert scan.tokens == unrolled.tokens
    np.testing.assert_allclose(np.array(scan.logprobs), np.array(unrolled.logprobs), atol=1e-5)


def decode_loop_copies(hlo: str, min_elements: int) -> list[str]:
    """Copies and transposes of at least `min_elements` inside the decode loops of `_generate`."""
    found = []
    for line in loop_instructions(hlo, "_generate"):
        op = re.match(r"(?:ROOT )?%\S+ = \S+ (copy|transpose)\(", line)
        if op and sum(n for _, n in result_elements(line)) >= min_elements:
            found.append(line[:160])
    return found


def test_no_decode_loop_copies_or_transposes_a_weight_sized_buffer(model):
    # A per-step copy or transpose of a weight or cache costs a small model's decode step more than
    # its arithmetic (the o_proj weight was transposed at every step before its input was flattened).
    # Slices of stacked layers (the scan loop) are dynamic-slice ops, not counted here.
    config, params = model
    E = config.hidden_size
    for layer_loop in ("unrolled", "scan"):
        s = sampling.SamplingConfig(max_new_tokens=16, layer_loop=layer_loop)
        tokens, mask, active = sampling.pad_prompts(PROMPTS, config.vocab_size, s.prompt_bucket)
        hlo = sampling._generate.lower(config, s, params, tokens, mask, active, jax.random.key(0),
                                         np.int32(0)).compile().as_text()
        assert decode_loop_copies(hlo, min_elements=E * E // 2) == [], layer_loop


def test_two_stage_categorical_draw_is_exact():
    # 37 candidates (not a power of two, so the last block is padded) with two masked out.
    logits = np.random.RandomState(0).randn(37) * 1.5
    logits[[3, 20]] = -np.inf
    want = np.exp(logits - logits.max())
    want /= want.sum()
    n = 40_000
    weights = jnp.exp(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, 37)))  # unnormalised
    draws = np.asarray(sampling.categorical(jax.random.uniform(jax.random.key(0), (n, 2)), weights))
    counts = np.bincount(draws, minlength=37)
    assert counts[3] == counts[20] == 0 and draws.max() < 37
    assert chi_square_pvalue(counts, want, n) > 1e-3
    flatter = want**0.9 / (want**0.9).sum()  # power check: a slightly different distribution is rejected
    assert chi_square_pvalue(counts, flatter, n) < 1e-6


def test_bench_prints_one_json_line_with_the_figures(capsys):
    bench.main(["sampler", "--checkpoint", "random:tiny", "--batch", "3", "--prompt-len", "5", "--new-tokens", "6",
                "--repeats", "2", "--host-threads", "2", "--samplers", "engine,batch"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["batch"] == 3 and result["new_tokens"] == 6 and result["host_threads"] == 2
    assert result["sampler"] == "engine" and result["batch/sampler"] == "batch"
    assert result["tokens_per_s"] > 0 and result["batch/tokens_per_s"] > 0 and result["device"]
    assert "compile_s" in result and "batch/compile_s" in result and result["engine_vs_batch"] > 0
    with pytest.raises(SystemExit, match="distinct names"):
        bench.main(["sampler", "--checkpoint", "random:tiny", "--samplers", "engine,vllm"])
