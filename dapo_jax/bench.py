"""Benchmarks that print one JSON line each.

    python -m dapo_jax.bench sampler --checkpoint random:tiny --batch 8 --prompt-len 32 --new-tokens 256 \\
        [--vs-transformers --torch-threads 2]

`--checkpoint` is a Hugging Face directory or "random:<preset>[,field=value...]" (random weights of
that shape; see dapo_jax.models.loading). With --vs-transformers the same weights run through
Hugging Face transformers' `generate` with the same sampling settings in the same process, and the
line carries both rates and their ratio. Every row generates exactly --new-tokens tokens (no
end-of-sequence id stops it), so tokens/s is batch * new_tokens / seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np

from dapo_jax import hf, sampling
from dapo_jax.models.loading import load_model


def _time(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return first, float(np.median(runs))


def transformers_tokens_per_s(config, params, prompts, args) -> float:
    """New tokens/s of transformers' sampling `generate` on the same weights (float32, CPU)."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_hf_checkpoint(f"{tmp}/model", config, params, dtype="float32")
        model = Qwen2ForCausalLM.from_pretrained(f"{tmp}/model", dtype=torch.float32).eval()
    inputs = torch.tensor(prompts)
    kwargs = dict(attention_mask=torch.ones_like(inputs), do_sample=True, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, eos_token_id=None, pad_token_id=0)

    def run(n):
        with torch.no_grad():
            out = model.generate(inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape == (len(prompts), len(prompts[0]) + n)

    run(8)  # warm-up
    start = time.perf_counter()
    run(args.new_tokens)
    return len(prompts) * args.new_tokens / (time.perf_counter() - start)


def bench_sampler(args) -> dict:
    config, params = load_model(args.checkpoint, dtype=args.dtype, seed=args.seed)
    rng = np.random.RandomState(args.seed)
    prompts = rng.randint(0, config.vocab_size, (args.batch, args.prompt_len)).tolist()

    def run():
        out = sampling.generate(config, params, prompts, max_new_tokens=args.new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        assert sum(out.lengths) == args.batch * args.new_tokens

    first, steady = _time(run, args.repeats)
    result = {
        "bench": "sampler", "model": args.checkpoint,
        "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "tokens_per_s": round(args.batch * args.new_tokens / steady, 1),
        "compile_s": round(first - steady, 2),  # first call minus a steady call
        "step_ms": round(1000 * steady / args.new_tokens, 3),
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
    }
    if args.vs_transformers:
        peer = transformers_tokens_per_s(config, params, prompts, args)
        result.update(transformers_tokens_per_s=round(peer, 1), torch_threads=args.torch_threads,
                      ratio_vs_transformers=round(result["tokens_per_s"] / peer, 2))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dapo_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("sampler", help="new tokens per second of dapo_jax.generate")
    s.add_argument("--checkpoint", required=True, help="HF checkpoint directory or random:<preset>[,field=value]")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--prompt-len", type=int, default=32)
    s.add_argument("--new-tokens", type=int, default=256)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--vs-transformers", action="store_true", help="also time transformers' generate (float32)")
    s.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.vs_transformers and args.dtype != "float32":
        parser.error("--vs-transformers compares float32 on CPU; drop --dtype or the comparison")
    print(json.dumps(bench_sampler(args)), flush=True)


if __name__ == "__main__":
    main()
