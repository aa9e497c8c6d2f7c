"""Where a run's figures go: `<workdir>/metrics.jsonl` (one JSON object per line, with `step`) and
TensorBoard event files in `<workdir>/tensorboard` (the same names, "@" spelled "_at_"), written by
the first process only.

    tensorboard --logdir <workdir>/tensorboard
    python -c "import pandas; print(pandas.read_json('<workdir>/metrics.jsonl', lines=True))"
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np


def _plain(value):
    value = float(value) if isinstance(value, (np.floating, np.integer, jax.Array)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    def __init__(self, workdir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        """resume_step: the step a resumed run continues from; records logged after it are dropped
        (the steps are run again)."""
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, float | int | str], **extra) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in {**metrics, **extra}.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k.replace("@", "_at_"), v, step)  # TensorBoard tags have no "@"
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else math.nan


def _extreme(fn, x) -> float:
    return float(fn(x)) if len(x) else math.nan


def rollout_metrics(generated, trained) -> dict[str, float]:
    """Reward, accuracy, response-length and token-probability figures over this step's generated
    answers, the shares of groups that came back all correct / all wrong, and the trained groups'
    accuracy (what the gradient saw).

    Every key is present on every step: a step that generated nothing (its carry filled the batch)
    reports NaN for the rollout figures (null in metrics.jsonl, skipped by TensorBoard).
    """
    scores = np.array([s for g in generated for s in g.scores], np.float64)
    rewards = np.array([s for g in generated for s in g.rewards], np.float64)
    accs = np.array([a for g in generated for a in g.accs], np.float64)
    lengths = np.array([len(r) for g in generated for r in g.responses], np.float64)
    truncated = np.array([t for g in generated for t in g.truncated], np.float64)
    probs = np.exp(np.concatenate([x for g in generated for x in g.sampler_logp] or [[]]).astype(np.float64))
    return {
        "rollout/score_mean": _mean(scores), "rollout/reward_mean": _mean(rewards),
        "rollout/reward_max": _extreme(np.max, rewards), "rollout/reward_min": _extreme(np.min, rewards),
        "rollout/acc_mean": _mean(accs),
        "rollout/response_length_mean": _mean(lengths), "rollout/response_length_max": _extreme(np.max, lengths),
        "rollout/response_length_min": _extreme(np.min, lengths), "rollout/truncated_frac": _mean(truncated),
        # The paper's "mean probability" of the sampled tokens (under the sampling distribution).
        "rollout/token_prob_mean": _mean(probs),
        "rollout/all_correct_frac": _mean([all(g.accs) for g in generated]),
        "rollout/all_wrong_frac": _mean([not any(g.accs) for g in generated]),
        "batch/acc_mean": _mean([a for g in trained for a in g.accs]),
        "batch/reward_mean": _mean([r for g in trained for r in g.rewards]),
    }
