"""Config sweeps: every combination of a grid of config values x seeds, one training run each, then
one summary table and the training-dynamics plots.

    python -m dapo_jax.sweep --config configs/ladder.py --workdir runs/ladder
    python -m dapo_jax.sweep --config configs/synthetic_tiny.py --workdir runs/lr \
        --sweep "optim.learning_rate=1e-4,2e-4;algorithm.clip_high=0.2,0.28" --seeds 3

`--sweep` is `key=v1,v2;key=v1,...`. A key is a config field (`rollout.max_response_length`) or
`preset`, the argument of the config file's get_config (`configs/ladder.py` takes an ablation rung).
A key with one value is a fixed override and stays out of the run names. Without `--sweep` /
`--seeds` the config file's own `SWEEP` / `SEEDS` are used, so an experiment is one command.

Runs go one after another on this host, each into `<workdir>/<key=value,...,seed=N>/` (a normal
training workdir). A run that finished (its `result.json` is there, written last) is skipped; one
that was interrupted resumes from its checkpoint; one that failed is reported and rerun next time.
On a pod, `--dry-run` prints each run's `python -m dapo_jax.train` command, and with
`--launch "launch/tpu.sh --name NAME --zone ZONE"` the `launch/tpu.sh ... run` that starts it on a slice.

Outputs, rebuilt from the runs' metrics.jsonl after every sweep (or alone with `--report-only`):
    runs.csv      one row per run: final and best held-out accuracy, entropy, length, time
    summary.csv   one row per combination: those figures' mean, standard deviation and range over seeds
    summary.md    both tables, and how many steps each combination needs to reach the first one's
                  final accuracy
    plots/*.png   held-out and training accuracy, entropy, response length, token probability and
                  the share of all-right / all-wrong groups against the training step, one line per
                  combination (mean over seeds, min-max shaded)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
import traceback
from pathlib import Path

import ml_collections
import numpy as np

from dapo_jax import cli, config as config_lib
from dapo_jax.metrics import read_metrics

PRESET = "preset"
RESULT = "result.json"
SMOOTH = 5  # steps in the moving mean of per-step curves


class SweepError(ValueError):
    """The sweep cannot run as asked; the message says what to change."""


# -- the grid ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]


def parse_sweep(spec: str) -> list[Axis]:
    """`key=v1,v2;key=v1` -> axes, in order."""
    axes, problems = [], []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        key, eq, values = part.partition("=")
        key, values = key.strip(), tuple(v.strip() for v in values.split(","))
        if not eq or not key or not all(values):
            problems.append(f"{part!r}: write key=value1,value2 (no empty values)")
        elif key in {a.key for a in axes}:
            problems.append(f"{key!r} is swept twice: list all its values once")
        elif len(set(values)) != len(values):
            problems.append(f"{key}: a value is repeated in {','.join(values)}")
        else:
            axes.append(Axis(key, values))
    if problems:
        raise SweepError("--sweep " + repr(spec) + ":\n  - " + "\n  - ".join(problems))
    return axes


@dataclasses.dataclass(frozen=True)
class RunSpec:
    combo: tuple[tuple[str, str], ...]  # the swept (key, value) pairs that name the run
    fixed: tuple[tuple[str, str], ...]  # single-valued axes: set on every run
    seed: int

    @property
    def combo_name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.combo) or "base"

    @property
    def name(self) -> str:
        """The run's directory name: its swept values and seed, filesystem-safe."""
        parts = [f"{k}={v}" for k, v in self.combo] + [f"seed={self.seed}"]
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))

    @property
    def overrides(self) -> tuple[tuple[str, str], ...]:
        return self.fixed + self.combo


def grid(axes: list[Axis], seeds: int) -> list[RunSpec]:
    """Every combination x seed, combination-major (all seeds of the first combination first)."""
    if seeds < 1:
        raise SweepError(f"--seeds={seeds}: run at least 1 seed")
    fixed = tuple((a.key, a.values[0]) for a in axes if len(a.values) == 1)
    swept = [a for a in axes if len(a.values) > 1]
    combos = itertools.product(*[[(a.key, v) for v in a.values] for a in swept])
    return [RunSpec(tuple(c), fixed, s) for c in combos for s in range(seeds)]


# -- one run's config -------------------------------------------------------------------------------


def _convert(key: str, text: str, current):
    """`text` as the type of the field's current value."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise SweepError(f"{key}={text!r}: the field holds a {type(current).__name__} "
                         f"(now {current!r}); give a value of that type") from None
    return text


def set_field(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    problem = cli.unknown_field(cfg, key)
    if problem:
        raise SweepError(problem)
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise SweepError(f"{key} is a section, not a field; set its fields one by one: "
                         f"{', '.join(f'{key}.{k}' for k in sorted(node[leaf].keys()))}")
    node[leaf] = _convert(key, text, node[leaf])


def build_config(config: str, spec: RunSpec) -> ml_collections.ConfigDict:
    path, arg = cli.split_config_arg(config)
    module = config_lib.load_config_file(path)
    preset = dict(spec.overrides).get(PRESET)
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    if preset is not None and arg is not None:
        raise SweepError(f"--config {config!r} fixes the preset; sweep 'preset' with --config {path} alone")
    if preset is not None and not takes_arg:
        raise SweepError(f"{path}'s get_config() takes no argument, so there is no 'preset' to sweep; "
                         f"sweep config fields instead")
    arg = preset if preset is not None else arg
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    for key, value in spec.overrides:
        if key != PRESET:
            set_field(cfg, key, value)
    cfg.seed = spec.seed
    return cfg


# -- running ----------------------------------------------------------------------------------------


def _write_json_atomically(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def is_finished(run_dir: Path, cfg: ml_collections.ConfigDict) -> bool:
    """Whether `run_dir` holds a finished run of exactly `cfg`; a finished run of another config is
    an error (the sweep's settings changed under the same workdir)."""
    result = run_dir / RESULT
    if not result.is_file():
        return False
    saved = json.loads(result.read_text())["config"]
    if not config_lib.config_differences(saved, cfg):
        return True
    changed = config_lib.resume_differences(saved, cfg)
    if changed:
        raise SweepError(f"{run_dir} holds a finished run with other settings:\n  - " + "\n  - ".join(changed)
                         + "\nuse a new --workdir for the changed sweep, or restore its settings")
    return False  # only steps / eval / checkpoint settings changed: train() resumes and extends it


def run_all(config: str, specs: list[RunSpec], workdir: Path, train_fn=None) -> dict[str, str]:
    """Run (or skip) every spec in order; returns run name -> "done" | "skipped" | "failed" | "stopped"."""
    import jax

    if train_fn is None:
        from dapo_jax.train import train as train_fn
    configs = {s.name: build_config(config, s) for s in specs}
    problems = [f"{name}: {p}" for name, c in configs.items() for p in config_lib.problems(c, jax.device_count())]
    if problems:  # every run checked before the first one starts
        raise SweepError("the sweep has runs that cannot start:\n  - " + "\n  - ".join(problems))
    finished = {s.name: is_finished(workdir / s.name, configs[s.name]) for s in specs}  # changed settings: now
    status = {}
    for i, spec in enumerate(specs):
        cfg, run_dir = configs[spec.name], workdir / spec.name
        prefix = f"[{i + 1}/{len(specs)}] {spec.name}"
        if finished[spec.name]:
            print(f"{prefix}: finished before, skipped", flush=True)
            status[spec.name] = "skipped"
            continue
        print(f"{prefix}: running in {run_dir}", flush=True)
        start = time.perf_counter()
        try:
            final = train_fn(cfg, run_dir)
        except Exception:  # noqa: BLE001 - one failed run should not cost the others; reported below
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
            print(f"{prefix}: FAILED (traceback in {run_dir / 'error.txt'})\n{traceback.format_exc()}", flush=True)
            status[spec.name] = "failed"
            continue
        if not final:  # stopped by a signal: the checkpoint is saved, and so is the rest of the sweep
            status[spec.name] = "stopped"
            print(f"{prefix}: stopped; rerun the sweep to resume it and the runs after it", flush=True)
            break
        _write_json_atomically(run_dir / RESULT, {"name": spec.name, "combo": dict(spec.combo), "seed": spec.seed,
                                                  "final": final, "seconds": time.perf_counter() - start,
                                                  "config": cfg.to_dict()})
        status[spec.name] = "done"
    return status


def train_command(config: str, spec: RunSpec, workdir: Path, launcher: str = "") -> str:
    """The one-run command (the same run this sweep would do): `python -m dapo_jax.train ...`, or with
    `launcher` (e.g. "launch/tpu.sh --name dapo --zone us-east5-a") its `run` on a TPU slice."""
    path, arg = cli.split_config_arg(config)
    preset = dict(spec.overrides).get(PRESET, arg)
    config_flag = f"--config={path}" + (f":{preset}" if preset is not None else "")
    workdir_flag = f"--workdir={workdir / spec.name}"
    flags = [f"--config.seed={spec.seed}"] + [f"--config.{k}={v}" for k, v in spec.overrides if k != PRESET]
    if launcher:
        return " ".join([launcher, shlex.quote(config_flag), shlex.quote(workdir_flag), "run", "--",
                         *(shlex.quote(f) for f in flags)])
    return "python -m dapo_jax.train " + " ".join(shlex.quote(f) for f in [config_flag, workdir_flag, *flags])


# -- the report -------------------------------------------------------------------------------------


def _avg_key(records: list[dict]) -> str | None:
    return next((k for r in records for k in r if k.startswith("eval/all/avg@")), None)


def _series(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


def run_figures(run_dir: Path) -> dict:
    """One run's final and best held-out figures and its end-of-training dynamics."""
    records = read_metrics(run_dir)
    key = _avg_key(records)
    if key is None:
        return {}
    k = key.split("@")[-1]
    evals = _series(records, key)
    final_step = max(evals)
    final = next(r for r in reversed(records) if r.get(key) is not None)
    best_step = max(evals, key=lambda s: (evals[s], -s))
    tail = [r for r in records if "actor/entropy" in r][-SMOOTH:]
    out = {"steps": final_step, f"final_avg@{k}": evals[final_step], f"best_avg@{k}": evals[best_step],
           "best_step": best_step, f"final_maj@{k}": final.get(f"eval/all/maj@{k}"),
           f"final_pass@{k}": final.get(f"eval/all/pass@{k}")}
    for name, metric in (("entropy_end", "actor/entropy"), ("response_length_end", "rollout/response_length_mean"),
                         ("filtered_frac_end", "dynamic_sampling/filtered_frac")):
        values = [r[metric] for r in tail if r.get(metric) is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


def _spread(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def _mean_curve(run_dirs: list[Path], key: str) -> dict[int, float]:
    """Mean over runs at the steps every run has."""
    series = [_series(read_metrics(d), key) for d in run_dirs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return {step: float(np.mean([s[step] for s in series])) for step in steps}


def steps_to_reach(run_dirs: list[Path], key: str, target: float) -> tuple[int, int] | None:
    """(rollout step, gradient steps) of the first evaluation whose mean over seeds reaches `target`."""
    curve = _mean_curve(run_dirs, key)
    grad = _mean_curve(run_dirs, "actor/grad_steps")
    for step, value in curve.items():
        if value >= target - 1e-12:
            return step, int(round(grad.get(step, 0)))
    return None


@dataclasses.dataclass
class Report:
    runs: list[dict]  # per run: name, the swept values, seed, status, figures
    combos: list[dict]  # per combination: its name, seeds, and each figure's mean/std/min/max
    baseline: str | None
    reach: dict[str, tuple[int, int] | None]  # combination -> steps to the baseline's final accuracy
    avg_key: str | None


def build_report(specs: list[RunSpec], workdir: Path, status: dict[str, str] | None = None) -> Report:
    status = status or {}
    runs, by_combo = [], {}
    for spec in specs:
        run_dir = workdir / spec.name
        figures = run_figures(run_dir) if (run_dir / RESULT).is_file() else {}
        state = status.get(spec.name) or ("done" if figures else "failed" if (run_dir / "error.txt").is_file()
                                          else "unfinished" if run_dir.is_dir() else "not run")
        if state == "skipped":
            state = "done"
        seconds = json.loads((run_dir / RESULT).read_text())["seconds"] if figures else None
        runs.append({"run": spec.name, **dict(spec.combo), "seed": spec.seed, "status": state,
                     **figures, "seconds": seconds})
        if figures:
            by_combo.setdefault(spec.combo_name, []).append((run_dir, {**figures, "seconds": seconds}))
    combos = []
    for spec in specs:
        if spec.combo_name in {c["combo"] for c in combos} or spec.combo_name not in by_combo:
            continue
        done = by_combo[spec.combo_name]
        row = {"combo": spec.combo_name, **dict(spec.combo), "seeds": len(done)}
        for name in done[0][1]:
            values = [f[name] for _, f in done if isinstance(f.get(name), (int, float))]
            if values and name not in ("steps", "best_step"):
                row.update({f"{name}_{stat}": v for stat, v in _spread(values).items()})
        row["steps"] = int(max(f["steps"] for _, f in done))
        combos.append(row)
    run_dirs = {c["combo"]: [d for d, _ in by_combo[c["combo"]]] for c in combos}
    avg_key = next((k for d in run_dirs.values() for k in [_avg_key(read_metrics(d[0]))] if k), None)
    baseline = combos[0]["combo"] if combos else None
    reach = {}
    if baseline is not None and avg_key is not None:
        k = avg_key.split("@")[-1]
        target = combos[0][f"final_avg@{k}_mean"]
        reach = {c["combo"]: steps_to_reach(run_dirs[c["combo"]], avg_key, target) for c in combos}
    return Report(runs, combos, baseline, reach, avg_key)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: "" if r.get(k) is None else r[k] for k in columns} for r in rows)


def markdown(report: Report) -> str:
    lines = []
    if report.avg_key is not None:
        k = report.avg_key.split("@")[-1]
        metric = f"avg@{k}"
        lines += [f"Held-out accuracy ({metric}) and end-of-training dynamics per combination: mean ± standard "
                  f"deviation over seeds [min, max]. Entropy, response length and the filtered share are means "
                  f"over the last {SMOOTH} steps.", "",
                  f"| combination | seeds | steps | final {metric} | best {metric} | final maj@{k} | final pass@{k} "
                  f"| entropy | response length | all-right/wrong groups | steps to {report.baseline}'s final "
                  f"{metric} (gradient steps) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in report.combos:
            def cell(name, pct=False):
                if f"{name}_mean" not in c:
                    return ""
                scale = 100 if pct else 1
                return (f"{scale * c[name + '_mean']:.1f} ± {scale * c[name + '_std']:.1f} "
                        f"[{scale * c[name + '_min']:.1f}, {scale * c[name + '_max']:.1f}]" if pct else
                        f"{c[name + '_mean']:.3g} ± {c[name + '_std']:.2g}")
            reach = report.reach.get(c["combo"])
            lines.append(f"| {c['combo']} | {c['seeds']} | {c['steps']} | {cell(f'final_avg@{k}', True)} | "
                         f"{cell(f'best_avg@{k}', True)} | {cell(f'final_maj@{k}', True)} | "
                         f"{cell(f'final_pass@{k}', True)} | {cell('entropy_end')} | {cell('response_length_end')} | "
                         f"{cell('filtered_frac_end')} | "
                         f"{'not reached' if reach is None else f'{reach[0]} ({reach[1]})'} |")
        lines += ["", "Accuracies in percent."]
    metric = report.avg_key.split("/")[-1] if report.avg_key else "accuracy"
    lines += ["", "Runs:", "", f"| run | status | final {metric} (%) | best (step) | entropy | seconds |",
              "|---|---|---|---|---|---|"]
    for r in report.runs:
        final = next((v for key, v in r.items() if key.startswith("final_avg@")), None)
        best = next((v for key, v in r.items() if key.startswith("best_avg@")), None)
        best_cell = "" if best is None else f"{100 * best:.1f} ({r['best_step']})"
        final_cell = "" if final is None else f"{100 * final:.1f}"
        lines.append(f"| {r['run']} | {r['status']} | {final_cell} | {best_cell} | "
                     f"{_fmt(r.get('entropy_end'))} | {_fmt(r.get('seconds'))} |")
    return "\n".join(lines) + "\n"


PLOTS = (  # (metric, title, smoothed): the paper's training-dynamics figures
    ("eval/all/avg@", "held-out accuracy (avg@k)", False),
    ("rollout/acc_mean", "training accuracy (answers generated)", True),
    ("actor/entropy", "entropy of the policy", True),
    ("rollout/response_length_mean", "mean response length (tokens)", True),
    ("rollout/token_prob_mean", "mean probability of sampled tokens", True),
    ("dynamic_sampling/filtered_frac", "groups all right or all wrong", True),
)


def _smooth(steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Trailing moving mean over SMOOTH steps."""
    return np.array([values[max(0, i - SMOOTH + 1):i + 1].mean() for i in range(len(values))])


def plot(report: Report, specs: list[RunSpec], workdir: Path) -> list[Path]:
    """One PNG per metric and an overview grid, under <workdir>/plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = workdir / "plots"
    out_dir.mkdir(exist_ok=True)
    run_dirs = {}
    for spec in specs:
        if (workdir / spec.name / RESULT).is_file():
            run_dirs.setdefault(spec.combo_name, []).append(workdir / spec.name)
    if not run_dirs:
        return []
    written = []
    overview, grid_axes = plt.subplots(2, 3, figsize=(16, 8.5))

    def draw(ax, key, title, smoothed):
        for i, (combo, dirs) in enumerate(run_dirs.items()):
            if key.endswith("@") and report.avg_key:
                key = report.avg_key
            series = [_series(read_metrics(d), key) for d in dirs]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            x = np.array(steps)
            ys = np.array([[s[t] for t in steps] for s in series], np.float64)
            if smoothed:
                ys = np.stack([_smooth(x, y) for y in ys])
            color = f"C{i % 10}"
            ax.plot(x, ys.mean(0), color=color, label=combo, marker="o" if not smoothed else None, markersize=3)
            if len(ys) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, linewidth=0)
        if report.avg_key:
            title = title.replace("avg@k", report.avg_key.split("/")[-1])
        ax.set_title(title + (f" ({SMOOTH}-step moving mean)" if smoothed else ""), fontsize=10)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)

    for (key, title, smoothed), ax in zip(PLOTS, grid_axes.flat):
        draw(ax, key, title, smoothed)
        fig, single = plt.subplots(figsize=(7, 4.5))
        draw(single, key, title, smoothed)
        single.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / (key.strip("@/").replace("/", "_").replace("@", "") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    handles, labels = grid_axes.flat[0].get_legend_handles_labels()
    overview.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    overview.suptitle(f"{workdir.name}: mean over seeds, min-max shaded")
    overview.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = out_dir / "overview.png"
    overview.savefig(path, dpi=110)
    plt.close(overview)
    return [path] + written


def write_report(specs: list[RunSpec], workdir: Path, status: dict[str, str] | None = None) -> Report:
    workdir.mkdir(parents=True, exist_ok=True)
    report = build_report(specs, workdir, status)
    _write_csv(workdir / "runs.csv", report.runs)
    _write_csv(workdir / "summary.csv", report.combos)
    (workdir / "summary.md").write_text(markdown(report))
    plot(report, specs, workdir)
    return report


# -- the command ------------------------------------------------------------------------------------


def sweep_specs(config: str, sweep: str | None, seeds: int | None) -> list[RunSpec]:
    """The runs `--config/--sweep/--seeds` ask for (the config file's SWEEP / SEEDS fill the gaps)."""
    path, _ = cli.split_config_arg(config)
    module = config_lib.load_config_file(path)
    sweep = sweep if sweep is not None else getattr(module, "SWEEP", "")
    seeds = seeds if seeds is not None else getattr(module, "SEEDS", 1)
    return grid(parse_sweep(sweep), seeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dapo_jax.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config file, optionally with :arg")
    parser.add_argument("--sweep", help="key=v1,v2;key=v1,... (default: the config file's SWEEP)")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 per combination (default: the file's SEEDS or 1)")
    parser.add_argument("--workdir", required=True, help="the sweep's directory; each run gets a subdirectory")
    parser.add_argument("--dry-run", action="store_true", help="print each run's train command and exit")
    parser.add_argument("--launch", default="", metavar="PREFIX",
                        help="with --dry-run: print each run as `PREFIX --config .. --workdir .. run -- ..`, e.g. "
                             "\"launch/tpu.sh --name dapo --zone us-east5-a\" (each run its own launch on a pod)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables and plots, run nothing")
    args = parser.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax narrates every save at INFO
    workdir = Path(args.workdir)
    try:
        specs = sweep_specs(args.config, args.sweep, args.seeds)
        if args.dry_run:
            for spec in specs:  # every run's fields and values checked before any command is printed
                build_config(args.config, spec)
            for spec in specs:
                print(train_command(args.config, spec, workdir, args.launch))
            return 0
        status = {} if args.report_only else run_all(args.config, specs, workdir)
    except (SweepError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = write_report(specs, workdir, status)
    print(markdown(report))
    print(f"tables: {workdir / 'summary.md'}, {workdir / 'summary.csv'}, {workdir / 'runs.csv'}; "
          f"plots: {workdir / 'plots'}", flush=True)
    bad = [name for name, s in status.items() if s in ("failed", "stopped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
