"""Run configs: every shipped config validates; invalid combinations fail before anything compiles,
saying what to change; the ablation ladder switches the paper's techniques on one at a time."""

from pathlib import Path

import pytest

from dapo_jax import config as config_lib

CONFIGS = Path(__file__).parent.parent / "configs"


def load(name, arg=None):
    module = config_lib.load_config_file(CONFIGS / name)
    return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("name,devices", [("synthetic_tiny.py", 1), ("synthetic_tiny.py", 8),
                                          ("dapo_qwen2_5_32b.py", 16), ("qwen2_5_0_5b.py", 8),
                                          ("qwen2_5_1_5b.py", 8), ("qwen2_5_7b.py", 8), ("ladder.py", 1),
                                          ("dynamics.py", 1)])
def test_shipped_configs_validate(name, devices):
    config_lib.validate(load(name), devices)


def test_the_dynamics_study_s_arms_differ_from_the_full_recipe_in_one_field_each():
    def flat(c, prefix=""):
        return {k: v for key, node in c.items()
                for k, v in (flat(node, f"{prefix}{key}.").items() if hasattr(node, "items") else [(prefix + key, node)])}
    base = flat(load("dynamics.py", "dapo"))
    assert (base["algorithm.clip_low"], base["algorithm.clip_high"], base["algorithm.agg_mode"]) == (0.2, 0.28, "token-mean")
    for arm, changed in (("symmetric_clip", {"algorithm.clip_high": 0.2}),
                         ("seq_mean_token_mean", {"algorithm.agg_mode": "seq-mean-token-mean"})):
        config = load("dynamics.py", arm)
        config_lib.validate(config, 1)
        other = flat(config)
        assert {k: v for k, v in other.items() if base[k] != v} == changed, arm


def test_the_32b_config_is_the_papers_recipe():
    c = load("dapo_qwen2_5_32b.py")
    assert (c.rollout.prompts_per_step, c.rollout.samples_per_prompt, c.optim.minibatch_size) == (512, 16, 512)
    assert (c.algorithm.clip_low, c.algorithm.clip_high, c.algorithm.agg_mode) == (0.2, 0.28, "token-mean")
    assert (c.data.max_prompt_length, c.rollout.max_response_length, c.reward.overlong_buffer) == (2048, 20480, 4096)
    assert (c.optim.learning_rate, c.optim.warmup_steps, c.optim.weight_decay, c.optim.grad_clip) == (1e-6, 20, 0.1, 1.0)
    assert (c.eval.samples_per_prompt, c.eval.temperature, c.eval.top_p) == (32, 1.0, 0.7)
    assert (c.rollout.gen_prompts_per_batch, c.rollout.max_gen_batches, c.rollout.dynamic_sampling) == (1536, 10, True)
    assert c.algorithm.kl_coef == 0 and c.algorithm.entropy_coef == 0


def problems_with(devices=1, **changes):
    c = config_lib.default_config()
    for dotted, value in changes.items():
        node = c
        *path, leaf = dotted.split("__")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config_lib.problems(c, devices)


@pytest.mark.parametrize("changes,expected", [
    (dict(algorithm__clip_low=1.2), "algorithm.clip_low=1.2 must be in [0, 1)"),
    (dict(algorithm__clip_high=-0.1), "algorithm.clip_high=-0.1"),
    (dict(algorithm__clip_c=0.5), "algorithm.clip_c=0.5 must be > 1"),
    (dict(algorithm__agg_mode="sum"), "algorithm.agg_mode='sum'"),
    (dict(optim__minibatch_size=48), "optim.minibatch_size=48 does not divide the 128 answers"),
    (dict(optim__microbatch_size=24), "optim.microbatch_size=24 does not divide optim.minibatch_size=64"),
    (dict(reward__overlong_buffer=48), "reward.overlong_buffer=48 must be in [0, rollout.max_response_length=48)"),
    (dict(rollout__samples_per_prompt=1), "with samples_per_prompt=1 none can"),
    (dict(rollout__dynamic_sampling=False), "set rollout.gen_prompts_per_batch=16"),
    (dict(rollout__on_gen_batch_limit="wait"), "rollout.on_gen_batch_limit='wait'"),
    (dict(data__truncation="right"), "data.truncation='right'"),
    (dict(rollout__top_p=0.0), "rollout.top_p=0.0 must be in (0, 1]"),
    (dict(model__attention="flash"), "model.attention='flash': use one of ('auto', 'dense', 'blockwise', 'splash', 'cudnn')"),
    (dict(algorithm__clip_high=5.0), "algorithm.clip_high=5.0 must be in [0, 1] (the paper: 0.28)"),
    (dict(algorithm__kl_coef=-0.01), "algorithm.kl_coef=-0.01 must be >= 0"),
    (dict(algorithm__kl_estimator="low_var"), "algorithm.kl_estimator='low_var': use one of ('k1', 'k2', 'k3')"),
    (dict(rollout__gen_prompts_per_batch=2, rollout__max_gen_batches=4), "could never fill its batch"),
    (dict(log_every=0), "log_every and eval.prompts_per_batch must be >= 1"),
    (dict(rollout__prompt_bucket=0), "rollout.prompt_bucket=0 must be >= 1"),
    (dict(mesh__tensor=3), "does not fit the 1 devices"),
    (dict(optim__pack_budget=64), "optim.pack_budget=64 cannot hold the longest prompt + answer (data.max_prompt_length "
                                  "40 + rollout.max_response_length 48 = 88 tokens); raise it to at least that"),
    (dict(optim__pack_budget=-1), "optim.pack_budget=-1 must be >= 0"),
])
def test_invalid_combinations_say_what_to_change(changes, expected):
    found = problems_with(**changes)
    assert any(expected in p for p in found), found


def test_batch_rows_must_split_over_the_data_parallel_devices():
    found = problems_with(devices=8, optim__microbatch_size=4)
    assert any("do not split over the 8 data-parallel devices" in p and "multiple of 8" in p for p in found), found


def test_a_pass_takes_microbatch_size_rows_of_the_pack_budget_at_most_a_minibatch():
    c = config_lib.default_config()
    assert c.optim.packing and config_lib.row_width(c) == 88 and config_lib.microbatch_rows(c) == 16
    c.optim.pack_budget, c.optim.minibatch_size = 200, 8
    assert config_lib.row_width(c) == 200 and config_lib.microbatch_rows(c) == 8
    c.optim.microbatch_size = 0
    assert config_lib.microbatch_rows(c) == 8 and not problems_with(optim__pack_budget=200, optim__microbatch_size=0)


def test_validate_reports_every_problem_at_once():
    c = config_lib.default_config()
    c.algorithm.clip_low, c.optim.minibatch_size = 2.0, 7
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, 1)
    assert "clip_low" in str(e.value) and "minibatch_size=7" in str(e.value)


def test_ablation_ladder_adds_one_technique_per_rung():
    base = config_lib.default_config()
    rungs = {r: load("ablation.py", r) for r in config_lib.ABLATION_LADDER}
    g = rungs["grpo"]
    assert g.algorithm.clip_high == g.algorithm.clip_low == 0.2
    assert g.algorithm.agg_mode == "seq-mean-token-mean" and not g.rollout.dynamic_sampling
    assert not g.reward.overlong_filter and g.reward.overlong_buffer == 0
    assert g.algorithm.kl_coef == config_lib.GRPO_KL_COEF > 0 and g.algorithm.kl_estimator == "k3"
    assert load("ablation.py", "grpo,32b").algorithm.clip_c == 0  # GRPO has no dual clip; the 32B base does
    assert load("ablation.py", "overlong_filtering,32b").algorithm.clip_c == 10
    assert all(rungs[r].algorithm.kl_coef == 0 for r in config_lib.ABLATION_LADDER[1:])
    assert rungs["overlong_filtering"].reward.overlong_filter
    assert rungs["clip_higher"].algorithm.clip_high == 0.28 and rungs["clip_higher"].reward.overlong_filter
    soft = rungs["soft_overlong"]
    assert soft.reward.overlong_buffer == base.reward.overlong_buffer and not soft.reward.overlong_filter
    assert soft.algorithm.agg_mode == "seq-mean-token-mean"
    assert rungs["token_level_loss"].algorithm.agg_mode == "token-mean"
    assert not rungs["token_level_loss"].rollout.dynamic_sampling
    assert rungs["dapo"].to_dict() == base.to_dict()
    for rung in rungs.values():
        config_lib.validate(rung, 1)
    assert load("ablation.py", "clip_higher,32b").rollout.prompts_per_step == 512


def test_unknown_ablation_rung_is_rejected():
    with pytest.raises(config_lib.ConfigError, match="choose one of"):
        load("ablation.py", "dapo_plus")


def test_a_field_added_since_a_save_differs_only_off_its_default():
    cfg = config_lib.default_config()
    saved = cfg.to_dict()
    del saved["rollout"]["generation_chunk"]  # a run saved before the field existed
    assert config_lib.resume_differences(saved, cfg) == []
    cfg.rollout.generation_chunk = 4
    cfg.steps = 7  # resumable: not listed
    assert config_lib.resume_differences(saved, cfg) == ["rollout.generation_chunk: saved None, now 4"]
    assert config_lib.config_differences(saved, cfg) == ["rollout.generation_chunk: saved None, now 4",
                                                         "steps: saved 60, now 7"]


def test_a_run_saved_before_a_behaviour_changing_field_keeps_its_old_behaviour():
    cfg = config_lib.default_config()
    saved = cfg.to_dict()
    del saved["rollout"]["stream"]  # saved before dynamic sampling streamed from the engine
    assert config_lib.from_saved(saved).rollout.stream is False  # resumes (and evaluates) as it ran
    assert config_lib.resume_differences(saved, cfg) == [
        "rollout.stream: not saved (the run predates it and ran as False), now True"]
    cfg.rollout.stream = False
    assert config_lib.resume_differences(saved, cfg) == []
