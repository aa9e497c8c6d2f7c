"""Benchmarks that print one JSON line each.

    python -m dapo_jax.bench sampler --checkpoint random:tiny --batch 8 --prompt-len 32 --new-tokens 256 \\
        [--vs-transformers --torch-threads 2]

`--checkpoint` is a Hugging Face directory or "random:<preset>[,field=value...]" (random weights of
that shape; see dapo_jax.models.loading). With --vs-transformers the same weights run through
Hugging Face transformers' `generate` with the same sampling settings in the same process, timed in
alternating rounds, and the line carries both median rates and the median, min and max of the
per-round ratios. Every row generates exactly --new-tokens tokens (no
end-of-sequence id stops it), so tokens/s is batch * new_tokens / seconds.

    python -m dapo_jax.bench train-memory --checkpoint random:tiny,layers=2,hidden=256,vocab=151936 \
        --lengths 2048,8192,22528 [--attention blockwise]

compiles the train step (one row of each length, one device, nothing executed) and reports XLA's
memory analysis: the temporaries the step needs beyond its arguments.
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


def _seconds(fn, settle: float = 0.0) -> float:
    time.sleep(settle)  # let the other library's worker threads go idle first
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def transformers_generate(config, params, prompts, args):
    """A function that runs transformers' sampling `generate` on the same weights (float32, CPU)."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_hf_checkpoint(f"{tmp}/model", config, params, dtype="float32")
        model = Qwen2ForCausalLM.from_pretrained(f"{tmp}/model", dtype=torch.float32).eval()
    inputs = torch.tensor(prompts)
    kwargs = dict(attention_mask=torch.ones_like(inputs), do_sample=True, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, eos_token_id=None, pad_token_id=0)

    def run(n=args.new_tokens):
        with torch.no_grad():
            out = model.generate(inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape == (len(prompts), len(prompts[0]) + n)

    run(8)  # warm-up
    return run


def bench_sampler(args) -> dict:
    config, params = load_model(args.checkpoint, dtype=args.dtype, seed=args.seed)
    rng = np.random.RandomState(args.seed)
    prompts = rng.randint(0, config.vocab_size, (args.batch, args.prompt_len)).tolist()
    threads = args.host_threads or sampling.auto_host_threads(config, args.batch, 1)

    def run():
        out = sampling.generate(config, params, prompts, max_new_tokens=args.new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed, host_threads=threads)
        assert sum(out.lengths) == args.batch * args.new_tokens

    first = _seconds(run)
    ours = [_seconds(run) for _ in range(args.repeats)]
    tokens = args.batch * args.new_tokens
    result = {
        "bench": "sampler", "model": args.checkpoint,
        "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "compile_s": round(first - float(np.median(ours)), 2),  # first call minus a steady call
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "host_threads": threads,
    }
    if args.vs_transformers:
        # Alternate the two in rounds, so that a slow moment of a shared machine hits both.
        peer_run = transformers_generate(config, params, prompts, args)
        peer = []
        for _ in range(args.rounds):
            peer.append(_seconds(peer_run, args.settle))
            ours.append(_seconds(run, args.settle))
        ratios = sorted(p / o for p, o in zip(peer, ours[-args.rounds:]))
        result.update(transformers_tokens_per_s=round(tokens / float(np.median(peer)), 1),
                      torch_threads=args.torch_threads, rounds=args.rounds,
                      ratio_vs_transformers=round(float(np.median(ratios)), 2),
                      ratio_min=round(ratios[0], 2), ratio_max=round(ratios[-1], 2))
    steady = float(np.median(ours))
    result.update(tokens_per_s=round(tokens / steady, 1), step_ms=round(1000 * steady / args.new_tokens, 3))
    return result


def bench_train_memory(args) -> dict:
    from dapo_jax import train_step as ts
    from dapo_jax.models import loading, qwen2

    spec = args.checkpoint.removeprefix("random:")
    config = (loading.random_config(spec, attention=args.attention) if args.checkpoint.startswith("random:") else
              hf.read_config(args.checkpoint, attention=args.attention))
    optimizer = ts.make_optimizer(ts.OptimizerConfig(), 1)
    step = ts.make_train_step(config, ts.LossConfig(), optimizer, num_minibatches=1, num_microbatches=1)
    state = jax.eval_shape(lambda p: ts.init_train_state(p, optimizer), qwen2.abstract_params(config))
    out = {"bench": "train-memory", "checkpoint": args.checkpoint, "attention": args.attention, "temp_gib": {}}
    for length in (int(x) for x in args.lengths.split(",")):
        batch = ts.batch_shapes(1, 1, 1, length)
        memory = step.jitted(state, batch).lower(state, batch).compile().memory_analysis()
        out["temp_gib"][length] = round(memory.temp_size_in_bytes / 2**30, 3)
    return out


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
    s.add_argument("--host-threads", type=int, default=None,
                   help="decode calls side by side on the host's cores (default: sampling.auto_host_threads)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--vs-transformers", action="store_true", help="also time transformers' generate (float32)")
    s.add_argument("--torch-threads", type=int, default=2)
    s.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of each, with --vs-transformers")
    s.add_argument("--settle", type=float, default=1.0,
                   help="seconds of idle before each timed round, so that neither library's spinning worker "
                        "threads eat into the other's time")
    m = sub.add_parser("train-memory", help="compiled train-step temporaries for one row of each length")
    m.add_argument("--checkpoint", required=True, help="HF checkpoint directory or random:<preset>[,field=value]")
    m.add_argument("--lengths", default="2048,8192", help="comma-separated row lengths (tokens)")
    m.add_argument("--attention", default="auto", help="model.attention: auto, blockwise, splash or dense")
    args = parser.parse_args(argv)
    if args.bench == "train-memory":
        print(json.dumps(bench_train_memory(args)), flush=True)
        return
    if args.vs_transformers and args.dtype != "float32":
        parser.error("--vs-transformers compares float32 on CPU; drop --dtype or the comparison")
    print(json.dumps(bench_sampler(args)), flush=True)


if __name__ == "__main__":
    main()
