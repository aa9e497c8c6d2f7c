"""Benchmarks that print one JSON line each.

    python -m dapo_jax.bench sampler --checkpoint random:tiny --batch 8 --prompt-len 32 --new-tokens 256 \\
        [--samplers engine,batch] [--vs-transformers --torch-threads 2]

times `dapo_jax.generate` (the engine) and, with `--samplers engine,batch`, the batch sampler it
replaced, in the same run. `--checkpoint` is a Hugging Face directory or
"random:<preset>[,field=value...]" (random weights of that shape; see dapo_jax.models.loading). With
--vs-transformers the same weights run through Hugging Face transformers' `generate` with the same
sampling settings in the same process, timed in alternating rounds with each sampler, and the line
carries the median rates and the median, min and max of the per-round ratios. Every row generates
exactly --new-tokens tokens (no end-of-sequence id stops it), so tokens/s is batch * new_tokens / seconds.

    python -m dapo_jax.bench train-memory --checkpoint random:tiny,layers=2,hidden=256,vocab=151936 \
        --lengths 2048,8192,22528 [--attention blockwise]

compiles the train step (one row of each length, one device, nothing executed) and reports XLA's
memory analysis: the temporaries the step needs beyond its arguments.

    python -m dapo_jax.bench train --checkpoint random:tiny,layers=2,hidden=256,vocab=4096 \
        --prompt-len 64 --max-response 1024 --answers 64 --rows 8 [--attention dense,blockwise]

times one update of the train step on --answers answers whose lengths are long-tailed (lognormal,
mean about --mean-fraction of --max-response, capped there, each after a --prompt-len prompt), laid
out one answer per row (padded) and packed first-fit decreasing into rows of the same width, for
each attention implementation, in the same run. It reports real (non-padding) tokens per second,
the passes each layout computes, and the compiled step's temporaries; `packed_vs_padded` is the
ratio of real tokens per second for each attention implementation.

    python -m dapo_jax.bench engine --checkpoint random:tiny,vocab=1024 --prompts 64 --samples 8 \
        --new-tokens 1024 --stop-ids 4 --slots 128

times the batch sampler (`dapo_jax.sampling.generate_batched`: every row of a call until its
longest is done) and the engine (`dapo_jax.generate` on `dapo_jax.engine`: continuous batching) in the same run,
each on full-length answers (no stop ids: every answer runs to the cap) and on long-tailed ones
(ids 0..K-1 stop an answer: a random model's lengths are then about geometric), and reports useful
(generated) tokens per second of each (the median of --repeats runs, after warm-up runs until one
compiles nothing), and the share of the full-length rate each keeps on the long tail.

    python -m dapo_jax.bench attention --implementations dense,blockwise[,cudnn|,splash] \
        --rows 4 --length 8192 [--dtype bfloat16]

runs causal attention forward and backward on packed rows (long-tailed segments) with each
implementation and reports, against the dense reference in the same run, the largest difference of
its output and of its gradients, and the seconds per forward+backward.
"""

from __future__ import annotations

import argparse
import functools
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
    samplers = {"engine": sampling.generate, "batch": sampling.generate_batched}
    names = args.samplers.split(",")
    if not names or any(n not in samplers for n in names) or len(set(names)) != len(names):
        raise SystemExit(f"--samplers {args.samplers!r}: give distinct names from {sorted(samplers)}, comma-separated")

    def runner(generate):
        def run():
            out = generate(config, params, prompts, max_new_tokens=args.new_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, seed=args.seed, host_threads=threads)
            assert sum(out.lengths) == args.batch * args.new_tokens
        return run

    runs = {name: runner(samplers[name]) for name in names}
    first = {name: _seconds(run) for name, run in runs.items()}
    times = {name: [_seconds(run) for _ in range(args.repeats)] for name, run in runs.items()}
    tokens = args.batch * args.new_tokens
    result = {
        "bench": "sampler", "model": args.checkpoint,
        "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "host_threads": threads,
    }
    peer = []
    if args.vs_transformers:
        # Alternate all of them in rounds, so that a slow moment of a shared machine hits each.
        peer_run = transformers_generate(config, params, prompts, args)
        for _ in range(args.rounds):
            peer.append(_seconds(peer_run, args.settle))
            for name, run in runs.items():
                times[name].append(_seconds(run, args.settle))
        result.update(transformers_tokens_per_s=round(tokens / float(np.median(peer)), 1),
                      torch_threads=args.torch_threads, rounds=args.rounds)
    for i, name in enumerate(names):
        # The first sampler's figures keep the line's top-level keys; the others are prefixed by name.
        key = (lambda k: k) if i == 0 else (lambda k, n=name: f"{n}/{k}")
        steady = float(np.median(times[name]))
        result[key("sampler")] = name
        result[key("compile_s")] = round(first[name] - steady, 2)  # first call minus a steady call
        result[key("tokens_per_s")] = round(tokens / steady, 1)
        result[key("step_ms")] = round(1000 * steady / args.new_tokens, 3)
        if peer:
            ratios = sorted(p / o for p, o in zip(peer, times[name][-args.rounds:]))
            result[key("ratio_vs_transformers")] = round(float(np.median(ratios)), 2)
            result[key("ratio_min")], result[key("ratio_max")] = round(ratios[0], 2), round(ratios[-1], 2)
    for name in names[1:]:
        # the median over runs of the first sampler's rate over this one's (run i against run i)
        pairs = list(zip(times[name], times[names[0]]))
        result[f"{names[0]}_vs_{name}"] = round(float(np.median([b / a for b, a in pairs])), 2)
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


def long_tailed_lengths(n: int, cap: int, mean_fraction: float, sigma: float, seed: int) -> np.ndarray:
    """n lognormal answer lengths with mean about mean_fraction * cap before capping, in [1, cap]."""
    mu = np.log(mean_fraction * cap) - sigma**2 / 2
    return np.clip(np.round(np.random.RandomState(seed).lognormal(mu, sigma, n)), 1, cap).astype(int)


def bench_train(args) -> dict:
    from dapo_jax import packing, train_step as ts
    from dapo_jax.models import loading

    spec = args.checkpoint.removeprefix("random:")
    if not args.checkpoint.startswith("random:"):
        raise SystemExit("bench train takes random weights: --checkpoint random:<preset>[,field=value]")
    lengths = long_tailed_lengths(args.answers, args.max_response, args.mean_fraction, args.sigma, args.seed)
    rng = np.random.RandomState(args.seed + 1)
    base = loading.random_config(spec)
    answers = [packing.Answer(rng.randint(0, base.vocab_size, args.prompt_len), rng.randint(0, base.vocab_size, n),
                              rng.normal(-1.0, 0.1, n).astype(np.float32), float(rng.choice([-1.0, 1.0])))
               for n in lengths]
    width = args.prompt_len + args.max_response
    real_tokens = int(sum(len(a) for a in answers))
    loss_config = ts.LossConfig(clip_low=0.2, clip_high=0.28, agg_mode="token-mean")
    optimizer = ts.make_optimizer(ts.OptimizerConfig(), 1)
    out = {"bench": "train", "checkpoint": args.checkpoint, "answers": args.answers, "prompt_len": args.prompt_len,
           "max_response": args.max_response, "mean_response": round(float(lengths.mean()), 1),
           "max_drawn_response": int(lengths.max()), "row_width": width, "rows_per_pass": args.rows,
           "real_tokens": real_tokens, "device": jax.devices()[0].device_kind, "results": {}}
    for attention in args.attention.split(","):
        config, params = loading.load_model(args.checkpoint, seed=args.seed, attention=attention)
        step = ts.make_train_step(config, loss_config, optimizer, num_minibatches=1, num_microbatches=1)
        for pack in (False, True):
            batch = packing.train_batch(answers, num_minibatches=1, per_minibatch=len(answers), budget=width,
                                        rows_per_micro=args.rows, loss_config=loss_config, pack=pack)
            state = ts.init_train_state(jax.tree_util.tree_map(jax.numpy.copy, params), optimizer)  # donated
            compiled = step.jitted(state, batch).lower(state, batch).compile()
            t = time.perf_counter()
            state, _ = step(state, batch)
            jax.block_until_ready(state)
            first = time.perf_counter() - t
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                state, _ = step(state, batch)
                jax.block_until_ready(state)
                times.append(time.perf_counter() - t)
            seconds = float(np.median(times))
            out["results"][f"{attention}/{'packed' if pack else 'padded'}"] = {
                "passes": int(batch["micro_batches"][0]), "rows": int(batch["micro_batches"][0]) * args.rows,
                "real_tokens_per_s": round(real_tokens / seconds, 1), "step_s": round(seconds, 3),
                "first_step_s": round(first, 3),
                "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)}
        r = out["results"]
        out.setdefault("packed_vs_padded", {})[attention] = round(
            r[f"{attention}/packed"]["real_tokens_per_s"] / r[f"{attention}/padded"]["real_tokens_per_s"], 2)
    return out


def _compile_seconds():
    """A function returning the seconds XLA has spent compiling since this call."""
    total = [0.0]

    def listen(event: str, seconds: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    return lambda: total[0]


def bench_engine(args) -> dict:
    config, params = load_model(args.checkpoint, dtype=args.dtype, seed=args.seed)
    rng = np.random.RandomState(args.seed)
    prompts = rng.randint(args.stop_ids, config.vocab_size, (args.prompts, args.prompt_len)).tolist()
    # each with its own default host threads (None: sampling.auto_host_threads), unless told
    common = dict(max_new_tokens=args.new_tokens, num_samples=args.samples, seed=args.seed,
                  temperature=args.temperature, host_threads=args.host_threads)
    runs = {
        "batch": lambda stop: sampling.generate_batched(config, params, prompts, eos_ids=stop, **common),
        "engine": lambda stop: sampling.generate(config, params, prompts, eos_ids=stop, slots=args.slots,
                                                 page_size=args.page_size, segment=args.segment, **common),
        # the engine with its slots split into a short and a long lane
        "engine_lanes": lambda stop: sampling.generate(config, params, prompts, eos_ids=stop, slots=args.slots,
                                                       page_size=args.page_size, segment=args.segment, lanes=2,
                                                       **common),
    }
    out = {"bench": "engine", "model": args.checkpoint, "prompts": args.prompts, "samples": args.samples,
           "new_tokens": args.new_tokens, "stop_ids": args.stop_ids, "slots": args.slots, "segment": args.segment,
           "page_size": args.page_size, "device": jax.devices()[0].device_kind,
           "host_threads": {"batch": args.host_threads or sampling.auto_host_threads(config, args.prompts, args.samples),
                            "engine": args.host_threads or sampling.auto_host_threads(config, args.prompts,
                                                                                     args.samples, args.slots)}}
    out["host_threads"]["engine_lanes"] = out["host_threads"]["engine"]
    compiling = _compile_seconds()
    for name in args.samplers.split(","):
        run = runs[name]
        for tail, stop in (("full", ()), ("long_tail", tuple(range(args.stop_ids)))):
            # Warm up until a run compiles nothing: the engine's shapes (rows after compaction, cache
            # spans) follow the answers' lengths and, with host threads, which thread took which prompt.
            for _ in range(args.max_warmups):
                before = compiling()
                run(stop)
                if compiling() == before:
                    break
            times, tokens, compile_s = [], 0, 0.0
            for _ in range(args.repeats):
                t, before = time.perf_counter(), compiling()
                result = run(stop)
                times.append(time.perf_counter() - t)
                compile_s += compiling() - before
                tokens = sum(result.lengths)
            out[f"{name}/{tail}"] = {"tokens_per_s": round(tokens / float(np.median(times)), 1),
                                     "mean_length": round(tokens / len(result.lengths), 1),
                                     "seconds": round(float(np.median(times)), 2), "decode_steps": result.decode_steps,
                                     "runs_tokens_per_s": [round(tokens / t) for t in times],
                                     "compile_s_in_runs": round(compile_s, 2)}
        out[f"{name}/long_tail_vs_full"] = round(out[f"{name}/long_tail"]["tokens_per_s"] /
                                                 out[f"{name}/full"]["tokens_per_s"], 3)
    for peer in ("batch", "engine_lanes"):
        if "engine/full" in out and f"{peer}/full" in out:
            for tail in ("full", "long_tail"):
                out[f"engine_vs_{peer}/{tail}"] = round(out[f"engine/{tail}"]["tokens_per_s"] /
                                                        out[f"{peer}/{tail}"]["tokens_per_s"], 3)
    return out


def bench_attention(args) -> dict:
    from dapo_jax import attention

    rng = np.random.RandomState(args.seed)
    B, T, K, G, D = args.rows, args.length, args.kv_heads, args.groups, args.head_dim
    dtype = jax.numpy.dtype(args.dtype)
    q, k, v = (jax.numpy.asarray(rng.normal(size=shape), dtype) for shape in
               ((B, T, K, G, D), (B, T, K, D), (B, T, K, D)))
    seg = np.zeros((B, T), np.int32)
    for row in range(B):  # long-tailed segments back to back, the rest padding
        start, segment = 0, 1
        for n in long_tailed_lengths(64, T // 2, 0.25, 1.0, args.seed + row):
            if start + n > T:
                break
            seg[row, start:start + n], start, segment = segment, start + n, segment + 1
    seg = jax.numpy.asarray(seg)
    weights = jax.numpy.asarray(rng.normal(size=(B, T, K, G, D)), jax.numpy.float32) * (seg > 0)[..., None, None, None]

    def loss(q, k, v, impl):
        return jax.numpy.sum(attention.attention(q, k, v, seg, implementation=impl).astype(jax.numpy.float32) * weights)

    out = {"bench": "attention", "rows": B, "length": T, "kv_heads": K, "groups": G, "head_dim": D,
           "dtype": args.dtype, "segments": int(sum(len(set(np.asarray(r).tolist()) - {0}) for r in seg)),
           "device": jax.devices()[0].device_kind, "results": {}}
    reference = None
    for impl in args.implementations.split(","):
        run = jax.jit(jax.value_and_grad(functools.partial(loss, impl=impl), argnums=(0, 1, 2)))
        result = run(q, k, v)
        jax.block_until_ready(result)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(run(q, k, v))
            times.append(time.perf_counter() - t)
        entry = {"fwd_bwd_s": round(float(np.median(times)), 4)}
        if reference is None:
            reference, entry["reference"] = (impl, result), True
        else:
            entry["vs"] = reference[0]
            entry["loss_rel_diff"] = float(abs(result[0] - reference[1][0]) / max(abs(reference[1][0]), 1e-30))
            entry["max_grad_diff"] = max(float(jax.numpy.max(jax.numpy.abs(
                (a - b).astype(jax.numpy.float32) * ((seg > 0)[..., None, None] if a.ndim == 4 else
                                                     (seg > 0)[..., None, None, None])))) for a, b in
                zip(result[1], reference[1][1]))
        out["results"][impl] = entry
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dapo_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("sampler", help="new tokens per second of dapo_jax.generate")
    s.add_argument("--checkpoint", default="random:tiny",
                   help="HF checkpoint directory or random:<preset>[,field=value]")
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
    s.add_argument("--samplers", default="engine",
                   help="comma-separated: engine (dapo_jax.generate), batch (sampling.generate_batched, the "
                        "engine's predecessor); the first one's figures keep the line's top-level keys")
    s.add_argument("--vs-transformers", action="store_true", help="also time transformers' generate (float32)")
    s.add_argument("--torch-threads", type=int, default=2)
    s.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of each, with --vs-transformers")
    s.add_argument("--settle", type=float, default=1.0,
                   help="seconds of idle before each timed round, so that neither library's spinning worker "
                        "threads eat into the other's time")
    m = sub.add_parser("train-memory", help="compiled train-step temporaries for one row of each length")
    m.add_argument("--checkpoint", default="random:tiny,layers=2,hidden=256,vocab=151936",
                   help="HF checkpoint directory or random:<preset>[,field=value] (default: Qwen's vocabulary on a "
                        "2-layer body)")
    m.add_argument("--lengths", default="2048,8192", help="comma-separated row lengths (tokens)")
    m.add_argument("--attention", default="auto", help="model.attention: auto, blockwise, splash or dense")
    t = sub.add_parser("train", help="real tokens/s of the train step, padded vs packed rows, long-tailed answers")
    t.add_argument("--checkpoint", default="random:tiny,layers=2,hidden=256,vocab=4096",
                   help="random:<preset>[,field=value]")
    t.add_argument("--prompt-len", type=int, default=64)
    t.add_argument("--max-response", type=int, default=1024, help="the answer cap (row width = prompt + cap)")
    t.add_argument("--answers", type=int, default=64)
    t.add_argument("--mean-fraction", type=float, default=0.25, help="mean answer length / cap before capping")
    t.add_argument("--sigma", type=float, default=1.0, help="the lognormal's sigma (tail weight)")
    t.add_argument("--rows", type=int, default=8, help="rows per forward/backward pass (optim.microbatch_size)")
    t.add_argument("--attention", default="dense,blockwise", help="comma-separated model.attention values")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("engine", help="useful tokens/s of the batch sampler and the engine, full and long-tailed")
    e.add_argument("--checkpoint", default="random:tiny,vocab=1024", help="random:<preset>[,field=value] or HF dir")
    e.add_argument("--prompts", type=int, default=64)
    e.add_argument("--samples", type=int, default=8)
    e.add_argument("--prompt-len", type=int, default=32)
    e.add_argument("--new-tokens", type=int, default=1024)
    e.add_argument("--stop-ids", type=int, default=4, help="ids 0..K-1 end an answer in the long-tailed runs")
    e.add_argument("--slots", type=int, default=128, help="the engine's decode slots (over all host threads)")
    e.add_argument("--segment", type=int, default=16, help="the engine's decode steps between admissions")
    e.add_argument("--page-size", type=int, default=64)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--host-threads", type=int, default=None)
    e.add_argument("--repeats", type=int, default=3, help="timed runs of each (the median is reported)")
    e.add_argument("--max-warmups", type=int, default=3, help="untimed runs at most, until one compiles nothing")
    e.add_argument("--samplers", default="batch,engine", help="comma-separated: batch, engine, engine_lanes")
    e.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("attention", help="attention implementations against dense: differences and fwd+bwd time")
    a.add_argument("--implementations", default="dense,blockwise",
                   help="comma-separated model.attention values; the first is the reference")
    a.add_argument("--rows", type=int, default=2)
    a.add_argument("--length", type=int, default=2048)
    a.add_argument("--kv-heads", type=int, default=2)
    a.add_argument("--groups", type=int, default=4, help="query heads per kv head")
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.bench == "sampler" and args.vs_transformers and args.dtype != "float32":
        parser.error("--vs-transformers compares float32 on CPU; drop --dtype or the comparison")
    run = {"sampler": bench_sampler, "engine": bench_engine, "attention": bench_attention, "train": bench_train,
           "train-memory": bench_train_memory}[args.bench]
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
