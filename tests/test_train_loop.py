"""The training loop end to end, on the embedded model and an 8-device mesh: a few rollout steps with
metrics, TensorBoard, checkpoints and the Hugging Face export; a SIGTERM stop and resume (from a gs://
bucket on a local Cloud Storage emulator) that ends with exactly the parameters of an uninterrupted run; the generation-batch limit; bad configs."""

import collections
import gzip
import json
import os
import signal

import jax
import numpy as np
import pytest

from dapo_jax import config as config_lib, dynamic_sampling, evaluate, hf, train
from dapo_jax.metrics import read_metrics


def small_config(steps=3):
    c = config_lib.default_config()
    c.steps = steps
    c.rollout.prompts_per_step = 4
    c.rollout.samples_per_prompt = 4
    c.rollout.gen_prompts_per_batch = 8
    c.rollout.on_gen_batch_limit = "train_partial"
    c.optim.minibatch_size = 8  # 2 updates per step, 8 rows: one per device
    c.data.synthetic.train_problems = 200
    c.data.eval_problems = 8
    c.eval.samples_per_prompt = 2
    c.eval.every = 2
    c.checkpoint.every = 1
    return c


def params_of(workdir):
    _, params = hf.load_hf_checkpoint(workdir / "hf_final")
    return jax.tree_util.tree_leaves(params)


def test_a_run_logs_checkpoints_and_exports(tmp_path):
    traced = small_config(steps=3)
    traced.profile = "2-3"
    out = train.train(traced, tmp_path)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 3]
    assert "eval/all/avg@2" in records[0] and "eval/all/avg@2" in records[2]  # before training, and every 2 steps
    assert records[0]["data/train_prompts_truncated"] == 0 and "data/eval_prompts_truncated" in records[0]
    for key in ("rollout/acc_mean", "rollout/reward_mean", "rollout/response_length_mean", "rollout/truncated_frac",
                "actor/entropy", "actor/token_prob", "actor/clip_frac_high", "actor/clip_frac_low", "actor/approx_kl",
                "actor/grad_norm", "actor/lr", "dynamic_sampling/gen_batches", "dynamic_sampling/filtered_frac",
                "dynamic_sampling/trained_token_frac", "perf/tokens_per_s", "time/generate", "time/reward",
                "time/old_logp", "time/update", "rollout/logp_mismatch"):
        assert key in records[1], key
    assert records[1]["rollout/logp_mismatch"] < 1e-4  # the sampler and the trainer agree on log-probs
    # the generating policy's entropy on the batch (the reference's actor/entropy) and the updates' mean
    assert records[1]["actor/entropy"] == pytest.approx(records[1]["actor/entropy_in_update"], rel=0.05)
    assert records[1]["actor/updates_applied"] == 2
    summary = records[-1]
    assert summary["summary/avg@2_after"] == out["summary/avg@2_after"] == summary["eval/all/avg@2"]
    assert summary["summary/avg@2_before"] == records[0]["eval/all/avg@2"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # --config.profile=2-3: one trace of those two steps (and the evaluation after step 2) for
    # TensorBoard's profile plugin, which reads the .xplane.pb: it holds the loop's named spans. The
    # JSON exports keep the first 1,000,000 events, which a CPU step on 8 devices nearly fills.
    (trace,) = (tmp_path / "tensorboard" / "plugins" / "profile").iterdir()
    (xplane,) = trace.glob("*.xplane.pb")
    for span in (b"dapo/generate", b"dapo/reward", b"dapo/old_logp", b"dapo/update", b"dapo/eval"):
        assert span in xplane.read_bytes(), span
    events = json.loads(gzip.decompress((trace / "perfetto_trace.json.gz").read_bytes()))["traceEvents"]
    names = collections.Counter(e.get("name") for e in events if e.get("ph") == "X")
    assert names["dapo/generate"] >= 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]  # keep=2
    assert len((tmp_path / "eval" / "step_0.jsonl").read_text().splitlines()) == 8 * 2
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 3
    embedded = jax.tree_util.tree_leaves(hf.load_hf_checkpoint(config_lib.EMBEDDED_MODEL)[1])
    assert any(not np.array_equal(a, b) for a, b in zip(params_of(tmp_path), embedded))  # it trained
    assert (tmp_path / "hf_final" / "tokenizer.json").is_file()

    # The evaluation entry point on the run's latest checkpoint, with the run's own data and settings
    # (its config.json, not the default's 200 problems x 8 samples), reproduces the run's final evaluation,
    # and writes beside it.
    again = evaluate.evaluate(None, tmp_path)
    assert again["eval/all/avg@2"] == summary["eval/all/avg@2"]
    (written,) = (tmp_path / "eval_results").iterdir()
    assert written.name.startswith("latest-") and len((written / "samples.jsonl").read_text().splitlines()) == 8 * 2
    fewer = evaluate.evaluate(None, tmp_path, tmp_path / "one", overrides={"eval.samples_per_prompt": 1})
    assert "eval/all/avg@1" in fewer and len((tmp_path / "one" / "samples.jsonl").read_text().splitlines()) == 8
    assert "eval/all/pass@2" in evaluate.evaluate(small_config(), tmp_path / "hf_final", tmp_path / "from_hf")

    # Run again, the finished workdir is left as it is; with more steps it trains on.
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    events = sorted((tmp_path / "tensorboard").iterdir())
    assert train.train(small_config(steps=3), tmp_path)["summary/avg@2_after"] == out["summary/avg@2_after"]
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before
    assert sorted((tmp_path / "tensorboard").iterdir()) == events
    train.train(small_config(steps=4), tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 3, 4, 4]


def test_stop_and_resume_from_a_bucket_gives_the_same_parameters_as_never_stopping(tmp_path, gcs):
    """The stopped run keeps its checkpoints on a gs:// bucket (the `gcs` emulator), as on a pod."""
    train.train(small_config(steps=4), tmp_path / "straight")
    gcs.mkdir("runs")

    def on_bucket(steps=4):
        c = small_config(steps)
        c.checkpoint.dir = "gs://runs/stopped"
        return c

    def sigterm_after_step_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train.train(on_bucket(), tmp_path / "stopped", on_step_end=sigterm_after_step_2) == {}
    assert not (tmp_path / "stopped" / "hf_final").exists() and not (tmp_path / "stopped" / "checkpoints").exists()
    gcs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in gcs.ls("runs/stopped")) == ["1", "2"]  # keep=2, and no lock left
    assert [r["step"] for r in read_metrics(tmp_path / "stopped")] == [0, 1, 2]
    changed = on_bucket()
    changed.rollout.samples_per_prompt = 8
    with pytest.raises(config_lib.ConfigError, match="rollout.samples_per_prompt: saved 4, now 8"):
        train.train(changed, tmp_path / "stopped")
    train.train(on_bucket(), tmp_path / "stopped")  # resumes from the step-2 checkpoint on the bucket
    for a, b in zip(params_of(tmp_path / "straight"), params_of(tmp_path / "stopped")):
        np.testing.assert_array_equal(a, b)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 4]
    assert resumed[3]["rollout/acc_mean"] == straight[3]["rollout/acc_mean"]


def test_the_generation_batch_limit_stops_with_an_explanation(tmp_path):
    c = small_config(steps=1)
    c.rollout.on_gen_batch_limit = "error"
    c.rollout.max_gen_batches = 2
    c.data.synthetic.update(min_ops=3, max_ops=3, max_operand=900)  # far beyond the warmed-up model
    with pytest.raises(dynamic_sampling.GenerationBatchLimit, match="max_gen_batches=2.*all wrong.*too hard"):
        train.train(c, tmp_path)


def test_an_invalid_config_fails_before_anything_is_loaded(tmp_path):
    c = small_config()
    c.optim.minibatch_size = 5
    with pytest.raises(config_lib.ConfigError, match="minibatch_size=5 does not divide the 16 answers"):
        train.train(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_file_data_is_validated_deduplicated_and_tokenised(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"problem": "2 + 3", "answer": 5}, {"problem": "2 + 3", "answer": 5}, {"problem": "7 - 1", "answer": "6"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = small_config()
    c.data.train, c.data.max_prompt_length = str(path), 400
    tokenizer = train.load_policy_tokenizer(c)
    counts = {}
    records = train.load_prompts(c, "train", tokenizer, counts)
    assert [r.ground_truth for r in records] == ["5", "6"]  # the repeated prompt is dropped
    assert counts == {"data/train_rows_read": 3, "data/train_duplicates_dropped": 1,
                      "data/train_bad_rows_skipped": 0, "data/train_prompts_truncated": 0}  # logged at step 0
    assert tokenizer.decode(records[0].prompt_ids).rstrip().endswith("assistant")

    c.data.max_prompt_length, c.data.truncation = 40, "error"
    with pytest.raises(ValueError, match=r"problems.jsonl:0.*data.max_prompt_length"):
        train.load_prompts(c, "train", tokenizer)

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"problem": "1 + 1", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match=r"problems.jsonl: row 1.*skip_bad_rows"):
        train.load_prompts(c, "train", tokenizer)


def test_resuming_drops_the_records_of_steps_that_run_again(tmp_path):
    from dapo_jax.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path)
    for step in range(6):
        writer.write(step, {"rollout/acc_mean": step / 10})
    writer.close()
    MetricsWriter(tmp_path, resume_step=3).close()  # the latest checkpoint was step 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_groups_come_in_prompt_order_whatever_the_slots():
    from dapo_jax import rollout
    from dapo_jax.models.loading import load_model

    cfg = small_config()
    tokenizer = train.load_policy_tokenizer(cfg)
    model_config, params = load_model(train.model_source(cfg))
    records = train.load_prompts(cfg, "eval", tokenizer)[:7]
    kwargs = dict(samples_per_prompt=2, reward=rollout.RewardConfig(16), temperature=1.0, top_p=1.0, top_k=0,
                  seed=3, prompt_bucket=8, stop_ids=tokenizer.eos_ids)
    few = rollout.generate_groups(model_config, params, records, tokenizer, slots=3, **kwargs)
    assert [g.record.uid for g in few] == [r.uid for r in records]
    assert all(len(g.responses) == 2 for g in few)
    every = rollout.generate_groups(model_config, params, records, tokenizer, **kwargs)
    assert [g.responses for g in every] == [g.responses for g in few]
    # a stream closed early hands back the groups before it, the same
    stream = rollout.stream_groups(model_config, params, records, tokenizer, slots=4, **kwargs)
    first = [next(stream) for _ in range(3)]
    stream.close()
    assert [g.responses for g in first] == [g.responses for g in few[:3]]


def test_a_streamed_step_takes_the_same_groups_whatever_finishes_first(tmp_path, monkeypatch):
    from dapo_jax import dynamic_sampling
    from dapo_jax.data import datasets

    taken, collect = [], dynamic_sampling.collect
    monkeypatch.setattr(dynamic_sampling, "collect", lambda *a, **k: taken.append(collect(*a, **k)) or taken[-1])
    runs = []
    for chunk in (1, 0):  # the engine's slots: one prompt's answers at a time, or a generation batch's
        c = small_config()
        c.rollout.generation_chunk = chunk
        runs.append(train.Run(c, tmp_path / str(chunk)))
        runs[-1].step(0)
    one_at_a_time, together = taken
    assert [g.record.uid for g in one_at_a_time.groups] == [g.record.uid for g in together.groups]
    assert [g.responses for g in one_at_a_time.generated] == [g.responses for g in together.generated]
    assert len(together.groups) == 4 and together.generated[-1].informative and together.carry == []
    # the prompts it did not reach stay in the data stream for the next step
    used = datasets.PromptStream(runs[0].train_records, seed=small_config().seed)
    used.next_records(len(together.generated))
    assert runs[0].stream.get_state() == runs[1].stream.get_state() == used.get_state()


def test_the_reference_policy_is_the_starting_policy_and_stays_frozen(tmp_path):
    c = small_config(steps=2)
    c.algorithm.kl_coef = 0.05
    run = train.Run(c, tmp_path)
    start = [np.asarray(x) for x in jax.tree_util.tree_leaves(run.state.params)]
    metrics = [run.step(0), run.step(1)]
    for ref, before in zip(jax.tree_util.tree_leaves(run.ref_params), start):
        np.testing.assert_array_equal(np.asarray(ref), before)
    now = jax.tree_util.tree_leaves(run.state.params)
    assert any(not np.array_equal(np.asarray(a), b) for a, b in zip(now, start))  # the policy moved, the reference not
    assert metrics[1]["actor/ref_kl"] > 0  # k3 of the moved policy against the reference


@pytest.mark.parametrize("rung", config_lib.ABLATION_LADDER)
def test_every_rung_of_the_ablation_ladder_trains(rung, tmp_path):
    """A 2-step smoke of each preset of configs/ladder.py, cut down to a few prompts."""
    c = config_lib.load_config_file(train.Path(__file__).parents[1] / "configs" / "ladder.py").ladder_task()
    c.steps, c.eval.every, c.checkpoint.every, c.data.eval_problems, c.eval.samples_per_prompt = 2, 0, 2, 4, 2
    c.rollout.update(prompts_per_step=4, samples_per_prompt=4, gen_prompts_per_batch=8,
                     on_gen_batch_limit="train_partial")
    c.optim.minibatch_size = 8
    c = config_lib.ablation(c, rung)
    train.train(c, tmp_path)
    step = read_metrics(tmp_path)[2]
    assert step["step"] == 2 and np.isfinite(step["actor/pg_loss"]) and step["actor/updates_applied"] >= 1
    assert ("actor/ref_kl" in step) == (rung == "grpo")


def test_stop_ids_come_from_the_config_then_generation_config_then_the_tokenizer(tmp_path):
    import shutil

    c = small_config()
    tokenizer = train.load_policy_tokenizer(c)
    end_of_text, end_of_turn = tokenizer.token_id("<|endoftext|>"), tokenizer.token_id("<|im_end|>")
    assert train.stop_ids(c, tokenizer) == ((end_of_turn,), str(config_lib.EMBEDDED_MODEL / "generation_config.json"))
    model = tmp_path / "model"
    shutil.copytree(config_lib.EMBEDDED_MODEL, model)
    c.model.path = str(model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, end_of_turn]}))
    assert train.stop_ids(c, tokenizer)[0] == (end_of_text, end_of_turn)
    (model / "generation_config.json").unlink()
    assert train.stop_ids(c, tokenizer) == ((end_of_turn,), "the tokenizer's eos token")  # tokenizer_config.json
    c.rollout.stop_ids = "<|endoftext|>, 5"
    assert train.stop_ids(c, tokenizer) == ((end_of_text, 5), "rollout.stop_ids")
    c.rollout.stop_ids = "<|not_a_token|>"
    with pytest.raises(config_lib.ConfigError, match="'<|not_a_token|>' is not a token id or a token"):
        train.stop_ids(c, tokenizer)


def test_generation_stops_only_on_the_stop_ids(tmp_path):
    """The embedded model ends its answers with <|im_end|>: told to stop on <|endoftext|> only, it
    writes past it, as a Qwen2.5 base model served by vLLM writes past its <|im_end|>."""
    from dapo_jax import rollout
    from dapo_jax.models.loading import load_model

    c = small_config()
    tokenizer = train.load_policy_tokenizer(c)
    model_config, params = load_model(train.model_source(c))
    records = train.load_prompts(c, "eval", tokenizer)[:4]
    end_of_text, end_of_turn = tokenizer.token_id("<|endoftext|>"), tokenizer.token_id("<|im_end|>")
    kwargs = dict(samples_per_prompt=2, reward=rollout.RewardConfig(24), temperature=1.0, top_p=1.0, top_k=0,
                  seed=1, prompt_bucket=8)
    turn = rollout.generate_groups(model_config, params, records, tokenizer, stop_ids=(end_of_turn,), **kwargs)
    answers = [r for g in turn for r in g.responses]
    assert all(r[-1] == end_of_turn and end_of_turn not in r[:-1] for r in answers if len(r) < 24)
    text = rollout.generate_groups(model_config, params, records, tokenizer, stop_ids=(end_of_text,), **kwargs)
    answers = [r for g in text for r in g.responses]
    assert any(end_of_turn in r[:-1] for r in answers)  # written past, counted in the length


HOLD_LOCK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("workdir_lock", sys.argv[1])
workdir_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workdir_lock)
with workdir_lock.Lock(sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_into_a_workdir_in_use_is_refused_before_writing(tmp_path):
    import subprocess
    import sys

    from dapo_jax import workdir_lock

    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir_lock.__file__, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lock.WorkdirInUse, match=f"workdir {tmp_path} is in use by pid {first.pid}"):
            train.train(small_config(), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing of the second run's
    finally:
        first.stdin.close()
        first.wait(timeout=30)
    assert not (tmp_path / ".lock").exists()


def test_a_step_on_packed_rows_trains_as_one_answer_per_row(tmp_path):
    plain = small_config(steps=1)
    plain.optim.packing = False
    packed = small_config(steps=1)
    packed.optim.pack_budget, packed.optim.microbatch_size = 96, 8  # up to ~3 answers a row, 8 rows a pass
    a, b = train.Run(plain, tmp_path / "a"), train.Run(packed, tmp_path / "b")
    ma, mb = a.step(0), b.step(0)
    assert ma["rollout/acc_mean"] == mb["rollout/acc_mean"] and ma["actor/tokens"] == mb["actor/tokens"]
    for key in ("actor/pg_loss", "actor/entropy_in_update", "actor/clip_frac", "actor/grad_norm", "actor/entropy",
                "rollout/logp_mismatch"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), key
    # Adam's first steps move a parameter by about lr * sign(gradient): where a gradient is ~0, float32 sums in
    # another order can flip that sign. So: no parameter further apart than the 2 updates' 2 x lr each way,
    # fewer than 1 in 10,000 more than 1e-6 apart, 1e-7 on average.
    diffs = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in
                            zip(jax.tree_util.tree_leaves(b.state.params), jax.tree_util.tree_leaves(a.state.params))])
    assert diffs.max() <= 4 * plain.optim.learning_rate and np.mean(diffs > 1e-6) < 1e-4 and diffs.mean() < 1e-7
