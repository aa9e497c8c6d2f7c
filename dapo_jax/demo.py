"""The foundation demo (the RL job replaces it as the main entry point): load or build a model, write
and re-read it as a Hugging Face checkpoint, and check the two properties sampling relies on.

    python -m dapo_jax.demo --config configs/demo.py
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from ml_collections import config_flags

import dapo_jax
from dapo_jax import sharding
from dapo_jax.models.loading import load_model
from dapo_jax.models.qwen2 import KVCache, Qwen2ForCausalLM, positions_from_mask

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "demo config file")


def report(**fields):
    print(json.dumps(fields), flush=True)


def greedy_with_cache(config, params, tokens_BxP, mask_BxP, new_tokens: int):
    """Greedy continuation: one prefill, then one cached decode step per token."""
    model = Qwen2ForCausalLM(config)
    step = jax.jit(lambda p, t, pos, m, cache, i: model.apply({"params": p}, t, pos, m, cache, i), donate_argnums=4)
    B, P = tokens_BxP.shape
    cache_mask = np.zeros((B, P + new_tokens), np.int32)
    cache_mask[:, :P] = mask_BxP
    positions = np.asarray(positions_from_mask(mask_BxP))
    logits, cache = step(params, tokens_BxP, positions, cache_mask, KVCache.zeros(config, B, P + new_tokens), 0)
    next_pos = positions[:, -1:] + 1
    out = []
    for i in range(new_tokens):
        token = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)[:, None]
        out.append(token)
        if i + 1 == new_tokens:
            break
        cache_mask[:, P + i] = 1
        logits, cache = step(params, token, next_pos + i, cache_mask, cache, P + i)
    return np.concatenate(out, axis=1)


def greedy_by_recomputing(config, params, tokens_BxP, mask_BxP, new_tokens: int):
    """The same continuation, recomputing the full forward pass for every token."""
    tokens, mask = tokens_BxP, mask_BxP
    for _ in range(new_tokens):
        logits = dapo_jax.forward(config, params, tokens, attention_mask=mask)
        token = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)[:, None]
        tokens, mask = np.concatenate([tokens, token], 1), np.concatenate([mask, np.ones_like(token)], 1)
    return tokens[:, tokens_BxP.shape[1]:]


def main(_):
    cfg = _CONFIG.value
    mesh = sharding.make_mesh(**cfg.mesh) if jax.device_count() > 1 else None
    start = time.perf_counter()
    config, params = load_model(cfg.model, dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, mesh=mesh,
                                seed=cfg.seed)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    report(step="model", source=cfg.model, parameters=n_params, layers=config.num_hidden_layers,
           devices=jax.device_count(), seconds=round(time.perf_counter() - start, 2))

    path = f"{cfg.workdir}/hf_checkpoint"
    start = time.perf_counter()
    dapo_jax.save_hf_checkpoint(path, config, params, dtype=cfg.param_dtype, overwrite=True)
    _, reloaded = dapo_jax.load_hf_checkpoint(path, dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, mesh=mesh)
    exact = all(bool(jnp.array_equal(a, b)) for a, b in
                zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reloaded)))
    report(step="hf_round_trip", path=path, bit_exact=exact, seconds=round(time.perf_counter() - start, 2))

    rng = np.random.RandomState(cfg.seed)
    width = max(cfg.prompt_lengths)
    tokens = np.zeros((len(cfg.prompt_lengths), width), np.int32)
    mask = np.zeros_like(tokens)
    for row, n in enumerate(cfg.prompt_lengths):
        tokens[row, width - n:] = rng.randint(0, config.vocab_size, n)
        mask[row, width - n:] = 1
    padded = np.asarray(dapo_jax.forward(config, params, tokens, attention_mask=mask))
    worst = max(float(np.abs(padded[r, width - n:] - np.asarray(
        dapo_jax.forward(config, params, tokens[r:r + 1, width - n:]))[0]).max())
        for r, n in enumerate(cfg.prompt_lengths))
    report(step="padding_invariance", max_abs_logit_diff=worst)

    start = time.perf_counter()
    cached = greedy_with_cache(config, params, tokens, mask, cfg.new_tokens)
    cached_s = time.perf_counter() - start
    recomputed = greedy_by_recomputing(config, params, tokens, mask, cfg.new_tokens)
    report(step="greedy_kv_cache", new_tokens=cfg.new_tokens, same_as_recomputing=bool((cached == recomputed).all()),
           seconds_incl_compile=round(cached_s, 2), first_row=cached[0].tolist())


if __name__ == "__main__":
    app.run(main)
