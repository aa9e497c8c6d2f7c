"""Evaluation metrics over n sampled responses per problem: avg@n, pass@k and maj@n.

For one problem with n samples of which c are correct:

    avg@n   = c / n                                            mean accuracy of a single sample
    pass@k  = 1 - C(n-c, k) / C(n, k)                          unbiased estimate of P(any of k samples is correct)
            = 1 - prod_{i=n-c+1}^{n} (1 - k / i)               the same, without huge binomials (Chen et al. 2021)
    maj@k   = 1 if the most common valid prediction among the first k samples is correct, else 0

A data source's metric is the mean over its problems; "all" is the mean over every problem, each
problem weighted equally whatever its source. pass@1 equals avg@n, and pass@n is 1 exactly when c > 0.

`run_evaluation` samples the answers (with the evaluation's own settings: the paper uses temperature
1.0, top-p 0.7 and 32 samples per problem), scores them with the training reward, and summarises.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from dapo_jax.rewards.math_dapo import INVALID

ALL_SOURCES = "all"  # the name under which metrics over every problem are reported


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c of them correct, k drawn without replacement."""
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct samples is outside [0, n={n}]; count the correct samples among the n drawn")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside [1, n={n}]; pass@k needs at least k samples per problem, "
                         f"so use k <= {n} or draw more samples")
    if n - c < k:  # every k-subset holds a correct sample (and the product below would cross zero)
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(preds: Sequence[str | None]) -> str | None:
    """The most common prediction, ignoring None and "[INVALID]"; ties go to the one seen first.

    None when no prediction is valid.
    """
    counts = collections.Counter(p for p in preds if p is not None and p != INVALID)
    if not counts:
        return None
    return counts.most_common(1)[0][0]  # most_common keeps first-seen order among equal counts


def maj_at_k(preds: Sequence[str | None], ground_truth_correct: Sequence[bool], k: int) -> float:
    """maj@k for one problem: 1.0 if the majority vote over the first k samples is correct, else 0.0.

    The voted answer is correct if any of those k samples that predicted it is correct. `preds` are
    the scorer's normalised predictions and correctness is `pred == normalize(ground_truth)`, so all
    samples with one prediction agree on correctness and the vote needs no second normalisation or
    ground truth here. The first k samples are used, not a bootstrap over subsets, so the value is
    deterministic. No valid prediction among them counts as wrong.
    """
    if len(preds) != len(ground_truth_correct):
        raise ValueError(f"{len(preds)} predictions but {len(ground_truth_correct)} correctness flags; "
                         "pass one flag per prediction")
    if not 1 <= k <= len(preds):
        raise ValueError(f"k={k} is outside [1, {len(preds)}]; maj@k needs at least k samples per problem")
    voted = majority_vote(preds[:k])
    if voted is None:
        return 0.0
    return float(any(ok for p, ok in zip(preds[:k], ground_truth_correct[:k]) if p == voted))


def _pass_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, 8, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length())]
    return ks if ks[-1] == n else ks + [n]


def _problem_metrics(problems: Sequence[tuple[list[bool], list[str | None]]], n: int) -> dict[str, float]:
    """Metrics over `problems` (each its correctness flags and predictions), with n the per-problem count.

    Problems may hold more than n samples (only under "all", when sources differ in n): pass@k stays
    unbiased with each problem's own count, avg uses every sample, maj@n votes over the first n.
    """
    correct = [sum(flags) for flags, _ in problems]
    counts = [len(flags) for flags, _ in problems]
    metrics = {f"avg@{n}": float(np.mean([c / m for c, m in zip(correct, counts)]))}
    for k in _pass_ks(n):
        metrics[f"pass@{k}"] = float(np.mean([pass_at_k(m, c, k) for c, m in zip(correct, counts)]))
    metrics[f"maj@{n}"] = float(np.mean([maj_at_k(preds, flags, n) for flags, preds in problems]))
    metrics["problems"] = float(len(problems))
    return metrics


def summarize(samples: Iterable[Mapping]) -> dict[str, float]:
    """Per-source and overall metrics, keyed `eval/{source}/{avg@n, pass@k, maj@n, problems}`.

    Each sample is {"data_source": str, "uid": problem id, "correct": bool, "pred": str | None}; a
    problem's samples are taken in the order given. Every problem of a source must have the same
    number n of samples. Sources may differ in n; "all" then reports its metrics at the smallest n
    (see `_problem_metrics`). "all" is emitted even for a single source.
    """
    by_source: dict[str, dict[str, tuple[list[bool], list[str | None]]]] = {}
    for sample in samples:
        missing = {"data_source", "uid", "correct", "pred"} - sample.keys()
        if missing:
            raise ValueError(f"an evaluation sample lacks {sorted(missing)}; each needs data_source, uid, correct "
                             f"and pred, got keys {sorted(sample.keys())}")
        source = sample["data_source"]
        if source == ALL_SOURCES:
            raise ValueError(f'data_source "{ALL_SOURCES}" is reserved for the metrics over every source; rename it')
        flags, preds = by_source.setdefault(source, {}).setdefault(sample["uid"], ([], []))
        flags.append(bool(sample["correct"]))
        preds.append(sample["pred"])
    if not by_source:
        raise ValueError("no evaluation samples to summarize; check that the evaluation set is not empty")

    metrics: dict[str, float] = {}
    ns = []
    for source in sorted(by_source):
        problems = by_source[source]
        counts = collections.Counter(len(flags) for flags, _ in problems.values())
        if len(counts) > 1:
            raise ValueError(f"data source {source!r} has problems with different sample counts "
                             f"{dict(sorted(counts.items()))} (samples: problems); draw the same n for every problem")
        n = next(iter(counts))
        ns.append(n)
        for name, value in _problem_metrics(list(problems.values()), n).items():
            metrics[f"eval/{source}/{name}"] = value
    every_problem = [p for problems in by_source.values() for p in problems.values()]
    for name, value in _problem_metrics(every_problem, min(ns)).items():
        metrics[f"eval/{ALL_SOURCES}/{name}"] = value
    return metrics


def format_table(metrics: Mapping[str, float]) -> str:
    """A table of `summarize`'s output: one line per source (problems, n, avg@n, pass@n, maj@n), "all" last.

    Keys outside `eval/` (training metrics logged alongside) are ignored.
    """
    by_source: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if not key.startswith("eval/"):
            continue
        source, _, name = key.removeprefix("eval/").rpartition("/")
        by_source.setdefault(source, {})[name] = value
    order = sorted(s for s in by_source if s != ALL_SOURCES) + [s for s in by_source if s == ALL_SOURCES]

    width = max(len("source"), *(len(s) for s in order))
    lines = [f"{'source':<{width}}  {'problems':>8}  {'n':>4}  {'avg@n':>7}  {'pass@n':>7}  {'maj@n':>7}"]
    for source in order:
        values = by_source[source]
        n = next(int(name.removeprefix("avg@")) for name in values if name.startswith("avg@"))
        lines.append(f"{source:<{width}}  {int(values['problems']):>8}  {n:>4}  {values[f'avg@{n}']:>7.4f}  "
                     f"{values[f'pass@{n}']:>7.4f}  {values[f'maj@{n}']:>7.4f}")
    return "\n".join(lines)


def run_evaluation(model_config, params, records, tokenizer, *, samples_per_prompt: int, temperature: float,
                   top_p: float, max_response_length: int, prompts_per_batch: int, seed: int,
                   stop_ids: Sequence[int], prompt_bucket: int = 32, mesh=None, pages: int = 0,
                   page_size: int = 64) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-sample results) for `records` (PromptRecords): avg@k, pass@k and maj@k per data
    source and over all, plus the mean response length. Truncated answers count as they are scored."""
    from dapo_jax import rollout  # the sampler pulls in JAX; the metrics above do not need it

    reward = rollout.RewardConfig(max_response_length=max_response_length)
    results = []
    for g in rollout.stream_groups(model_config, params, records, tokenizer, samples_per_prompt=samples_per_prompt,
                                   reward=reward, temperature=temperature, top_p=top_p, top_k=0, seed=seed,
                                   prompt_bucket=prompt_bucket, stop_ids=stop_ids, mesh=mesh,
                                   slots=prompts_per_batch * samples_per_prompt, pages=pages, page_size=page_size):
        for text, acc, pred, response in zip(g.texts, g.accs, g.preds, g.responses):
            results.append({"data_source": g.record.data_source, "uid": g.record.uid, "correct": acc,
                            "pred": pred, "response": text, "length": len(response),
                            "ground_truth": g.record.ground_truth})
    metrics = summarize(results)
    metrics["eval_stats/response_length_mean"] = float(np.mean([r["length"] for r in results]))
    return metrics, results
