"""Evaluate a policy on evaluation data: avg@k, pass@k and maj@k per data source.

    python -m dapo_jax.evaluate --checkpoint runs/tiny                          # a run's latest checkpoint
    python -m dapo_jax.evaluate --checkpoint runs/tiny/checkpoints/40 --config.eval.samples_per_prompt=32
    python -m dapo_jax.evaluate --checkpoint runs/tiny/hf_final --config configs/synthetic_tiny.py --out results/tiny

`--checkpoint` is a training workdir (its latest checkpoint), one checkpoint step directory, or a
Hugging Face directory. A run's checkpoint is scored on the run's own evaluation data with its own
settings (its workdir's config.json: data, eval, response length, stop ids, mesh); `--config.<field>=`
overrides single fields of it, and `--config <file>` replaces it. A Hugging Face directory uses
`--config` (the embedded default without it). The table is printed; `metrics.json` and
`samples.jsonl` (every answer, scored) are written to `--out`, by default
`<workdir>/eval_results/<checkpoint>-<time>/` beside the checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections

from dapo_jax import checkpoints, config as config_lib, evaluation, sharding, train, train_step
from dapo_jax.models.loading import load_model
from dapo_jax.tokenizer import load_tokenizer


def _orbax_step(path: Path) -> tuple[Path, int | None, Path | None] | None:
    """(the checkpoints directory, the step or None for the latest, the run's config.json if known)
    that `path` names, if it names one."""
    saved = path / "config.json"
    if saved.is_file() and "checkpoint" in (run := json.loads(saved.read_text())):  # a training workdir
        return checkpoints.checkpoint_dir(config_lib.from_saved(run), path), None, saved
    if path.name.isdigit() and path.parent.is_dir():
        saved = path.parent.parent / "config.json"  # <workdir>/checkpoints/<step>
        return path.parent, int(path.name), saved if saved.is_file() else None
    return None


def load_policy(cfg: ml_collections.ConfigDict, checkpoint: str | Path, mesh):
    """(model config, params) from a Hugging Face directory or an orbax training checkpoint."""
    path = Path(checkpoint)
    kwargs = dict(dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype, attention=cfg.model.attention,
                  mesh=mesh)
    orbax = _orbax_step(path)
    if orbax is None:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint} is neither a Hugging Face directory (config.json) nor a training "
                                    f"workdir (checkpoints/) nor a checkpoint step directory")
        return load_model(str(path), **kwargs)
    directory, step, saved = orbax
    checkpointer = checkpoints.Checkpointer(directory, keep=1 << 30)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory} holds no saved checkpoint yet")
    # The model is the one the run trained (its workdir's config.json), whatever --config says; the
    # train state's structure must match what was saved.
    run_cfg = config_lib.from_saved(json.loads(saved.read_text())) if saved is not None else cfg
    model_config, params = load_model(train.model_source(run_cfg), seed=run_cfg.seed, **kwargs)
    optimizer = train_step.make_optimizer(train_step.OptimizerConfig(), 1)
    state, _ = checkpointer.restore(step, train_step.init_train_state(params, optimizer))
    checkpointer.close()
    return model_config, state.params


def run_config(checkpoint: str | Path, cfg: ml_collections.ConfigDict | None = None,
               overrides: dict | None = None) -> tuple[ml_collections.ConfigDict, str]:
    """(the config to evaluate `checkpoint` with, where it came from): `cfg` if given, else the run's
    saved config.json if the checkpoint is a run's, else the embedded default; `overrides`
    ({"eval.top_p": 0.7}) applied on top."""
    orbax = _orbax_step(Path(checkpoint))
    saved = orbax[2] if orbax is not None else None
    if cfg is not None:
        source = "--config"
    elif saved is not None:
        cfg, source = config_lib.from_saved(json.loads(saved.read_text())), str(saved)
    else:
        cfg, source = config_lib.default_config(), "the embedded default (no --config given)"
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in (overrides or {}).items():
        *sections, field = key.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[field] = value
    if overrides:
        source += " with " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return cfg, source


def default_out(checkpoint: str | Path) -> Path:
    """`<workdir>/eval_results/<checkpoint>-<time>` for a run's checkpoint, `<parent>/eval_results/
    <name>-<time>` beside a Hugging Face directory."""
    path, stamp = Path(checkpoint).absolute(), time.strftime("%Y%m%d-%H%M%S")
    orbax = _orbax_step(path)
    if orbax is None:
        return path.parent / "eval_results" / f"{path.name}-{stamp}"
    workdir = path if orbax[1] is None else path.parent.parent
    return workdir / "eval_results" / f"{'latest' if orbax[1] is None else f'step_{orbax[1]}'}-{stamp}"


def evaluate(cfg: ml_collections.ConfigDict | None, checkpoint: str | Path, out: str | Path | None = None,
             overrides: dict | None = None) -> dict[str, float]:
    """Score `checkpoint`; `cfg` None takes the run's own settings (see `run_config`)."""
    config_lib.local_directory(checkpoint, "the checkpoint", "a run's workdir or a Hugging Face checkpoint is read "
                               "as local files; copy it from the bucket first (gcloud storage cp -r)")
    config_lib.local_directory(out or "", "--out", "metrics.json and samples.jsonl are written there as local files")
    cfg, source = run_config(checkpoint, cfg, overrides)
    config_lib.validate(cfg, jax.device_count())
    mesh = sharding.make_mesh(**cfg.mesh)
    own_tokenizer = not cfg.model.tokenizer and _orbax_step(Path(checkpoint)) is None and \
        (Path(checkpoint) / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(checkpoint) if own_tokenizer else train.load_policy_tokenizer(cfg)
    model_config, params = load_policy(cfg, checkpoint, mesh)
    records = train.load_prompts(cfg, "eval", tokenizer)
    e = cfg.eval
    out = Path(out) if out else default_out(checkpoint)
    stop_ids, stop_source = train.stop_ids(cfg, tokenizer)
    if jax.process_index() == 0:
        print(f"evaluating {checkpoint} on {len(records)} prompts of {cfg.data.eval!r} x {e.samples_per_prompt} "
              f"samples (temperature {e.temperature}, top-p {e.top_p}, answers end at {stop_ids} from {stop_source} "
              f"or after {cfg.rollout.max_response_length} tokens); settings from {source}; results to {out}",
              flush=True)
    start = time.perf_counter()
    metrics, results = evaluation.run_evaluation(
        model_config, params, records, tokenizer, samples_per_prompt=e.samples_per_prompt, temperature=e.temperature,
        top_p=e.top_p, max_response_length=cfg.rollout.max_response_length, prompts_per_batch=e.prompts_per_batch,
        seed=train.seed_for(cfg.seed, 1 << 30), mesh=mesh, prompt_bucket=cfg.rollout.prompt_bucket,
        stop_ids=stop_ids, pages=cfg.rollout.pages, page_size=cfg.rollout.page_size)
    metrics["time/eval"] = time.perf_counter() - start
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        print(evaluation.format_table(metrics))
        print(f"written to {out}/metrics.json and {out}/samples.jsonl", flush=True)
    return metrics


def main(argv):
    from absl import flags

    del argv
    sharding.initialize_distributed_from_flags()
    checkpoints.use_distributed_barriers()
    f = flags.FLAGS
    overrides = {name.removeprefix("config."): f[name].value for name in f if name.startswith("config.")
                 and f[name].present}
    evaluate(f.config if f["config"].present else None, f.checkpoint, f.out or None,
             overrides=None if f["config"].present else overrides)


if __name__ == "__main__":
    from absl import flags

    from dapo_jax import cli

    flags.DEFINE_string("checkpoint", None, "a training workdir, a checkpoint step directory, or a Hugging Face "
                                            "directory", required=True)
    flags.DEFINE_string("out", "", "where to write metrics.json and samples.jsonl (default: beside the checkpoint, "
                                   "under eval_results/)")
    sharding.define_distributed_flags()
    cli.run(main)
