"""DAPO training: the host loop between the jitted sampler, log-prob and update calls.

    python -m dapo_jax.train                                   # the embedded default, into a fresh workdir
    python -m dapo_jax.train --config configs/qwen2_5_0_5b.py --workdir runs/0.5b [--config.steps=10]

One rollout step:

    prompts -> generate G answers (jitted) -> score + overlong shaping (host)
      -> dynamic sampling: more generation batches until prompts_per_step groups disagree (host)
      -> old log-probs under the generating parameters (jitted) -> group advantages (host)
      -> mini-batch updates (jitted) -> metrics; checkpoint and evaluation on their schedules

A workdir holds everything of a run: config.json, metrics.jsonl, tensorboard/, checkpoints/, eval/,
and at the end hf_final/ (the policy as a Hugging Face checkpoint) and finished.json. Starting a run
in a workdir that has checkpoints resumes from the latest one; in a finished workdir it does nothing
unless `steps` was raised. While a run writes, its `.lock` keeps a second run out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import tqdm

from dapo_jax import checkpoints, config as config_lib, dynamic_sampling, evaluation, hf, metrics as metrics_lib
from dapo_jax import packing, rollout, sampling, sharding, train_step as train_step_lib, workdir_lock
from dapo_jax.data import datasets, synthetic
from dapo_jax.models.loading import check_model_path, load_model
from dapo_jax.tokenizer import QWEN_DEFAULT_SYSTEM, Tokenizer, chat_template, load_tokenizer

log = logging.getLogger(__name__)


# -- what a run is made of --------------------------------------------------------------------------


def model_source(cfg: ml_collections.ConfigDict) -> str:
    if cfg.model.path != "embedded":
        return cfg.model.path
    if not (config_lib.EMBEDDED_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {config_lib.EMBEDDED_MODEL}; rebuild it with "
                                f"`python -m dapo_jax.warmup`")
    return str(config_lib.EMBEDDED_MODEL)


def load_policy_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
    check_model_path(cfg.model.path)  # before its tokenizer is looked for: "no tokenizer" would mislead
    source = cfg.model.tokenizer or model_source(cfg)
    if source.startswith("random:"):
        raise ValueError("a random model has no tokenizer files: set model.tokenizer to a tokenizer directory or file")
    return load_tokenizer(source)


def stop_ids(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> tuple[tuple[int, ...], str]:
    """(the ids that end an answer, where they came from), for training and evaluation alike.

    rollout.stop_ids when set (comma-separated ids or tokens: "151643" or "<|endoftext|>,<|im_end|>");
    else the eos_token_id of the checkpoint's generation_config.json (what vLLM, and so verl, stops
    on: <|endoftext|> alone for Qwen2.5 base models, so an <|im_end|> they write is part of the
    answer, its length and its overlong penalty); else the tokenizer's own end-of-sequence id.
    """
    text = cfg.rollout.stop_ids.strip()
    if text:
        ids = []
        for item in (t.strip() for t in text.split(",") if t.strip()):
            found = int(item) if item.isdigit() else tokenizer.token_id(item)
            if found is None or not 0 <= found < tokenizer.vocab_size:
                raise config_lib.ConfigError(
                    f"rollout.stop_ids: {item!r} is not a token id or a token of the tokenizer ({tokenizer.vocab_size} "
                    f"ids); give ids or tokens such as '<|endoftext|>', comma-separated")
            ids.append(found)
        return tuple(dict.fromkeys(ids)), "rollout.stop_ids"
    source = Path(model_source(cfg)) if not cfg.model.path.startswith("random:") else None
    generation_config = source / "generation_config.json" if source is not None else None
    if generation_config is not None and generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if ids:
            return ids, str(generation_config)
    if not tokenizer.eos_ids:
        raise config_lib.ConfigError("no stop ids: the checkpoint has no generation_config.json eos_token_id and the "
                                     "tokenizer declares no eos token; set rollout.stop_ids")
    return tokenizer.eos_ids, "the tokenizer's eos token"


def system_prompt(cfg: ml_collections.ConfigDict) -> str | None:
    text = cfg.data.system_prompt
    return None if text == "" else QWEN_DEFAULT_SYSTEM if text == "qwen" else text


def synthetic_task(cfg: ml_collections.ConfigDict) -> synthetic.SyntheticTask:
    s = cfg.data.synthetic
    return synthetic.SyntheticTask(min_ops=s.min_ops, max_ops=s.max_ops, max_operand=s.max_operand,
                                   operators=s.operators, eval_fraction=s.eval_fraction, instruction=s.instruction)


def load_prompts(cfg: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer,
                 counts: dict | None = None) -> list[datasets.PromptRecord]:
    """The train or eval split's prompt records (files validated, deduplicated and tokenised); what was
    dropped or cut on the way is added to `counts` (data/<split>_rows_read, _duplicates_dropped,
    _bad_rows_skipped, _prompts_truncated) when given."""
    counts = {} if counts is None else counts

    def count(name: str, n: int):
        counts[f"data/{split}_{name}"] = counts.get(f"data/{split}_{name}", 0) + n

    spec = cfg.data.train if split == "train" else cfg.data.eval
    d = cfg.data
    encode = dict(max_prompt_length=d.max_prompt_length, truncation=d.truncation, system_prompt=system_prompt(cfg))
    if spec == "synthetic":
        # Training draws problems as the task generates them (short chains recur, as in the warm-up);
        # evaluation takes distinct problems, each scored over its k samples.
        n = d.synthetic.train_problems if split == "train" else d.eval_problems
        # The evaluation problems do not depend on the run's seed, so runs with different seeds compare.
        rows = synthetic.rows(synthetic_task(cfg), split, n, seed=cfg.seed if split == "train" else 0,
                              unique=split == "eval")
        records, truncated = datasets.encode_rows(rows, tokenizer, origin_prefix=f"synthetic:{split}:", **encode)
        count("prompts_truncated", truncated)
    else:
        records = []
        for path in (p.strip() for p in spec.split(",") if p.strip()):
            loaded = datasets.load_rows(path, skip_bad_rows=d.skip_bad_rows, dedup=d.dedup)
            if jax.process_index() == 0:
                print(f"{path}: {loaded.num_read} rows read, {loaded.duplicates_dropped} duplicate prompts dropped, "
                      f"{loaded.bad_rows_skipped} bad rows skipped, {len(loaded.rows)} kept", flush=True)
            part, truncated = datasets.encode_rows(loaded.rows, tokenizer, origin_prefix=f"{path}:",
                                                   row_numbers=loaded.row_numbers, **encode)
            for name, n in (("rows_read", loaded.num_read), ("duplicates_dropped", loaded.duplicates_dropped),
                            ("bad_rows_skipped", loaded.bad_rows_skipped), ("prompts_truncated", truncated)):
                count(name, n)
            records.extend(part)
        if split == "eval" and d.eval_problems:
            records = records[:d.eval_problems]
    if not records:
        raise datasets.DataError(f"the {split} data {spec!r} holds no prompts")
    return records


def seed_for(*parts: int) -> int:
    """A sampler seed that depends only on the run seed and where in the run it is used."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclasses.dataclass
class HostState:
    """What the loop carries between steps besides the train state; saved with every checkpoint."""

    step: int = 0
    stream: dict | None = None
    carry: list = dataclasses.field(default_factory=list)
    generated_tokens: int = 0
    trained_tokens: int = 0
    eval_before: dict | None = None

    def to_json(self, carry_groups) -> dict:
        return {**dataclasses.asdict(self), "carry": [g.to_json() for g in carry_groups]}


@dataclasses.dataclass
class Update:
    """How a run's rollout batch becomes parameter updates: its size, the optimizer, the jitted step."""

    rows: int  # answers per rollout step
    num_minibatches: int  # optimizer updates per rollout step
    microbatch_rows: int  # train rows per forward/backward pass
    optim_config: train_step_lib.OptimizerConfig
    loss_config: train_step_lib.LossConfig
    optimizer: optax.GradientTransformation
    train_step: Callable


def make_update(cfg: ml_collections.ConfigDict, model_config, mesh) -> Update:
    r, a, o = cfg.rollout, cfg.algorithm, cfg.optim
    rows = r.prompts_per_step * r.samples_per_prompt
    num_minibatches = rows // o.minibatch_size
    micro = config_lib.microbatch_rows(cfg)
    optim_config = train_step_lib.OptimizerConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                                                  weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    optimizer = train_step_lib.make_optimizer(optim_config, num_minibatches)
    loss_config = train_step_lib.LossConfig(
        clip_low=a.clip_low, clip_high=a.clip_high, clip_c=a.clip_c or None, agg_mode=a.agg_mode,
        kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef, temperature=r.temperature,
        norm_constant=float(r.max_response_length) if a.agg_mode == "seq-mean-token-sum-norm" else None)
    step = train_step_lib.make_train_step(model_config, loss_config, optimizer, num_minibatches=num_minibatches,
                                          num_microbatches=o.minibatch_size // micro, mesh=mesh)
    return Update(rows, num_minibatches, micro, optim_config, loss_config, optimizer, step)


class Run:
    """The loaded pieces of a run; `step()` is one rollout step."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.mesh = sharding.make_mesh(**cfg.mesh)
        self.tokenizer = load_policy_tokenizer(cfg)
        self.stop_ids, stop_source = stop_ids(cfg, self.tokenizer)
        if jax.process_index() == 0:
            print(f"answers end at {self.stop_ids} ({stop_source}) or after {cfg.rollout.max_response_length} tokens",
                  flush=True)
        self.model_config, params = load_model(model_source(cfg), dtype=cfg.model.param_dtype,
                                               compute_dtype=cfg.model.compute_dtype,
                                               remat_policy=cfg.model.remat_policy, attention=cfg.model.attention,
                                               mesh=self.mesh, seed=cfg.seed)
        r = cfg.rollout
        length = config_lib.sequence_length(cfg)
        if length > self.model_config.max_position_embeddings:
            raise config_lib.ConfigError(
                f"data.max_prompt_length (rounded up to rollout.prompt_bucket) + rollout.max_response_length = "
                f"{length} exceeds the model's max_position_embeddings={self.model_config.max_position_embeddings}; "
                f"shorten one of them")
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise config_lib.ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model only "
                                         f"{self.model_config.vocab_size}; use the model's own tokenizer")
        self.data_counts: dict[str, int] = {}  # logged with the first record of the run
        self.train_records = load_prompts(cfg, "train", self.tokenizer, self.data_counts)
        self.eval_records = load_prompts(cfg, "eval", self.tokenizer, self.data_counts)
        self.stream = datasets.PromptStream(self.train_records, seed=cfg.seed)

        self.reward = rollout.RewardConfig(r.max_response_length, cfg.reward.overlong_buffer,
                                           cfg.reward.overlong_penalty_factor)
        update = make_update(cfg, self.model_config, self.mesh)
        self.rows, self.optim_config, self.updates_per_step = update.rows, update.optim_config, update.num_minibatches
        self.update = update
        # GRPO's KL penalty pulls towards the starting policy: a frozen copy of it (the train state's
        # buffers are donated to every update, so it cannot share them). A resumed run reloads it
        # from model.path, as it was at the start.
        self.ref_params = (jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)
                           if cfg.algorithm.kl_coef else None)
        self.state = train_step_lib.init_train_state(params, update.optimizer)
        self.train_step = update.train_step
        self.logprobs = rollout.make_logprob_fn(self.model_config, temperature=r.temperature,
                                                chunk_rows=update.microbatch_rows, mesh=self.mesh)
        self.host = HostState()
        self.carry: list[rollout.Group] = []
        self.warned_carry_only = False

    # -- one rollout step ----------------------------------------------------------------------------

    def fresh_groups(self, step: int, timer: dict) -> Iterator[rollout.Group]:
        """The step's new groups, scored, in prompt order, generated as they are asked for: one stream
        from the engine over the prompts the step may draw (rollout.stream), or generation batches of
        rollout.gen_prompts_per_batch prompts, each taken whole from the data. A stream leaves its
        prompts in the data stream: `step` takes the ones it used once it is done."""
        r = self.cfg.rollout
        # The params in the sampling layout, made once for the step's generation (device to device).
        params = sampling.sampling_layout(self.model_config, self.state.params, self.mesh)
        kwargs = dict(samples_per_prompt=r.samples_per_prompt, reward=self.reward, temperature=r.temperature,
                      top_p=r.top_p, top_k=r.top_k, prompt_bucket=r.prompt_bucket, mesh=self.mesh,
                      stop_ids=self.stop_ids, timer=timer, slots=config_lib.rollout_slots(self.cfg), pages=r.pages,
                      page_size=r.page_size)
        if r.stream:
            most = r.gen_prompts_per_batch * (r.max_gen_batches if r.dynamic_sampling else 1)
            yield from rollout.stream_groups(self.model_config, params, self.stream.peek(most), self.tokenizer,
                                             seed=seed_for(self.cfg.seed, step), **kwargs)
            return
        for batch_index in itertools.count():
            yield from rollout.stream_groups(self.model_config, params,
                                             self.stream.next_records(r.gen_prompts_per_batch), self.tokenizer,
                                             seed=seed_for(self.cfg.seed, step, batch_index), **kwargs)

    def step(self, step: int) -> dict[str, float]:
        r, timer = self.cfg.rollout, {"generate": 0.0, "reward": 0.0}
        start = time.perf_counter()
        fresh = self.fresh_groups(step, timer)
        try:
            with jax.profiler.TraceAnnotation("dapo/generate"):  # (named in a --config.profile trace)
                collected = dynamic_sampling.collect(
                    step, r.prompts_per_step, self.carry, fresh, per_batch=r.gen_prompts_per_batch,
                    whole_batches=not r.stream, dynamic=r.dynamic_sampling, carry_over=r.carry_over,
                    max_carry_age=r.max_carry_age, max_gen_batches=r.max_gen_batches, on_limit=r.on_gen_batch_limit)
        finally:
            fresh.close()  # the engine stops; the sampling-layout params are freed
        if r.stream:
            self.stream.next_records(len(collected.generated))
        if collected.partial:
            log.warning("step %d: training on a partial batch of %d of %d groups (rollout.on_gen_batch_limit="
                        "'train_partial')", step, len(collected.groups), r.prompts_per_step)
        if collected.gen_batches == 0 and not self.warned_carry_only:
            self.warned_carry_only = True
            log.warning("step %d generated nothing: the groups carried over from the step before filled its batch, "
                        "so it trains only on answers of an older policy (up to rollout.max_carry_age=%d steps; "
                        "dynamic_sampling/stale_frac and age_max report it on every step). Set "
                        "rollout.max_carry_age=0 to train every step on its own generations", step, r.max_carry_age)

        t = time.perf_counter()
        width = config_lib.row_width(self.cfg)
        with jax.profiler.TraceAnnotation("dapo/old_logp"):
            rollout.attach_logprobs(collected.groups + collected.carry, self.state.params, self.logprobs, width,
                                    ref_params=self.ref_params)
        old_logp_seconds = time.perf_counter() - t
        o = self.cfg.optim
        batch = packing.train_batch(
            rollout.answers(collected.groups, norm_by_std=self.cfg.algorithm.norm_by_std,
                            overlong_filter=self.cfg.reward.overlong_filter),
            num_minibatches=self.updates_per_step, per_minibatch=o.minibatch_size, budget=width,
            rows_per_micro=self.update.microbatch_rows, loss_config=self.update.loss_config, pack=o.packing)

        t = time.perf_counter()
        updates_before = int(self.state.updates)
        with jax.profiler.TraceAnnotation("dapo/update"):
            self.state, step_metrics = self.train_step(self.state, batch)
            step_metrics = {f"actor/{k}": float(v) for k, v in jax.device_get(step_metrics).items()}
        # The reference's actor/entropy is the generating policy's, on the batch, before any update; the
        # entropy the loss saw during the updates is kept beside it.
        step_metrics["actor/entropy_in_update"] = step_metrics.pop("actor/entropy")
        step_metrics["actor/entropy"] = rollout.entropy_before_update(collected.groups)
        update_seconds = time.perf_counter() - t

        self.carry = collected.carry
        generated_tokens = sum(g.num_tokens for g in collected.generated)
        trained_tokens = int(batch["loss_mask"].sum())
        self.host.generated_tokens += generated_tokens
        self.host.trained_tokens += trained_tokens
        seconds = time.perf_counter() - start
        lr = train_step_lib.learning_rate_schedule(self.optim_config, self.updates_per_step)(updates_before)
        out = {
            **metrics_lib.rollout_metrics(collected.generated, collected.groups),
            **step_metrics,
            "actor/lr": float(lr),
            "actor/grad_steps": int(self.state.updates),
            "rollout/logp_mismatch": logp_mismatch(collected.groups),
            **collected.metrics(),
            "dynamic_sampling/trained_token_frac": self.host.trained_tokens / max(self.host.generated_tokens, 1),
            "time/generate": timer["generate"], "time/reward": timer["reward"], "time/old_logp": old_logp_seconds,
            "time/update": update_seconds, "time/step": seconds,
            "perf/generated_tokens_per_s": generated_tokens / max(timer["generate"], 1e-9),
            "perf/tokens_per_s": (generated_tokens + trained_tokens) / seconds,
        }
        return out

    # -- evaluation and checkpoints ------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, float]:
        e = self.cfg.eval
        start = time.perf_counter()
        with jax.profiler.TraceAnnotation("dapo/eval"):
            metrics, results = evaluation.run_evaluation(
                self.model_config, self.state.params, self.eval_records, self.tokenizer,
                samples_per_prompt=e.samples_per_prompt, temperature=e.temperature, top_p=e.top_p,
                max_response_length=self.cfg.rollout.max_response_length, prompts_per_batch=e.prompts_per_batch,
                seed=seed_for(self.cfg.seed, 1 << 30), mesh=self.mesh, prompt_bucket=self.cfg.rollout.prompt_bucket,
                stop_ids=self.stop_ids, pages=self.cfg.rollout.pages, page_size=self.cfg.rollout.page_size)
        metrics["time/eval"] = time.perf_counter() - start
        if jax.process_index() == 0:
            out = self.workdir / "eval" / f"step_{step}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r) + "\n" for r in results))
        return metrics

    def host_json(self) -> dict:
        self.host.stream = self.stream.get_state()
        return self.host.to_json(self.carry)

    def restore(self, checkpointer: checkpoints.Checkpointer, step: int) -> None:
        self.state, host = checkpointer.restore(step, self.state)
        self.host = HostState(**{**host, "carry": []})
        # Checkpoints from before groups recorded their step carried them out of the step before the save.
        self.carry = [rollout.Group.from_json({"step": self.host.step - 1, **g}) for g in host["carry"]]
        self.stream.set_state(host["stream"])


def logp_mismatch(groups) -> float:
    """Mean |sampler log-prob - recomputed log-prob| per token: near 0 unless the sampler and the
    trainer disagree (or top-p / top-k truncation changes the sampling distribution)."""
    diffs = [np.abs(s - o) for g in groups for s, o in zip(g.sampler_logp, g.old_logp)]
    return float(np.mean(np.concatenate(diffs))) if diffs else 0.0


def _avg_key(metrics: dict) -> str:
    return next(k for k in metrics if k.startswith(f"eval/{evaluation.ALL_SOURCES}/avg@"))


# -- the loop ---------------------------------------------------------------------------------------


class Profile:
    """Traces the rollout steps `steps` (numbered as in metrics.jsonl) with the JAX profiler into
    <workdir>/tensorboard/plugins/profile/<time>/ (an .xplane.pb and a .trace.json.gz per host for
    TensorBoard's profile plugin, and perfetto_trace.json.gz), with the host-side spans dapo/generate, dapo/reward,
    dapo/old_logp, dapo/update and dapo/eval; one trace from the first step to the last."""

    def __init__(self, steps: range, workdir: Path):
        self.steps, self.directory, self.tracing = steps, workdir / "tensorboard", False

    def before(self, step: int) -> None:
        if step in self.steps and not self.tracing:
            options = jax.profiler.ProfileOptions()
            # No Python function tracing: it records every call (JAX's tracing of a step is millions)
            # and the trace viewer keeps the first 1,000,000 events, which ended the trace early.
            options.python_tracer_level = 0
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True, profiler_options=options)
            self.tracing = True

    def after(self, step: int) -> None:
        if self.tracing and step >= self.steps[-1]:
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            if jax.process_index() == 0:
                print(f"profile of rollout steps {self.steps[0]}-{self.steps[-1]} written to {self.directory}/plugins/"
                      f"profile (tensorboard --logdir {self.directory}, then the Profile tab)", flush=True)

    def __enter__(self) -> Profile:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


FINISHED = "finished.json"  # written last: a workdir holding it (for as many steps) has nothing left to do


def train(cfg: ml_collections.ConfigDict, workdir: str | Path,
          on_step_end: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train (or resume) in `workdir`; returns the last evaluation's metrics and the before/after summary.

    The workdir (and checkpoint.dir, when elsewhere) is locked for the run: a second run into it stops
    with an error naming the first. A finished run is not run again unless `steps` was raised.
    """
    config_lib.validate(cfg, jax.device_count())
    config_lib.local_directory(
        workdir, "--workdir", "config.json, metrics.jsonl, TensorBoard events, evaluation files and the Hugging Face "
        "export are written there as local files. Give a local --workdir and put the checkpoints on the bucket with "
        f"--config.checkpoint.dir={workdir} (on a pod every host writes its shards there); copy the workdir there "
        "afterwards if you want it on the bucket too (gcloud storage cp -r)")
    workdir = Path(workdir)
    checkpoint_dir = checkpoints.checkpoint_dir(cfg, workdir)
    with contextlib.ExitStack() as locks:
        _lock_run(locks, cfg, workdir, checkpoint_dir)
        return _train(cfg, workdir, checkpoint_dir, on_step_end)


def _on_every_host(value: bool) -> bool:
    """Process 0's `value`, on every process: decisions that read process 0's workdir are taken once."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.array(value)))


def _lock_run(locks: contextlib.ExitStack, cfg, workdir: Path, checkpoint_dir) -> None:
    """Process 0 locks the workdir (and checkpoint.dir when set elsewhere) before anything is
    written; every process learns whether it could, so none goes on alone into the collectives."""
    refused = None
    if jax.process_index() == 0:
        try:
            locks.enter_context(workdir_lock.Lock(workdir, "workdir"))
            if cfg.checkpoint.dir and str(checkpoint_dir) != str(workdir.absolute()):
                locks.enter_context(workdir_lock.Lock(checkpoint_dir, "checkpoint.dir"))
        except Exception as e:  # noqa: BLE001 - whatever stops process 0 must stop the others, not hang them
            refused = e
    if _on_every_host(refused is not None):
        raise refused or workdir_lock.WorkdirInUse("process 0 could not lock the workdir or checkpoint.dir; see its "
                                                   "error")


def _finished(workdir: Path, steps: int) -> dict | None:
    """The record of a run in `workdir` that finished at least `steps` steps, if there is one."""
    path = workdir / FINISHED
    record = None
    if jax.process_index() == 0 and path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # a damaged record: train on (and write it again at the end)
            log.warning("%s is unreadable (%s); treating the run as unfinished", path, e)
    done = _on_every_host(record is not None and record.get("step", -1) >= steps)
    return (record or {"step": steps, "metrics": {}}) if done else None


def _train(cfg, workdir: Path, checkpoint_dir, on_step_end) -> dict[str, float]:
    saved_config = workdir / "config.json"
    if saved_config.is_file() and checkpoint_dir.is_dir():
        changed = config_lib.resume_differences(json.loads(saved_config.read_text()), cfg)
        if changed:
            raise config_lib.ConfigError(
                f"{workdir} holds a run with other settings; resuming it with these would not continue it:\n  - "
                + "\n  - ".join(changed) + f"\nuse the saved settings ({saved_config}) or a new --workdir; only "
                f"{', '.join(config_lib.RESUMABLE_CHANGES)} may change on resume")
    say = print if jax.process_index() == 0 else (lambda *_, **__: None)
    finished = _finished(workdir, cfg.steps)
    if finished is not None:
        say(f"{workdir} holds a run that finished after {finished['step']} steps; nothing to do (raise "
            f"--config.steps to train it further, or use another --workdir)", flush=True)
        return finished["metrics"]
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        saved_config.write_text(cfg.to_json(indent=1))
    run = Run(cfg, workdir)
    checkpointer = checkpoints.Checkpointer(checkpoint_dir, keep=cfg.checkpoint.keep, timeout_s=cfg.checkpoint.timeout_s)
    latest = checkpointer.latest_step()
    if latest is not None:
        run.restore(checkpointer, latest)
        say(f"resumed from {checkpoint_dir} at step {latest}", flush=True)
    # Steps logged after the checkpoint resumed from are run again: their old records go.
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=cfg.tensorboard, resume_step=latest)

    if run.host.eval_before is None:
        run.host.eval_before = run.evaluate(0)
        writer.write(0, {**run.data_counts, **run.host.eval_before})
        say(f"held-out evaluation before training:\n{evaluation.format_table(run.host.eval_before)}", flush=True)

    bar = tqdm.tqdm(total=cfg.steps, initial=run.host.step, desc="rollout steps", disable=jax.process_index() != 0,
                    dynamic_ncols=True)
    with checkpoints.StopRequest() as stop, Profile(config_lib.profile_steps(cfg.profile), workdir) as profile:
        while run.host.step < cfg.steps:
            step = run.host.step
            profile.before(step + 1)
            step_metrics = run.step(step)
            run.host.step = step + 1
            done = run.host.step == cfg.steps
            if cfg.eval.every and run.host.step % cfg.eval.every == 0 and not done:
                step_metrics.update(run.evaluate(run.host.step))
            if run.host.step % cfg.log_every == 0 or done:
                writer.write(run.host.step, step_metrics)
            bar.update(1)
            bar.set_postfix(batch_acc=f"{step_metrics.get('batch/acc_mean', 0):.3f}",
                            gen_batches=step_metrics["dynamic_sampling/gen_batches"],
                            entropy=f"{step_metrics.get('actor/entropy', 0):.3f}")
            profile.after(run.host.step)
            if on_step_end is not None:
                on_step_end(run.host.step)
            stopping = stop.agreed()
            if run.host.step % cfg.checkpoint.every == 0 or done or stopping:
                checkpointer.save(run.host.step, run.state, run.host_json())
            if stopping:
                bar.close()
                checkpointer.close()
                writer.close()
                say(f"stopped by a signal after step {run.host.step}; checkpoint saved, rerun to resume", flush=True)
                return {}
    bar.close()
    checkpointer.close()

    final = run.evaluate(run.host.step)
    key = _avg_key(final)
    name = key.split("/")[-1]  # avg@k
    before, after = run.host.eval_before[key], final[key]
    summary = {f"summary/{name}_before": before, f"summary/{name}_after": after, f"summary/{name}_gain": after - before}
    writer.write(run.host.step, {**final, **summary})
    writer.close()
    say(f"held-out evaluation after {run.host.step} steps:\n{evaluation.format_table(final)}")
    say(f"held-out {key.removeprefix('eval/')}: {before:.4f} before training -> {after:.4f} after "
        f"({100 * (after - before):+.1f} points)", flush=True)
    if cfg.checkpoint.export_hf:
        # The chat template is the run's prompt format (its system turn or none), whatever the base model's was.
        out = hf.save_hf_checkpoint(workdir / "hf_final", run.model_config, run.state.params, overwrite=True,
                                    copy_files_from=_tokenizer_dir(cfg),
                                    chat_template=chat_template(system_prompt(cfg)))
        say(f"final policy written as a Hugging Face checkpoint to {out}", flush=True)
    if jax.process_index() == 0:
        tmp = workdir / f"{FINISHED}.tmp"
        tmp.write_text(json.dumps({"step": run.host.step, "metrics": {**final, **summary}}, indent=1))
        tmp.replace(workdir / FINISHED)
    return {**final, **summary}


def _tokenizer_dir(cfg) -> Path | None:
    source = Path(cfg.model.tokenizer or model_source(cfg))
    return source if source.is_dir() else source.parent if source.exists() else None


def default_workdir() -> str:
    """runs/dapo-<time>, the same name on every host of a multi-host run (process 0's clock)."""
    stamp = np.int64(time.time())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stamp = multihost_utils.broadcast_one_to_all(stamp)
    return f"runs/dapo-{time.strftime('%Y%m%d-%H%M%S', time.localtime(int(stamp)))}"


def main(argv):
    from absl import flags, logging as absl_logging

    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax narrates every save at INFO
    checkpoints.receive_stop_signals()  # before jax.distributed starts its threads
    sharding.initialize_distributed_from_flags()
    checkpoints.receive_stop_signals()  # SIGTERM back from jax.distributed's preemption notifier
    checkpoints.use_distributed_barriers()
    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or default_workdir()
    if jax.process_index() == 0:
        print(f"workdir: {workdir}", flush=True)
    with checkpoints.exit_on_failed_save():
        train(cfg, workdir)


if __name__ == "__main__":
    from absl import flags

    from dapo_jax import cli

    flags.DEFINE_string("workdir", "", "the run's directory; a fresh one under runs/ by default. A workdir with "
                                       "checkpoints resumes from the latest")
    sharding.define_distributed_flags()
    cli.run(main)
