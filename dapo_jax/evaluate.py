"""Evaluate a policy on a config's evaluation data: avg@k, pass@k and maj@k per data source.

    python -m dapo_jax.evaluate --config configs/dapo_qwen2_5_32b.py --checkpoint runs/32b            # latest
    python -m dapo_jax.evaluate --config configs/synthetic_tiny.py --checkpoint runs/tiny/checkpoints/40
    python -m dapo_jax.evaluate --checkpoint runs/tiny/hf_final --out results/tiny

`--checkpoint` is a Hugging Face directory, a training workdir (its latest checkpoint), or one
checkpoint step directory. The sampling settings are the config's `eval` section. The table is
printed; `<out>/metrics.json` and `<out>/samples.jsonl` (every answer, scored) are written.
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
        return checkpoints.checkpoint_dir(ml_collections.ConfigDict(run), path), None, saved
    if path.name.isdigit() and path.parent.is_dir():
        saved = path.parent.parent / "config.json"  # <workdir>/checkpoints/<step>
        return path.parent, int(path.name), saved if saved.is_file() else None
    return None


def load_policy(cfg: ml_collections.ConfigDict, checkpoint: str | Path, mesh):
    """(model config, params) from a Hugging Face directory or an orbax training checkpoint."""
    path = Path(checkpoint)
    kwargs = dict(dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype, mesh=mesh)
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
    run_cfg = ml_collections.ConfigDict(json.loads(saved.read_text())) if saved is not None else cfg
    model_config, params = load_model(train.model_source(run_cfg), seed=run_cfg.seed, **kwargs)
    optimizer = train_step.make_optimizer(train_step.OptimizerConfig(), 1)
    state, _ = checkpointer.restore(step, train_step.init_train_state(params, optimizer))
    checkpointer.close()
    return model_config, state.params


def evaluate(cfg: ml_collections.ConfigDict, checkpoint: str | Path, out: str | Path) -> dict[str, float]:
    config_lib.validate(cfg, jax.device_count())
    mesh = sharding.make_mesh(**cfg.mesh)
    own_tokenizer = not cfg.model.tokenizer and _orbax_step(Path(checkpoint)) is None and \
        (Path(checkpoint) / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(checkpoint) if own_tokenizer else train.load_policy_tokenizer(cfg)
    model_config, params = load_policy(cfg, checkpoint, mesh)
    records = train.load_prompts(cfg, "eval", tokenizer)
    e = cfg.eval
    start = time.perf_counter()
    metrics, results = evaluation.run_evaluation(
        model_config, params, records, tokenizer, samples_per_prompt=e.samples_per_prompt, temperature=e.temperature,
        top_p=e.top_p, max_response_length=cfg.rollout.max_response_length, prompts_per_batch=e.prompts_per_batch,
        seed=train.seed_for(cfg.seed, 1 << 30), mesh=mesh, prompt_bucket=cfg.rollout.prompt_bucket,
        stop_ids=train.stop_ids(cfg, tokenizer)[0])
    metrics["time/eval"] = time.perf_counter() - start
    if jax.process_index() == 0:
        out = Path(out)
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
    f = flags.FLAGS
    evaluate(f.config, f.checkpoint, f.out or f"eval_results/{time.strftime('%Y%m%d-%H%M%S')}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", str(Path(config_lib.__file__)), "a config file (get_config())")
    flags.DEFINE_string("checkpoint", None, "a Hugging Face directory, a training workdir, or a checkpoint step "
                                            "directory", required=True)
    flags.DEFINE_string("out", "", "where to write metrics.json and samples.jsonl")
    sharding.define_distributed_flags()
    app.run(main)
