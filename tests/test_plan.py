"""The memory planner: slice shapes, per-device figures that match real sharded arrays, compiling for
a TPU topology this machine does not have (libtpu), and a config that does not fit made to fit."""

import jax
import pytest

from dapo_jax import config as config_lib, plan, sharding, train, train_step
from dapo_jax.models import loading


@pytest.mark.parametrize("topology, shape", [
    ("v5p-8", (2, 2, 1)), ("v5p-16", (2, 2, 2)), ("v5p-128", (4, 4, 4)), ("v5p-256", (4, 4, 8)),
    ("v4-32", (2, 2, 4)), ("v4-64", (2, 4, 4)), ("v5e-8", (2, 4)), ("v6e-16", (4, 4)), ("v5litepod-32", (4, 8)),
])
def test_accelerator_types_map_to_their_slice_shapes(topology, shape):
    generation, count = topology.rsplit("-", 1)
    _, per_chip, dims = plan._GENERATIONS[generation]
    assert plan.slice_shape(int(count) // per_chip, dims) == shape


@pytest.mark.parametrize("topology, message", [
    ("v5p-12", "powers of two"), ("v5p-7", "count TensorCores"), ("h100-8", "use an accelerator type"),
])
def test_bad_topologies_say_what_to_write(topology, message):
    with pytest.raises(plan.PlanError, match=message):
        plan.target(topology)


def small_config(**changes):
    cfg = config_lib.default_config()
    cfg.rollout.prompts_per_step, cfg.rollout.gen_prompts_per_batch = 16, 32
    cfg.eval.prompts_per_batch = 16
    for key, value in changes.items():
        section, field = key.split("__")
        cfg[section][field] = value
    return cfg


def test_the_plan_counts_the_bytes_the_real_sharded_state_holds():
    cfg = small_config()
    p = plan.make_plan(cfg, "cpu")  # the 8 forced CPU devices
    assert p.mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1}
    assert p.target.hbm_bytes == plan.host_memory_bytes() // 8 and p.fits is not None  # the devices share the host
    mesh = sharding.make_mesh(**cfg.mesh)
    model_config, params = train.load_model(train.model_source(cfg), dtype="float32", mesh=mesh)
    state = train_step.init_train_state(params, train.make_update(cfg, model_config, mesh).optimizer)

    def on_device_0(tree):
        return sum(sharding.bytes_per_device(x).get(jax.devices()[0].id, 0) for x in jax.tree_util.tree_leaves(tree))

    assert p.params == on_device_0(state.params)
    assert p.opt_state == on_device_0(state.opt_state)
    assert p.params < sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params)) / 4  # really split
    assert p.train.peak > p.state and p.sampler.argument >= p.kv_cache > 0  # the compiled programs hold them
    # the KV cache: layers x slots x kv heads x tokens x head dim, keys and values, split over 8 devices
    c = model_config
    slots = 32 * 8  # a generation batch (32 prompts x 8 answers) is the larger engine
    assert (p.sampler_phase, p.call.slots, p.call.pages) == ("rollout", slots, 0)
    assert p.kv_cache == 2 * c.num_hidden_layers * slots * c.num_key_value_heads * p.call.slot_span * \
        c.kv_head_dim * 4 // 8
    # on fsdp=8 (tensor=1) the sampling layout holds every weight whole; each device receives what it lacked
    assert p.sampling_params == sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))
    assert p.reshard == p.sampling_params - p.params


def test_a_page_pool_holds_the_tokens_it_is_given_not_slots_x_the_longest_answer():
    contiguous = plan.make_plan(small_config(), "v5p-8")
    pool = plan.make_plan(small_config(rollout__pages=256), "v5p-8")
    assert contiguous.call.pool_pages == 256 * 2  # 256 slots of 2 pages (a prompt + answer of up to 128 tokens)
    # ...but a contiguous cache holds what the engine gives it: the longest prompt + answer (40 + 48 - 1
    # positions) in whole 64-byte rows of float32 slots, 96 per slot, not 2 pages of 64
    assert contiguous.call.slot_span == 96 and "up to 96 tokens" in plan.report(contiguous, "c")
    assert pool.call.pool_pages == 256 and pool.kv_cache * 3 == contiguous.kv_cache * 2  # 16,384 / 24,576 tokens
    assert not pool.sampler.error and not pool.admit.error
    text = plan.report(pool, "pool")
    assert "a pool of 256 pages of 64 tokens = 16,384 tokens, 64 per slot on average (50% of every slot" in text
    assert "room for a pool of up to" in text and "each slot its own stretch" in plan.report(contiguous, "c")


def test_a_kl_penalty_counts_the_reference_policy_and_its_log_probs():
    without = plan.make_plan(small_config(), "v5p-8")
    p = plan.make_plan(small_config(algorithm__kl_coef=0.001), "v5p-8", previous=without)
    assert without.ref_params == 0 and p.ref_params == p.params > 0  # a frozen copy, sharded as the params
    assert p.batch > without.batch  # the batch carries ref_logp
    assert p.sampler_peak == without.sampler_peak + p.ref_params  # the same sampler program, the reference beside it
    assert p.train_peak >= p.train.peak + p.ref_params
    assert "reference policy (KL penalty)" in plan.report(p, "grpo")


def test_a_tpu_slice_is_planned_without_a_tpu():
    p = plan.make_plan(small_config(), "v5p-8")  # 4 chips of TPU v5p, compiled here by libtpu
    assert p.target.kind == "TPU v5" and len(p.target.devices) == 4 and p.mesh_shape["fsdp"] == 4
    assert p.fits is True and not p.train.error and not p.sampler.error
    text = plan.report(p, "tiny")
    assert "FITS" in text and "v5p:2x2x1" in text


def test_a_config_that_does_not_fit_is_told_so_and_made_to_fit():
    # The tiny model with a long answer and a huge sampler call: its KV cache exceeds a v5e chip's 16 GiB.
    cfg = small_config(rollout__max_response_length=400, data__max_prompt_length=40, eval__prompts_per_batch=2048,
                       eval__samples_per_prompt=64, optim__microbatch_size=0)
    p = plan.make_plan(cfg, "v5e-4")
    assert p.fits is False and p.sampler_phase == "eval"
    assert p.sampler_peak > p.target.hbm_bytes  # by the compiler's own figure
    assert "DOES NOT FIT" in plan.report(p, "big") and "eval.prompts_per_batch=" in plan.report(p, "big")
    fitted, changes = plan.fit(cfg, "v5e-4", say=lambda *a, **k: None)
    assert fitted.fits is True and 1 <= changes["eval.prompts_per_batch"] < 2048
    assert fitted.sampler_peak <= fitted.target.hbm_bytes


def test_a_cpu_plan_is_judged_against_this_hosts_memory(monkeypatch):
    monkeypatch.setattr(plan, "host_memory_bytes", lambda: 8 * 2 * plan.GIB)  # 2 GiB for each of the 8 devices
    t = plan.target("cpu")
    assert (t.hbm_bytes, t.memory) == (2 * plan.GIB, "host memory")
    cfg = small_config()
    compiled = plan.Compiled(1.0, argument=plan.GIB, output=0, temp=2 * plan.GIB, alias=0)
    mesh = sharding.make_mesh(**cfg.mesh)
    call = plan.largest_sampler_call(cfg, loading.random_config("tiny"), mesh, on_cpu=True)
    p = plan.Plan(cfg, t, {"data": 1, "fsdp": 8, "tensor": 1}, loading.random_config("tiny"), "random:tiny",
                  params=plan.GIB // 4, opt_state=plan.GIB // 4, ref_params=0, batch=0, train=compiled, sampler=compiled,
                  admit=compiled, call=call, sampling_params=plan.GIB // 2, reshard=plan.GIB // 4, kv_cache=plan.GIB,
                  kv_per_token=1024)
    text = plan.report(p, "big")
    assert p.fits is False and "  host memory                              2.000" in text
    assert "DOES NOT FIT: peak 3.50 GiB of 2.00 GiB per device (175%; a plan fits under 95%)" in text
    assert "larger slice" not in text  # a TPU's suggestion


def test_the_command_line_reports_and_exits_by_the_verdict(capsys):
    assert plan.main(["--config", "configs/synthetic_tiny.py", "--topology", "v5p-8"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert plan.main(["--config", "configs/synthetic_tiny.py", "--topology", "v5p-8", "--set", "steps"]) == 2
    assert "write key=value" in capsys.readouterr().err


def test_a_multislice_mesh_keeps_fsdp_and_tensor_inside_each_slice():
    cfg = small_config()
    cfg.mesh.update(data=2, fsdp=-1, tensor=2, slices=2)
    t = plan.target("v5p-8", slices=2)  # two 4-chip slices
    mesh = sharding.make_mesh(**cfg.mesh, devices=t.devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    grid = mesh.devices
    for d in range(2):  # each data index is one slice
        assert {x.slice_index for x in grid[d].flat} == {d}
    assert config_lib.problems(cfg, 8) == []
    cfg.mesh.update(data=1, fsdp=-1)
    assert any("mesh.slices=2" in p for p in config_lib.problems(cfg, 8))
