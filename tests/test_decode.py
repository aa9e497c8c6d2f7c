"""Decode mode: prefill into a preallocated KV cache, then one token at a time, equals the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import left_padded_batch, tiny_config

import dapo_jax
from dapo_jax.models.qwen2 import KVCache, Qwen2ForCausalLM, positions_from_mask


def test_prefill_then_decode_steps_equal_the_full_forward_pass():
    config = tiny_config()
    params = dapo_jax.init_params(config, jax.random.key(1))
    prompt_lengths, new_tokens, cache_length = [7, 2, 5], 6, 16
    prompts, prompt_mask = left_padded_batch(7, prompt_lengths, config.vocab_size)
    continuation = np.random.RandomState(8).randint(2, config.vocab_size, (3, new_tokens)).astype(np.int32)
    full_tokens = np.concatenate([prompts, continuation], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(continuation)], axis=1)
    want = np.asarray(dapo_jax.forward(config, params, full_tokens, attention_mask=full_mask))

    model = Qwen2ForCausalLM(config)
    apply = jax.jit(lambda p, t, pos, m, cache, i: model.apply({"params": p}, t, pos, m, cache, i))
    P = prompts.shape[1]
    cache_mask = np.zeros((3, cache_length), np.int32)
    cache_mask[:, :P] = prompt_mask
    positions = np.asarray(positions_from_mask(full_mask))
    cache = KVCache.zeros(config, batch=3, length=cache_length)
    logits, cache = apply(params, prompts, positions[:, :P], cache_mask, cache, 0)
    real = prompt_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], want[:, :P][real], atol=1e-5, rtol=0)
    for step in range(new_tokens):
        slot = P + step
        cache_mask[:, slot] = 1
        logits, cache = apply(params, continuation[:, step:step + 1], positions[:, slot:slot + 1], cache_mask,
                              cache, slot)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, slot], atol=1e-5, rtol=0)


def test_cache_holds_bf16_keys_when_asked():
    config = tiny_config()
    cache = KVCache.zeros(config, batch=2, length=8, dtype=jnp.bfloat16)
    assert cache.v.shape == (config.num_hidden_layers, 2, config.num_key_value_heads, 8, config.kv_head_dim)
    assert cache.k.shape == cache.v.shape[:3] + (config.kv_head_dim, 8)
    assert cache.k.dtype == jnp.bfloat16 and cache.length == 8
