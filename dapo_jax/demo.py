"""The foundation demo (the RL job replaces it as the main entry point): load or build a model, write
and re-read it as a Hugging Face checkpoint, check padding invariance and cached greedy decoding,
and time group sampling.

    python -m dapo_jax.demo --config configs/demo.py
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

import dapo_jax
from dapo_jax import sampling, sharding
from dapo_jax.models.loading import load_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "demo config file")


def report(**fields):
    print(json.dumps(fields), flush=True)


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
    exact = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reloaded)))
    report(step="hf_round_trip", path=path, bit_exact=exact, seconds=round(time.perf_counter() - start, 2))

    rng = np.random.RandomState(cfg.seed)
    prompts = [rng.randint(0, config.vocab_size, n).tolist() for n in cfg.prompt_lengths]
    tokens, mask, _ = sampling.pad_prompts(prompts, config.vocab_size, bucket=1)
    padded = np.asarray(dapo_jax.forward(config, params, tokens, attention_mask=mask))
    worst = max(float(np.abs(padded[r, -len(p):] - np.asarray(dapo_jax.forward(config, params, [p]))[0]).max())
                for r, p in enumerate(prompts))
    report(step="padding_invariance", max_abs_logit_diff=worst)

    greedy = dapo_jax.generate(config, params, prompts, max_new_tokens=cfg.new_tokens, temperature=0.0)
    recomputed = sampling.greedy_by_recomputing(config, params, prompts, cfg.new_tokens)
    report(step="greedy_kv_cache", new_tokens=cfg.new_tokens, same_as_recomputing=greedy.tokens == recomputed,
           first_row=greedy.tokens[0])

    kwargs = dict(max_new_tokens=cfg.new_tokens, temperature=1.0, num_samples=cfg.num_samples, seed=cfg.seed)
    dapo_jax.generate(config, params, prompts, **kwargs)  # compile
    start = time.perf_counter()
    out = dapo_jax.generate(config, params, prompts, **kwargs)
    seconds = time.perf_counter() - start
    report(step="group_sampling", prompts=len(prompts), samples_per_prompt=cfg.num_samples,
           new_tokens_per_s=round(sum(out.lengths) / seconds, 1), mean_logprob=float(np.mean(out.logprobs)))


if __name__ == "__main__":
    app.run(main)
