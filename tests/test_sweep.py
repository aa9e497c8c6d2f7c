"""The sweep runner: grid parsing and config overrides, a real 2x2 sweep of short runs with its summary
table and plots, a finished run left alone on a second call, and the report's arithmetic over seeds."""

import csv
import json

import numpy as np
import pytest

from dapo_jax import config as config_lib, sweep
from dapo_jax.sweep import RunSpec, SweepError

LADDER = "configs/ladder.py"
TINY = "configs/synthetic_tiny.py"


def test_the_grid_is_every_combination_times_every_seed():
    specs = sweep.grid(sweep.parse_sweep("algorithm.clip_high=0.2,0.28; steps=4; preset=grpo,dapo"), seeds=3)
    assert len(specs) == 2 * 2 * 3
    assert [s.name for s in specs[:4]] == ["algorithm.clip_high=0.2,preset=grpo,seed=0",
                                           "algorithm.clip_high=0.2,preset=grpo,seed=1",
                                           "algorithm.clip_high=0.2,preset=grpo,seed=2",
                                           "algorithm.clip_high=0.2,preset=dapo,seed=0"]
    assert all(s.fixed == (("steps", "4"),) for s in specs)  # a single value is an override, not in the name
    assert len({s.name for s in specs}) == 12 and len({s.combo_name for s in specs}) == 4


@pytest.mark.parametrize("spec, message", [
    ("steps", "write key=value1,value2"),
    ("steps=", "write key=value1,value2"),
    ("steps=1,2;steps=3", "swept twice"),
    ("steps=1,1", "repeated"),
])
def test_a_malformed_sweep_says_what_to_write(spec, message):
    with pytest.raises(SweepError, match=message):
        sweep.parse_sweep(spec)


def test_overrides_take_the_fields_type_and_unknown_fields_are_named():
    cfg = sweep.build_config(TINY, RunSpec((("optim.learning_rate", "1e-4"), ("rollout.dynamic_sampling", "false")),
                                           (("steps", "7"),), seed=5))
    assert cfg.optim.learning_rate == 1e-4 and cfg.rollout.dynamic_sampling is False and cfg.steps == 7
    assert cfg.seed == 5
    with pytest.raises(SweepError, match=r"unknown config field optim\.learning_rat \(did you mean "
                                         r"optim\.learning_rate\?\); optim has: grad_clip, learning_rate, "):
        sweep.build_config(TINY, RunSpec((("optim.learning_rat", "1"),), (), 0))
    with pytest.raises(SweepError, match="unknown config field optimizer.lr; the config has: .*sections: .*optim"):
        sweep.build_config(TINY, RunSpec((("optimizer.lr", "1"),), (), 0))
    with pytest.raises(SweepError, match="data.synthetic is a section, not a field; .* data.synthetic.max_ops"):
        sweep.build_config(TINY, RunSpec((("data.synthetic", "1"),), (), 0))
    with pytest.raises(SweepError, match="steps='ten': the field holds a int"):
        sweep.build_config(TINY, RunSpec((("steps", "ten"),), (), 0))
    with pytest.raises(SweepError, match="no 'preset' to sweep"):
        sweep.build_config(TINY, RunSpec((("preset", "grpo"),), (), 0))


def test_a_dry_run_refuses_unknown_fields_before_printing_any_command(tmp_path, capsys):
    argv = ["--config", TINY, "--workdir", str(tmp_path), "--dry-run", "--sweep", "steps=3;rollout.not_a_field=1,2"]
    assert sweep.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: unknown config field rollout.not_a_field; rollout has: carry_over,")


def test_the_ladder_presets_are_the_ablation_rungs_on_the_ladder_task():
    specs = sweep.sweep_specs(LADDER, None, None)  # the file's own SWEEP and SEEDS
    assert len(specs) == len(config_lib.ABLATION_LADDER) * 3
    grpo = sweep.build_config(LADDER, specs[0])
    dapo = sweep.build_config(LADDER, specs[-1])
    assert grpo.algorithm.clip_high == grpo.algorithm.clip_low and not grpo.rollout.dynamic_sampling
    assert dapo.algorithm.clip_high > dapo.algorithm.clip_low and dapo.rollout.dynamic_sampling
    assert dapo.seed == 2 and dapo.rollout.max_response_length == 40 and dapo.data.synthetic.max_ops == 4
    for cfg in (grpo, dapo):
        assert config_lib.problems(cfg, 8) == []
    command = sweep.train_command(LADDER, specs[3], sweep.Path("runs/ladder"))
    assert command == ("python -m dapo_jax.train --config=configs/ladder.py:overlong_filtering "
                       "--workdir=runs/ladder/preset=overlong_filtering,seed=0 --config.seed=0")
    launch = sweep.train_command(LADDER, specs[3], sweep.Path("runs/ladder"), "launch/tpu.sh --name dapo")
    assert launch == ("launch/tpu.sh --name dapo --config=configs/ladder.py:overlong_filtering "
                      "--workdir=runs/ladder/preset=overlong_filtering,seed=0 run -- --config.seed=0")


def test_a_2x2_sweep_runs_reports_and_skips_finished_runs(tmp_path, capsys):
    grid = ("algorithm.clip_high=0.2,0.28;algorithm.agg_mode=token-mean,seq-mean-token-mean;steps=2;"
            "rollout.prompts_per_step=4;rollout.samples_per_prompt=4;rollout.gen_prompts_per_batch=8;"
            "rollout.on_gen_batch_limit=train_partial;optim.minibatch_size=8;data.synthetic.train_problems=200;"
            "data.eval_problems=8;eval.samples_per_prompt=2;eval.every=1;checkpoint.export_hf=false;tensorboard=false")
    argv = ["--config", TINY, "--sweep", grid, "--seeds", "1", "--workdir", str(tmp_path)]
    assert sweep.main(argv) == 0
    runs = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [r["status"] for r in runs] == ["done"] * 4
    assert {(r["algorithm.clip_high"], r["algorithm.agg_mode"]) for r in runs} == {
        ("0.2", "token-mean"), ("0.2", "seq-mean-token-mean"), ("0.28", "token-mean"), ("0.28", "seq-mean-token-mean")}
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(summary) == 4 and all(r["seeds"] == "1" and r["steps"] == "2" for r in summary)
    for run, row in zip(runs, summary):  # one seed each: the mean is the run's figure, the spread 0
        final = json.loads((tmp_path / run["run"] / "result.json").read_text())["final"]["eval/all/avg@2"]
        assert float(row["final_avg@2_mean"]) == pytest.approx(final, abs=1e-4)
        assert float(row["final_avg@2_std"]) == 0.0
    table = (tmp_path / "summary.md").read_text()
    assert "algorithm.clip_high=0.28,algorithm.agg_mode=token-mean" in table
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} >= {"overview.png", "eval_all_avg.png",
                                                                    "actor_entropy.png"}
    stamps = {r["run"]: (tmp_path / r["run"] / "result.json").stat().st_mtime_ns for r in runs}
    capsys.readouterr()

    assert sweep.main(argv) == 0  # again: nothing is rerun, the report is the same
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert stamps == {r["run"]: (tmp_path / r["run"] / "result.json").stat().st_mtime_ns for r in runs}
    assert (tmp_path / "summary.md").read_text() == table

    changed = argv[:3] + [grid.replace("steps=2", "steps=2;algorithm.clip_low=0.1")] + argv[4:]
    with pytest.raises(SweepError, match="(?s)other settings.*clip_low: saved 0.2, now 0.1"):
        sweep.run_all(TINY, sweep.sweep_specs(TINY, changed[3], 1), tmp_path)


def _fake_run(workdir, spec, evals, entropy, grad_per_step=2):
    """A finished run's files, with held-out accuracy `evals` at steps 0, 10, 20, ..."""
    run = workdir / spec.name
    run.mkdir(parents=True)
    lines = []
    steps = 10 * (len(evals) - 1)
    for step in range(steps + 1):
        record = {"step": step}
        if step:
            record.update({"actor/entropy": entropy, "actor/grad_steps": grad_per_step * step,
                           "rollout/acc_mean": 0.5, "rollout/response_length_mean": 20.0,
                           "rollout/token_prob_mean": 0.8, "dynamic_sampling/filtered_frac": 0.3})
        if step % 10 == 0:
            record.update({"eval/all/avg@4": evals[step // 10], "eval/all/maj@4": evals[step // 10],
                           "eval/all/pass@4": 1.0})
        lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "result.json").write_text(json.dumps({"seconds": 10.0, "config": {}}))


def test_the_report_averages_seeds_and_counts_steps_to_the_baseline(tmp_path):
    specs = sweep.grid(sweep.parse_sweep("preset=grpo,dapo"), seeds=2)
    curves = {"preset=grpo,seed=0": [0.1, 0.2, 0.3], "preset=grpo,seed=1": [0.1, 0.3, 0.5],
              "preset=dapo,seed=0": [0.1, 0.45, 0.6], "preset=dapo,seed=1": [0.1, 0.35, 0.6]}
    for spec in specs:
        _fake_run(tmp_path, spec, curves[spec.name], entropy=1.0 if "dapo" in spec.name else 0.5)
    report = sweep.write_report(specs, tmp_path)
    grpo, dapo = report.combos
    assert grpo["final_avg@4_mean"] == pytest.approx(0.4) and grpo["final_avg@4_std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert (grpo["final_avg@4_min"], grpo["final_avg@4_max"]) == (0.3, 0.5)
    assert dapo["final_avg@4_mean"] == pytest.approx(0.6) and dapo["entropy_end_mean"] == 1.0
    # the baseline (the first combination) ends at 0.4; dapo's mean curve is 0.4 at step 10 = 20 updates
    assert report.reach == {"preset=grpo": (20, 40), "preset=dapo": (10, 20)}
    assert "| preset=dapo | 2 | 20 | 60.0 ± 0.0 [60.0, 60.0] |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "plots" / "overview.png").stat().st_size > 10_000
    # a run that never finished is listed, and left out of the means
    (tmp_path / "preset=dapo,seed=1" / "result.json").unlink()
    report = sweep.build_report(specs, tmp_path)
    assert [r["status"] for r in report.runs] == ["done", "done", "done", "unfinished"]
    assert report.combos[1]["seeds"] == 1 and report.combos[1]["final_avg@4_mean"] == pytest.approx(0.6)
