"""Every setting a training run depends on, with the embedded default, and their validation.

`default_config()` is the schema and the embedded default: the tiny warmed-up model shipped in
`dapo_jax/assets/` trained with the full DAPO recipe on the built-in synthetic arithmetic task, on
one CPU. Files in `configs/` start from it and change what they need; every field can be overridden
on the command line (`--config.rollout.samples_per_prompt=8`).

`validate(cfg, num_devices)` runs before anything is loaded or compiled and reports every problem
at once, each with what to change.
"""

from __future__ import annotations

import math
from pathlib import Path

import ml_collections

from dapo_jax.algorithm import AGG_MODES, KL_ESTIMATORS
from dapo_jax.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from dapo_jax.dynamic_sampling import ON_LIMIT

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "synthetic_tiny"


class ConfigError(ValueError):
    """The config cannot run; the message lists each problem and what to change."""


def local_directory(path, flag: str, why: str) -> None:
    """Refuses a URI (gs://...) for `flag`, a directory read or written as local files."""
    if "://" in str(path):
        raise ConfigError(f"{flag} {path} must be a local directory: {why}")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 60  # rollout steps

    c.model = ml_collections.ConfigDict()
    c.model.path = "embedded"  # "embedded", a Hugging Face directory, or "random:<preset>[,field=value]"
    c.model.tokenizer = ""  # "" = the tokenizer files in model.path
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.remat_policy = "none"
    c.model.attention = "auto"  # "auto" (splash on TPU, blockwise elsewhere), "blockwise", "splash", "cudnn", "dense"

    c.data = ml_collections.ConfigDict()
    c.data.train = "synthetic"  # "synthetic" or comma-separated .parquet / .jsonl files
    c.data.eval = "synthetic"
    c.data.max_prompt_length = 40  # tokens
    c.data.truncation = "left"  # longer prompts: "left" keeps their end (as the reference), "error" rejects
    c.data.skip_bad_rows = False  # True: skip malformed rows (counted and logged) instead of failing
    c.data.dedup = True  # drop repeated prompts (DAPO-Math-17k repeats each ~100 times)
    c.data.system_prompt = ""  # "" = no system turn, "qwen" = Qwen2.5's default, else the text itself
    c.data.eval_problems = 200  # 0 = all; a synthetic eval set always needs a number
    c.data.synthetic = ml_collections.ConfigDict(dict(
        min_ops=1, max_ops=3, max_operand=9, operators="+-", eval_fraction=0.1, instruction="",
        train_problems=20000))

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 16  # groups trained on per rollout step
    c.rollout.samples_per_prompt = 8  # G
    c.rollout.gen_prompts_per_batch = 32  # prompts per generation batch (dynamic sampling draws several)
    c.rollout.max_gen_batches = 6
    c.rollout.on_gen_batch_limit = "error"  # or "train_partial"
    c.rollout.dynamic_sampling = True
    c.rollout.carry_over = True  # keep surplus informative groups for later steps
    c.rollout.max_carry_age = 1  # rollout steps a carried group may wait; older ones are dropped (0 = none kept)
    c.rollout.max_response_length = 48  # tokens, the overlong buffer included
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.prompt_bucket = 8
    c.rollout.stop_ids = ""  # ids or tokens that end an answer; "" = generation_config.json's eos, else the tokenizer's
    # Prompts whose answers the rollout engine decodes at once (its slots: they bound the KV cache);
    # 0 = a whole generation batch.
    c.rollout.generation_chunk = 0
    # Dynamic sampling takes groups from the engine as they finish, in prompt order, and stops generating
    # once the step's batch is full; False: whole generation batches, as the reference.
    c.rollout.stream = True
    # The engine's KV cache: 0 = each slot its own stretch, grown to the longest answer it may write
    # (slots x (prompt + max_response_length) at most); > 0 = a pool of that many pages of page_size
    # tokens that slots draw from as they grow (sized by the tokens held; the latest admitted answers
    # give way and are recomputed when it runs short). TPU reads pages with the Pallas kernel.
    c.rollout.pages = 0
    c.rollout.page_size = 64

    c.reward = ml_collections.ConfigDict()
    c.reward.overlong_buffer = 8  # L_cache tokens; 0 turns the soft overlong punishment off
    c.reward.overlong_penalty_factor = 1.0
    c.reward.overlong_filter = False  # drop truncated answers from the loss

    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.clip_low = 0.2
    c.algorithm.clip_high = 0.28
    c.algorithm.clip_c = 0.0  # dual-clip constant for negative advantages; 0 = off
    c.algorithm.agg_mode = "token-mean"
    c.algorithm.norm_by_std = True
    c.algorithm.kl_coef = 0.0  # GRPO's beta; > 0 keeps a frozen copy of the starting policy as the reference
    c.algorithm.kl_estimator = "k3"  # "k1", "k2" or "k3" (GRPO's low-variance estimate)
    c.algorithm.entropy_coef = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5  # rollout steps
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.minibatch_size = 64  # answers per optimizer update
    # Train rows hold answers (prompt + answer) back to back, first-fit decreasing; a forward/backward
    # pass takes microbatch_size rows, and only the passes a mini-batch fills are computed.
    c.optim.packing = True  # False: one answer per row, padded to the longest prompt + answer
    c.optim.pack_budget = 0  # tokens per train row; 0 = the longest prompt + answer
    c.optim.microbatch_size = 16  # rows per forward/backward pass; 0 = a whole mini-batch's worth

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 20  # rollout steps; 0 = only before and after training
    c.eval.samples_per_prompt = 8  # k of avg@k / pass@k / maj@k
    c.eval.temperature = 1.0
    c.eval.top_p = 1.0
    c.eval.prompts_per_batch = 256

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 20  # rollout steps
    c.checkpoint.keep = 2
    c.checkpoint.dir = ""  # "" = <workdir>/checkpoints; a multi-host run needs shared storage (gs://bucket/...)
    c.checkpoint.export_hf = True  # write the final policy as a Hugging Face checkpoint
    # seconds a save may take in the background, this host's writes and then the wait for the other
    # hosts' (orbax's async timeout), before the run stops with an error: size it to the checkpoint
    # and the storage's bandwidth. A host whose writes failed leaves the others waiting this long.
    c.checkpoint.timeout_s = 1200

    # slices > 1: multi-slice, the data axis split across slices (data must be a multiple of slices)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, slices=1))
    c.log_every = 1
    c.tensorboard = True
    # rollout steps to trace with the JAX profiler, "5-7" or "5" (the step numbers of metrics.jsonl);
    # "" = none. Traces go to <workdir>/tensorboard/plugins/profile (TensorBoard's profile plugin).
    c.profile = ""
    return c


# The paper's Table 1, cumulative: each rung adds one technique to the one before (AIME 2024 avg@32
# for Qwen2.5-32B: 30, 36, 38, 41, 42, 50). Soft overlong punishment replaces overlong filtering
# (the final recipe shapes truncated answers' rewards instead of dropping them from the loss).
ABLATION_LADDER = ("grpo", "overlong_filtering", "clip_higher", "soft_overlong", "token_level_loss", "dapo")
# Naive GRPO's KL penalty to the starting policy: the low-variance k3 estimate with verl's GRPO
# recipe's beta (DeepSeekMath used 0.04). DAPO drops it; the ladder drops it with the first technique.
GRPO_KL_COEF, GRPO_KL_ESTIMATOR = 0.001, "k3"


def ablation(cfg: ml_collections.ConfigDict, rung: str) -> ml_collections.ConfigDict:
    """`cfg` (a full DAPO config) cut back to one rung of the ablation ladder.

        rung                clip (low/high)  loss agg             truncated answers      dyn. sampling  KL
        grpo                low / low        seq-mean-token-mean  kept as they are       no             k3, 0.001
        overlong_filtering  low / low        seq-mean-token-mean  dropped from the loss  no             none
        clip_higher         low / high       seq-mean-token-mean  dropped from the loss  no             none
        soft_overlong       low / high       seq-mean-token-mean  length penalty         no             none
        token_level_loss    low / high       token-mean           length penalty         no             none
        dapo                low / high       token-mean           length penalty         yes            none

    `low`/`high` are cfg's clip_low/clip_high; the length penalty's buffer is cfg's (or a fifth of
    the response length). The grpo rung has no dual clip (GRPO's objective has none); the others
    keep cfg's clip_c. Without dynamic sampling a step generates exactly its batch.
    """
    if rung not in ABLATION_LADDER:
        raise ConfigError(f"unknown ablation rung {rung!r}; choose one of {ABLATION_LADDER}")
    c = ml_collections.ConfigDict(cfg.to_dict())
    level = ABLATION_LADDER.index(rung)
    buffer = cfg.reward.overlong_buffer or max(cfg.rollout.max_response_length // 5, 1)
    c.algorithm.clip_high = cfg.algorithm.clip_low if level < 2 else cfg.algorithm.clip_high
    c.reward.overlong_filter = level in (1, 2)
    c.reward.overlong_buffer = buffer if level >= 3 else 0
    c.algorithm.agg_mode = "token-mean" if level >= 4 else "seq-mean-token-mean"
    c.rollout.dynamic_sampling = level >= 5
    if level < 5:
        c.rollout.gen_prompts_per_batch = c.rollout.prompts_per_step
    if level == 0:
        c.algorithm.kl_coef, c.algorithm.kl_estimator = GRPO_KL_COEF, GRPO_KL_ESTIMATOR
        c.algorithm.clip_c = 0.0
    return c


# Fields added with a default that changes what a run does, and the value that does what runs saved
# before the field existed did: such a run resumes or is evaluated with that value, and resuming it
# with another one is a change the resume refuses.
BEFORE_ADDED = {"rollout.stream": False}  # whole generation batches; the stream came with the engine


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config.json as a config: the defaults, overlaid with every value it saved (a field
    added since keeps its default, or its BEFORE_ADDED value; one removed since is ignored)."""
    cfg = default_config()
    for name, value in BEFORE_ADDED.items():
        section, key = name.rsplit(".", 1)
        if key not in saved.get(section, {}):
            cfg[section][key] = value

    def overlay(node: ml_collections.ConfigDict, values: dict):
        for key, value in values.items():
            if key not in node:
                continue
            if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
                overlay(node[key], value)
            else:
                node[key] = value
    overlay(cfg, saved)
    return cfg


def load_config_file(path: str | Path):
    """The module of an ml_collections config file (its get_config, and whatever else it defines)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    """The embedded default, for `--config` (ml_collections config files define get_config)."""
    return default_config()


def _mesh_sizes(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int] | None:
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}  # slices split the data axis
    if list(sizes.values()).count(-1) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        return None
    known = math.prod(s for s in sizes.values() if s != -1)
    for k, s in sizes.items():
        if s == -1:
            if num_devices % known:
                return None
            sizes[k] = num_devices // known
    return sizes if math.prod(sizes.values()) == num_devices else None


def profile_steps(spec: str) -> range:
    """The rollout steps of `profile` ("5-7": 5, 6 and 7; "5"; "": none)."""
    if not spec:
        return range(0)
    first, _, last = spec.partition("-")
    if not (first.isdigit() and (last.isdigit() or not last)) or int(first) < 1 or int(last or first) < int(first):
        raise ConfigError(f"profile={spec!r}: give the rollout steps to trace as FIRST-LAST or one step, counted from "
                          "1 as in metrics.jsonl (e.g. --config.profile=5-7), or '' for none")
    return range(int(first), int(last or first) + 1)


def problems(cfg: ml_collections.ConfigDict, num_devices: int) -> list[str]:
    """Everything wrong with `cfg` on `num_devices` devices, each saying what to change."""
    out = []
    r, a, o, rw, d = cfg.rollout, cfg.algorithm, cfg.optim, cfg.reward, cfg.data
    if cfg.steps < 0:
        out.append(f"steps={cfg.steps} must be >= 0")
    try:
        profile_steps(cfg.profile)
    except ConfigError as error:
        out.append(str(error))
    if cfg.model.attention not in ATTENTION_IMPLEMENTATIONS:
        out.append(f"model.attention={cfg.model.attention!r}: use one of {ATTENTION_IMPLEMENTATIONS}")
    if not 0.0 <= a.clip_low < 1.0:
        out.append(f"algorithm.clip_low={a.clip_low} must be in [0, 1) (the paper: 0.2)")
    if not 0.0 <= a.clip_high <= 1.0:
        out.append(f"algorithm.clip_high={a.clip_high} must be in [0, 1] (the paper: 0.28); at {a.clip_high} the "
                   f"ratio could grow {1 + a.clip_high:g}x before the clip acts")
    if a.clip_c and a.clip_c <= 1.0:
        out.append(f"algorithm.clip_c={a.clip_c} must be > 1 (the public script: 10), or 0 to turn dual clip off")
    if a.agg_mode not in AGG_MODES:
        out.append(f"algorithm.agg_mode={a.agg_mode!r}: use one of {AGG_MODES}")
    if a.kl_coef < 0:
        out.append(f"algorithm.kl_coef={a.kl_coef} must be >= 0 (DAPO: 0; GRPO's baseline: 0.001 to 0.04)")
    if a.kl_estimator not in KL_ESTIMATORS:
        out.append(f"algorithm.kl_estimator={a.kl_estimator!r}: use one of {KL_ESTIMATORS}")
    if a.entropy_coef < 0:
        out.append(f"algorithm.entropy_coef={a.entropy_coef} must be >= 0")
    if r.samples_per_prompt < 1 or r.prompts_per_step < 1 or r.gen_prompts_per_batch < 1:
        out.append("rollout.prompts_per_step, samples_per_prompt and gen_prompts_per_batch must be >= 1")
    elif r.dynamic_sampling and r.samples_per_prompt < 2:
        out.append(f"rollout.dynamic_sampling keeps groups whose answers disagree: with samples_per_prompt="
                   f"{r.samples_per_prompt} none can; use at least 2 (the paper: 16)")
    if not r.dynamic_sampling and r.gen_prompts_per_batch != r.prompts_per_step:
        out.append(f"without dynamic sampling one generation batch is the train batch: set rollout."
                   f"gen_prompts_per_batch={r.prompts_per_step} (= prompts_per_step), not {r.gen_prompts_per_batch}")
    if r.max_carry_age < 0:
        out.append(f"rollout.max_carry_age={r.max_carry_age} must be >= 0 (0 trains every step on its own "
                   f"generations only)")
    if r.max_gen_batches < 1:
        out.append(f"rollout.max_gen_batches={r.max_gen_batches} must be >= 1")
    elif r.dynamic_sampling and r.gen_prompts_per_batch * r.max_gen_batches < r.prompts_per_step:
        out.append(f"dynamic sampling can draw at most rollout.gen_prompts_per_batch x max_gen_batches = "
                   f"{r.gen_prompts_per_batch * r.max_gen_batches} prompts per step, fewer than prompts_per_step="
                   f"{r.prompts_per_step}: the first step could never fill its batch; raise either")
    if r.prompt_bucket < 1:
        out.append(f"rollout.prompt_bucket={r.prompt_bucket} must be >= 1")
    if r.pages < 0 or r.page_size < 1:
        out.append(f"rollout.pages={r.pages} must be >= 0 (0: a contiguous cache per slot) and rollout.page_size="
                   f"{r.page_size} >= 1")
    if r.generation_chunk < 0:
        out.append(f"rollout.generation_chunk={r.generation_chunk} must be >= 0 (0: a whole generation batch per "
                   f"sampler call)")
    if cfg.log_every < 1 or cfg.eval.prompts_per_batch < 1:
        out.append("log_every and eval.prompts_per_batch must be >= 1")
    if r.on_gen_batch_limit not in ON_LIMIT:
        out.append(f"rollout.on_gen_batch_limit={r.on_gen_batch_limit!r}: use one of {ON_LIMIT}")
    if r.max_response_length < 1 or d.max_prompt_length < 1:
        out.append("rollout.max_response_length and data.max_prompt_length must be >= 1")
    if not 0 <= rw.overlong_buffer < r.max_response_length:
        out.append(f"reward.overlong_buffer={rw.overlong_buffer} must be in [0, rollout.max_response_length="
                   f"{r.max_response_length}); the paper uses 4096 of 20480")
    if rw.overlong_penalty_factor < 0:
        out.append(f"reward.overlong_penalty_factor={rw.overlong_penalty_factor} must be >= 0")
    for name, sampling in (("rollout", r), ("eval", cfg.eval)):
        if sampling.temperature <= 0 and name == "rollout":
            out.append("rollout.temperature must be > 0: the loss needs the sampling distribution's log-probs")
        if not 0.0 < sampling.top_p <= 1.0:
            out.append(f"{name}.top_p={sampling.top_p} must be in (0, 1]")
    if d.truncation not in ("left", "error"):
        out.append(f"data.truncation={d.truncation!r}: use 'left' (keep the prompt's end) or 'error'")
    if cfg.eval.samples_per_prompt < 1:
        out.append(f"eval.samples_per_prompt={cfg.eval.samples_per_prompt} must be >= 1")
    if d.eval == "synthetic" and d.eval_problems < 1:
        out.append("data.eval_problems must be >= 1 for the synthetic eval split (it is endless)")
    if cfg.checkpoint.keep < 1 or cfg.checkpoint.every < 1 or cfg.checkpoint.timeout_s < 1:
        out.append("checkpoint.keep, checkpoint.every and checkpoint.timeout_s must be >= 1")

    if o.pack_budget < 0:
        out.append(f"optim.pack_budget={o.pack_budget} must be >= 0 (0 = the longest prompt + answer)")
    elif o.pack_budget and o.pack_budget < d.max_prompt_length + r.max_response_length:
        out.append(f"optim.pack_budget={o.pack_budget} cannot hold the longest prompt + answer "
                   f"(data.max_prompt_length {d.max_prompt_length} + rollout.max_response_length "
                   f"{r.max_response_length} = {d.max_prompt_length + r.max_response_length} tokens); raise it to at "
                   f"least that, or 0 for exactly that")
    rows = r.prompts_per_step * r.samples_per_prompt
    mb = o.minibatch_size
    micro = microbatch_rows(cfg)
    if mb < 1 or rows % mb:
        out.append(f"optim.minibatch_size={mb} does not divide the {rows} answers of a step "
                   f"(prompts_per_step {r.prompts_per_step} x samples_per_prompt {r.samples_per_prompt}); "
                   f"use a divisor of {rows}")
    elif micro < 1 or mb % micro:
        out.append(f"optim.microbatch_size={micro} does not divide optim.minibatch_size={mb}; use a divisor of {mb} "
                   f"(a pass takes up to a mini-batch's worth of rows)")
    sizes = _mesh_sizes(cfg.mesh, num_devices)
    if sizes is None:
        out.append(f"mesh {dict(cfg.mesh)} does not fit the {num_devices} devices: make data x fsdp x tensor equal "
                   f"{num_devices}, with at most one size -1")
    elif micro % (sizes["data"] * sizes["fsdp"]):
        shards = sizes["data"] * sizes["fsdp"]
        out.append(f"micro-batches of {micro} rows do not split over the {shards} data-parallel devices "
                   f"(mesh data x fsdp); make optim.microbatch_size (or minibatch_size) a multiple of {shards}")
    slices = cfg.mesh.get("slices", 1)
    if slices < 1 or (sizes is not None and sizes["data"] % slices):
        out.append(f"mesh.slices={slices}: the data axis spans the slices, so mesh.data "
                   f"({sizes['data'] if sizes else cfg.mesh.data}) must be a positive multiple of it")
    return out


def microbatch_rows(cfg: ml_collections.ConfigDict) -> int:
    """Train rows per forward/backward pass: optim.microbatch_size, at most (and 0 =) a mini-batch's worth."""
    mb = cfg.optim.minibatch_size
    return min(cfg.optim.microbatch_size or mb, mb)


def rollout_slots(cfg: ml_collections.ConfigDict) -> int:
    """Answers the rollout engine decodes at once: rollout.generation_chunk (0 = a generation batch) x G."""
    r = cfg.rollout
    return (r.generation_chunk or r.gen_prompts_per_batch) * r.samples_per_prompt


def row_width(cfg: ml_collections.ConfigDict) -> int:
    """Tokens per train row: optim.pack_budget, or the longest prompt + answer."""
    return cfg.optim.pack_budget or cfg.data.max_prompt_length + cfg.rollout.max_response_length


def sequence_length(cfg: ml_collections.ConfigDict) -> int:
    """The longest prompt + response position a run uses (the sampler rounds prompts up to its bucket)."""
    bucket = max(cfg.rollout.prompt_bucket, 1)
    return -(-cfg.data.max_prompt_length // bucket) * bucket + cfg.rollout.max_response_length


# What a run can change when it resumes: everything else decides the shapes, the data order or the
# learning-rate schedule of the saved run.
RESUMABLE_CHANGES = ("steps", "eval", "checkpoint", "log_every", "tensorboard", "profile")


def config_differences(saved: dict, cfg: ml_collections.ConfigDict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every setting of `cfg` that differs from a saved config (a dict), outside the sections in
    `ignore`. A field the saved config lacks counts only if `cfg` moves it off its default (the field
    was added since the save)."""
    now, defaults = cfg.to_dict(), default_config().to_dict()
    out = []

    def walk(a, b, default, prefix):
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}{key}"
            if name.split(".")[0] in ignore:
                continue
            x, y, d = a.get(key), b.get(key), (default or {}).get(key)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, d if isinstance(d, dict) else {}, name + ".")
            elif key not in a and name in BEFORE_ADDED:
                if y != BEFORE_ADDED[name]:
                    out.append(f"{name}: not saved (the run predates it and ran as {BEFORE_ADDED[name]!r}), now {y!r}")
            elif key not in a and y == d:
                continue
            elif x != y and not (isinstance(x, list) and tuple(x) == y):
                out.append(f"{name}: saved {x!r}, now {y!r}")
    walk(saved, now, defaults, "")
    return out


def resume_differences(saved: dict, cfg: ml_collections.ConfigDict) -> list[str]:
    """The settings of `cfg` that differ from the saved run's and may not change on resume."""
    return config_differences(saved, cfg, ignore=RESUMABLE_CHANGES)


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    found = problems(cfg, num_devices)
    if found:
        raise ConfigError("the config cannot run:\n  - " + "\n  - ".join(found))

