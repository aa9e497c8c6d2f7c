"""Will a config fit? Compile the train step and the sampler ahead of time for a TPU slice (or this
machine's devices) from shapes alone, and report per-device memory before anything is launched.

    python -m dapo_jax.plan --config configs/dapo_qwen2_5_32b.py --topology v5p-32
    python -m dapo_jax.plan --config configs/qwen2_5_0_5b.py --topology v5e-8      # one 8-chip host
    python -m dapo_jax.plan --config configs/synthetic_tiny.py --topology cpu      # the devices here

No weights are read and no TPU is needed: `jax[tpu]` (libtpu) compiles for a topology description
(`pip install -e '.[tpu]'`). XLA's own memory analysis of the compiled programs gives the figures;
the parameter, optimizer-state and KV-cache lines are the bytes each device holds under the run's
shardings. The train state (parameters and AdamW moments) stays on the devices all run long, and so
does the reference policy when there is a KL penalty (a frozen copy of the parameters), so each
phase's peak is the state plus what that phase adds:

    train step   state + batch + activations (XLA temp)     + outputs not aliased to the donated state
    sampler      state + prompts + KV cache and other temps + outputs

A config that does not fit gets suggestions, with numbers: more fsdp, rematerialisation, smaller
micro-batches, a smaller page pool (rollout.pages) or fewer slots (rollout.generation_chunk), a larger
slice.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from dapo_jax import cli, config as config_lib, sampling, sharding, train, train_step as train_step_lib
from dapo_jax.models import loading, qwen2

GIB = 2**30
HEADROOM = 0.95  # a plan fits when its peak stays under this share of HBM (runtime buffers, fragmentation)
# HBM per chip (Cloud TPU documentation), by the device kind JAX reports.
# HBM per chip that XLA says is available to a program, by the device kind JAX reports (v5p and v5e:
# from the TPU compiler's own out-of-memory messages; v4 and v6e: the nominal 32 GiB).
HBM_GIB = {"TPU v4": 32, "TPU v5": 95.74, "TPU v5p": 95.74, "TPU v5 lite": 15.75, "TPU v6 lite": 32}
# Accelerator types count TensorCores on v4/v5p (2 per chip, 3-D torus) and chips on v5e/v6e (2-D).
_KINDS = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}  # what JAX reports
_GENERATIONS = {"v4": ("v4", 2, 3), "v5p": ("v5p", 2, 3), "v5e": ("v5e", 1, 2), "v5litepod": ("v5e", 1, 2),
                "v6e": ("v6e", 1, 2)}


class PlanError(ValueError):
    """The plan cannot be made as asked; the message says what to change."""


# -- the target ------------------------------------------------------------------------------------


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The standard physical shape of a slice of `chips` chips: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4,
    64 -> 4x4x4 (3-D); 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, 32 -> 4x8 (2-D)."""
    if chips < 1 or chips & (chips - 1):
        raise PlanError(f"a slice of {chips} chips: TPU slices come in powers of two")
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    if dims == 3 and chips < 4:
        raise PlanError(f"{chips} chips: the smallest v4/v5p slice has 4 chips (v5p-8)")
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


@dataclasses.dataclass
class Target:
    name: str  # as asked, e.g. v5p-128
    devices: list
    hbm_bytes: int | None  # per device (CPU devices: their share of this host's memory); None when unknown
    topology: str  # e.g. v5p:4x4x4
    memory: str = "HBM"  # what hbm_bytes measures

    @property
    def kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def host_memory_bytes() -> int:
    """This host's memory: the physical memory, or the container's limit (cgroup v2 or v1) where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            total = min(total, int(text))
    return total


def target(topology: str, slices: int = 1) -> Target:
    """The devices of `topology`: an accelerator type (v5p-128, v4-32, v5e-8, v6e-8), a topology
    (v5p:4x4x4), or "cpu" for the devices of this process."""
    if topology == "cpu":
        devices = jax.devices()
        if devices[0].platform == "cpu":  # the devices share this host's memory
            return Target(topology, devices, host_memory_bytes() // len(devices),
                          f"{len(devices)} x {devices[0].device_kind}", memory="host memory")
        return Target(topology, devices, None, f"{len(devices)} x {devices[0].device_kind}")
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", topology)
    t = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", topology)
    if not (m or t):
        raise PlanError(f"--topology {topology!r}: use an accelerator type (v5p-128, v4-32, v5e-8, v6e-8), a "
                        f"topology (v5p:4x4x4, v6e:2x4) or cpu")
    if m:
        generation, per_chip, dims = _GENERATIONS[m.group(1)]
        count = int(m.group(2))
        if count % per_chip:
            raise PlanError(f"{topology}: {m.group(1)} types count TensorCores, {per_chip} per chip")
        shape = slice_shape(count // per_chip, dims)
    else:
        generation, _, dims = _GENERATIONS[t.group(1)]
        shape = tuple(int(x) for x in t.group(2).split("x"))
    name = f"{generation}:{'x'.join(map(str, shape))}"
    kwargs = {"num_slices": slices} if slices > 1 else {}
    if dims == 2 and math.prod(shape) <= 8:  # v5e/v6e slices of up to 8 chips are one host
        kwargs["chips_per_host_bounds"] = (*shape, 1)
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
    except Exception as e:  # noqa: BLE001 - missing libtpu and unknown shapes both end here
        raise PlanError(f"cannot describe TPU topology {name} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"planning for TPUs needs libtpu: pip install -e '.[tpu]'") from None
    kind = devices[0].device_kind
    return Target(topology + (f" x {slices} slices" if slices > 1 else ""), list(devices),
                  int(HBM_GIB[kind] * GIB) if kind in HBM_GIB else None, name)


# -- the model and its state, as shapes -----------------------------------------------------------


def model_config(cfg: ml_collections.ConfigDict, override: str = "") -> tuple[qwen2.Qwen2Config, str]:
    """(the model's config, where its shapes come from) without reading any weights."""
    source = override or (train.model_source(cfg) if cfg.model.path == "embedded" else cfg.model.path)
    runtime = dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.compute_dtype,
                   remat_policy=cfg.model.remat_policy, attention=cfg.model.attention)
    if source.startswith("random:"):
        return loading.random_config(source.removeprefix("random:"), **runtime), source
    if (Path(source) / "config.json").is_file():
        from dapo_jax import hf

        return hf.read_config(source, **runtime), f"{source}/config.json"
    size = re.search(r"(0\.5|1\.5|3|7|14|32|72)B", Path(source).name, re.IGNORECASE)
    if size and f"{size.group(1)}B" in qwen2.PRESET_NAMES:
        return qwen2.preset(f"{size.group(1)}B", **runtime), f"Qwen2.5-{size.group(1)}B's published shapes " \
                                                              f"(no checkpoint at {source})"
    raise PlanError(f"model.path={source!r} has no config.json here and names no Qwen2.5 size; "
                    f"pass --model random:<preset> (one of {', '.join(qwen2.PRESET_NAMES)})")


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def bytes_on_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


# -- compiling -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    seconds: float
    argument: int
    output: int
    temp: int
    alias: int
    error: str = ""  # the compiler's refusal (e.g. out of memory), if it refused

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_bytes(message: str) -> int:
    """The temporaries the TPU compiler said a program needs, from its out-of-memory message."""
    m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


def _compile(lowered_fn, args_bytes: int) -> Compiled:
    """Compile; on an out-of-memory refusal keep the compiler's figure for the temporaries and the
    arguments' size (`args_bytes` per device), so the plan can still say by how much it misses."""
    start = time.perf_counter()
    try:
        lowered = lowered_fn()
    except Exception as e:  # noqa: BLE001 - a shape problem: reported, not a crash
        return Compiled(0.0, 0, 0, 0, 0, error=f"{type(e).__name__}: {e}")
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler reports out-of-memory here
        return Compiled(time.perf_counter() - start, args_bytes, 0, _oom_bytes(str(e)), 0,
                        error=f"{type(e).__name__}: {e}")
    m = compiled.memory_analysis()
    return Compiled(time.perf_counter() - start, m.argument_size_in_bytes, m.output_size_in_bytes,
                    m.temp_size_in_bytes, m.alias_size_in_bytes)


def train_batch_shapes(cfg: ml_collections.ConfigDict, rows: int, mesh) -> dict:
    """The train step's batch for `rows` answers: mini-batches x micro-batches of rows x width, with
    room for every answer alone in a row (`dapo_jax.packing`; a pass costs the same however full)."""
    minibatches = rows // cfg.optim.minibatch_size
    micro = config_lib.microbatch_rows(cfg)
    return train_step_lib.batch_shapes(
        minibatches, -(-cfg.optim.minibatch_size // micro), micro, config_lib.row_width(cfg), ref_logp=bool(cfg.algorithm.kl_coef),
        row_sharding=NamedSharding(mesh, PartitionSpec(None, None, ("data", "fsdp"))),
        replicated=NamedSharding(mesh, PartitionSpec()))


@dataclasses.dataclass
class Plan:
    cfg: ml_collections.ConfigDict
    target: Target
    mesh_shape: dict
    model: qwen2.Qwen2Config
    model_source: str
    params: int
    opt_state: int
    ref_params: int  # the reference policy's copy of the parameters (0 without a KL penalty)
    batch: int
    train: Compiled
    sampler: Compiled  # a decode segment of the rollout engine
    admit: Compiled  # the engine's largest prefill call (engine.EngineConfig.prefill prompts)
    call: SamplerCall  # the larger phase's engine
    sampling_params: int  # the parameters in the sampling layout (held while generating)
    reshard: int  # bytes each device receives to build that layout
    kv_cache: int  # the engine's KV cache (the page pool, or every slot at full length)
    kv_per_token: int  # bytes per device per cached token of a slot of its data shard

    @property
    def sampler_phase(self) -> str:
        return self.call.phase

    @property
    def sampler_prompts(self) -> int:
        return self.call.prompts

    @property
    def sampler_samples(self) -> int:
        return self.call.samples

    @property
    def state(self) -> int:
        return self.params + self.opt_state + self.ref_params

    @property
    def train_peak(self) -> int:
        # arguments hold the state and the batch; the state's outputs alias its donated inputs; the
        # reference parameters sit beside them
        return self.train.peak + self.ref_params

    @property
    def sampler_peak(self) -> int:
        # the engine's programs hold the sampling layout, the cache and the slots; the training state
        # (and the reference) sit beside them
        return max(self.sampler.peak, self.admit.peak) + self.state

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.sampler_peak)

    @property
    def fits(self) -> bool | None:
        """Whether the peak stays under HEADROOM of the device's memory (None: no figure for it, e.g. a GPU)."""
        if self.train.error or self.sampler.error or self.admit.error:
            return False
        return None if self.target.hbm_bytes is None else self.peak <= HEADROOM * self.target.hbm_bytes


@dataclasses.dataclass(frozen=True)
class SamplerCall:
    """The rollout engine as the run's larger phase (rollout or evaluation) sets it up."""

    phase: str  # "rollout" or "eval"
    prompts: int  # prompts whose answers decode at once (a rollout chunk, an evaluation batch)
    samples: int
    slots: int  # prompts x samples, a multiple of the data-parallel devices (the engine's shards)
    shards: int
    prompt_length: int  # padded to the engine's bucket (whole pages with a pool)
    page_size: int
    pages_per_slot: int  # a slot's pages at the longest prompt + answer
    slot_span: int  # a contiguous cache's slots per row at the longest prompt + answer, as the engine sizes it
    pages: int  # the pool as configured (0: contiguous per-slot caches)
    per_layer: bool  # per-layer caches (the unrolled layer loop) or stacked (scan)
    spec: sampling.SamplingConfig

    @property
    def pool_pages(self) -> int:
        """Pages the cache holds: the pool, or every slot at full length (contiguous)."""
        return self.pages // self.shards * self.shards or self.slots * self.pages_per_slot

    @property
    def tokens_held(self) -> int:
        """Token positions the KV cache holds: the pool's pages, or every slot's contiguous span."""
        return self.pool_pages * self.page_size if self.pages else self.slots * self.slot_span


def largest_sampler_call(cfg: ml_collections.ConfigDict, model_cfg: qwen2.Qwen2Config, mesh, *,
                         on_cpu: bool) -> SamplerCall:
    """The run's larger engine: the rollout's (config.rollout_slots answers at once) or an evaluation
    batch's (k samples per prompt)."""
    from dapo_jax import engine

    r, e = cfg.rollout, cfg.eval
    calls = {"rollout": (r.generation_chunk or r.gen_prompts_per_batch, r.samples_per_prompt),
             "eval": (e.prompts_per_batch, e.samples_per_prompt)}
    phase = max(calls, key=lambda k: math.prod(calls[k]))
    prompts, samples = calls[phase]
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    per_layer = on_cpu or r.pages > 0  # as `sampling.generate` picks the layer loop
    spec = sampling.SamplingConfig(max_new_tokens=r.max_response_length, temperature=r.temperature, top_p=r.top_p,
                                   top_k=r.top_k, eos_ids=(0,), num_samples=samples, prompt_bucket=r.prompt_bucket,
                                   layer_loop="unrolled" if per_layer else "scan")
    ps = r.page_size
    bucket = -(-max(r.prompt_bucket, 1) // ps) * ps if r.pages else max(r.prompt_bucket, 1)  # as the engine pads
    width = -(-cfg.data.max_prompt_length // bucket) * bucket
    pages_per_slot = max(-(-(cfg.data.max_prompt_length + r.max_response_length - 1) // ps), width // ps)
    slot_span = engine.contiguous_span(model_cfg, width, cfg.data.max_prompt_length, r.max_response_length)
    slots = -(-prompts * samples // shards) * shards
    return SamplerCall(phase, prompts, samples, slots, shards, width, ps, pages_per_slot, slot_span, r.pages,
                       per_layer, spec)


def compile_sampler(model_cfg: qwen2.Qwen2Config, call: SamplerCall, mesh) -> tuple[Compiled, Compiled]:
    """(a decode segment, the largest prefill call of an admission) of the rollout engine, compiled for
    `mesh` with the parameters in the sampling layout (`sampling.sampling_layout`)."""
    from dapo_jax import engine, paged

    S, ps, shape = call.slots, call.page_size, dict(mesh.shape)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = sampling_params(model_cfg, mesh)
    with jax.set_mesh(mesh):
        if call.pages:
            pool = jax.eval_shape(lambda: paged.PagedKVCache.zeros(model_cfg, call.pool_pages, ps,
                                                                   per_layer=call.per_layer))
            pool_sharding = NamedSharding(mesh, paged.pool_spec((pool[0] if call.per_layer else pool).k.shape, shape))
            cache = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=pool_sharding), pool)
            table_width, admit_pages = call.pages_per_slot, call.prompt_length // ps
        else:  # every slot's stretch at the longest span
            kv = jax.eval_shape(lambda: (engine._contiguous(model_cfg, S, call.slot_span, call.per_layer),))  # one lane
            cache = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
                mesh, sharding.logical_to_spec(qwen2.V_CACHE_AXES[-x.ndim:], x.shape, shape)[0])), kv)
            table_width, admit_pages = 0, 0
        slots = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows),
                                       jax.eval_shape(lambda: engine.Slots.empty(S, call.spec.max_new_tokens)))
        int_rows = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.int32, sharding=replicated)  # noqa: E731
        decode = _compile(lambda: engine._decode.lower(model_cfg, call.spec, 16, params, cache, slots,
                                                       int_rows(S, table_width),
                                                       jax.ShapeDtypeStruct((S,), jnp.bool_, sharding=replicated)),
                          bytes_on_device((params, cache, slots)))
        # the largest admission: as many prompts as one prefills (engine.EngineConfig.prefill), their slots
        prompts = min(-(-S // call.samples), engine.EngineConfig.prefill)
        q = min(S, 1 << (prompts - 1).bit_length())
        a = min(S, q * call.samples)
        key = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=replicated)
        admit = _compile(lambda: engine._admit.lower(model_cfg, call.spec, params, cache, slots,
                                                     int_rows(q, call.prompt_length), int_rows(q), int_rows(a),
                                                     int_rows(a), int_rows(a), int_rows(a, admit_pages), key),
                         bytes_on_device((params, cache, slots)))
    return decode, admit


def sampling_params(model_cfg: qwen2.Qwen2Config, mesh):
    """The parameters as the engine reads them (`sampling.sampling_layout`), as ShapeDtypeStructs."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, sampling.layout_dtype(x.dtype, model_cfg.compute_dtype),
                                          sharding=s),
        qwen2.abstract_params(model_cfg), qwen2.param_shardings(model_cfg, mesh, sharding.SAMPLING_RULES))


def reshard_bytes(train_params, sampled) -> int:
    """Bytes each device receives to build the sampling layout from the training layout: what its
    sampling shard holds beyond its (cast) training shard, which lies inside it."""
    def extra(t, s):
        have = math.prod(t.sharding.shard_shape(t.shape))
        return max(0, math.prod(s.sharding.shard_shape(s.shape)) - have) * jnp.dtype(s.dtype).itemsize
    return sum(map(extra, jax.tree_util.tree_leaves(train_params), jax.tree_util.tree_leaves(sampled)))


# The config fields each compiled program depends on (a plan reuses a compilation whose fields did
# not change: the train step does not see the sampler's chunk, and the other way round).
_SAMPLER_ONLY = ("rollout.generation_chunk", "rollout.gen_prompts_per_batch", "rollout.pages", "rollout.page_size",
                 "eval.prompts_per_batch", "eval.samples_per_prompt")
_TRAIN_ONLY = ("optim.microbatch_size", "optim.minibatch_size", "model.remat_policy", "algorithm.kl_coef",
               "algorithm.kl_estimator")


def _key(cfg: ml_collections.ConfigDict, leave_out: tuple[str, ...]) -> str:
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif f"{prefix}{k}" not in leave_out:
                flat[f"{prefix}{k}"] = v
    walk(cfg.to_dict(), "")
    return repr(sorted(flat.items()))


def make_plan(cfg: ml_collections.ConfigDict, topology: str, *, slices: int = 1, model: str = "",
              previous: Plan | None = None) -> Plan:
    """Plan `cfg` on `topology`; compilations of `previous` (a plan of a config that differs only in
    the other program's fields) are reused."""
    tgt = target(topology, slices)
    found = config_lib.problems(cfg, len(tgt.devices))
    if found:
        raise PlanError(f"the config cannot run on {len(tgt.devices)} devices:\n  - " + "\n  - ".join(found))
    mesh = sharding.make_mesh(**cfg.mesh, devices=tgt.devices)
    model_cfg, source = model_config(cfg, model)
    params = _abstract(qwen2.abstract_params(model_cfg), qwen2.param_shardings(model_cfg, mesh))
    update = train.make_update(cfg, model_cfg, mesh)
    state = train_step_lib.abstract_train_state(params, update.optimizer)
    batch = train_batch_shapes(cfg, update.rows, mesh)
    if previous is not None and _key(previous.cfg, _SAMPLER_ONLY) == _key(cfg, _SAMPLER_ONLY):
        train_compiled = previous.train
    else:
        with jax.set_mesh(mesh):
            train_compiled = _compile(lambda: update.train_step.jitted(state, batch).lower(state, batch),
                                      bytes_on_device(state) + bytes_on_device(batch))

    call = largest_sampler_call(cfg, model_cfg, mesh, on_cpu=topology == "cpu" and jax.default_backend() == "cpu")
    if previous is not None and _key(previous.cfg, _TRAIN_ONLY) == _key(cfg, _TRAIN_ONLY):
        decode, admit = previous.sampler, previous.admit
    else:
        decode, admit = compile_sampler(model_cfg, call, mesh)
    sampled = sampling_params(model_cfg, mesh)
    kv_heads = sharding.logical_to_spec(("kv_heads",), (model_cfg.num_key_value_heads,), dict(mesh.shape))[0][0]
    local_heads = model_cfg.num_key_value_heads // (mesh.shape[kv_heads] if kv_heads else 1)
    per_token = 2 * model_cfg.num_hidden_layers * local_heads * model_cfg.kv_head_dim * jnp.dtype(model_cfg.compute_dtype).itemsize
    cache = call.tokens_held // call.shards * per_token
    return Plan(cfg, tgt, dict(mesh.shape), model_cfg, source, bytes_on_device(params),
                bytes_on_device(state.opt_state), bytes_on_device(params) if cfg.algorithm.kl_coef else 0,
                bytes_on_device(batch), train_compiled, decode, admit, call, bytes_on_device(sampled),
                reshard_bytes(params, sampled), cache, per_token)


# -- the report ------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GIB:9.3f}"


def proposals(plan: Plan) -> dict[str, object]:
    """Config changes that should make `plan` fit, from its own figures (`fit` checks them by planning
    again): fewer prompts per sampler call, rematerialisation, smaller micro-batches."""
    hbm = plan.target.hbm_bytes
    if plan.fits is not False or hbm is None:
        return {}
    cfg, out = plan.cfg, {}
    usable = 0.9 * hbm  # aim below HEADROOM: the figures move a little with the shapes
    sampler_error = plan.sampler.error or plan.admit.error
    if sampler_error or plan.sampler_peak > HEADROOM * hbm:
        # The KV cache grows with the pages (or the slots); count the engine's other temporaries as
        # fixed (when the compiler refused, all it reported is their sum: then everything scales).
        call = plan.call
        cache_share = plan.kv_cache + (max(plan.sampler.temp, plan.admit.temp) if sampler_error else 0)
        fixed = plan.sampler_peak - plan.state - cache_share
        room = usable - plan.state - fixed
        if call.pages:  # a smaller pool, at least one answer per data shard
            pages = int(room // max(cache_share / call.pool_pages, 1)) // call.shards * call.shards
            if call.pages_per_slot * call.shards <= pages < call.pages:
                out["rollout.pages"] = pages
        else:  # fewer prompts at once, padded to a multiple of the data-parallel devices
            prompts = int(room // max(cache_share / call.slots * call.samples, 1))
            prompts = prompts // call.shards * call.shards if prompts >= call.shards else prompts
            field = "rollout.generation_chunk" if call.phase == "rollout" else "eval.prompts_per_batch"
            if 1 <= prompts < call.prompts:
                out[field] = prompts
    if plan.train.error or plan.train_peak > HEADROOM * hbm:
        micro = config_lib.microbatch_rows(cfg)
        dp = plan.mesh_shape["data"] * plan.mesh_shape["fsdp"]
        if cfg.model.remat_policy == "none":
            out["model.remat_policy"] = "full"
        elif micro > dp:  # activations grow with the micro-batch
            want = micro * (usable - plan.state - plan.batch) / max(plan.train.temp, 1)
            options = [m for m in range(dp, micro, dp) if cfg.optim.minibatch_size % m == 0]
            if options:
                out["optim.microbatch_size"] = max([m for m in options if m <= want] or [min(options)])
    return out


def suggestions(plan: Plan) -> list[str]:
    """What would make the plan fit, in words, with the numbers behind each suggestion."""
    if plan.fits is not False:
        return []
    out = [f"set {k}={v}" for k, v in proposals(plan).items()]
    m = plan.mesh_shape
    if m["data"] > 1:
        out.append(f"parameters and optimizer state ({plan.state / GIB:.2f} GiB per device) shrink with more fsdp: "
                   f"move devices from mesh.data={m['data']} to mesh.fsdp")
    if plan.target.kind in HBM_GIB:
        out.append(f"or use a larger slice: `--topology {re.sub(r'-.*|:.*', '', plan.target.topology)}` searches "
                   f"for the smallest that fits")
    return out


def _with(cfg: ml_collections.ConfigDict, changes: dict) -> ml_collections.ConfigDict:
    from dapo_jax import sweep

    out = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in changes.items():
        sweep.set_field(out, key, str(value))
    return out


def fit(cfg: ml_collections.ConfigDict, topology: str, *, slices: int = 1, model: str = "", rounds: int = 6,
        say=print) -> tuple[Plan, dict]:
    """Plan; while it does not fit and there is a change to try, apply it and plan again. Returns the
    last plan and the changes it needed (every figure in the plan is from a compilation)."""
    changes: dict = {}
    plan = make_plan(cfg, topology, slices=slices, model=model)
    for _ in range(rounds):
        proposed = proposals(plan)
        if not proposed:
            break
        changes.update(proposed)
        say(f"  {topology}: does not fit; trying {', '.join(f'{k}={v}' for k, v in changes.items())}", flush=True)
        plan = make_plan(_with(cfg, changes), topology, slices=slices, model=model, previous=plan)
    return plan, changes


def search(cfg: ml_collections.ConfigDict, generation: str, *, slices: int = 1, model: str = "",
           say=print) -> tuple[Plan, dict]:
    """The smallest slice of `generation` (v4, v5p, v5e, v6e) on which the config fits, with the changes
    it needs."""
    name, per_chip, dims = _GENERATIONS[generation]
    model_cfg, _ = model_config(cfg, model)
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(qwen2.abstract_params(model_cfg)))
    state_bytes = n_params * (jnp.dtype(cfg.model.param_dtype).itemsize + 8)  # params + two float32 moments
    hbm = HBM_GIB[_KINDS[name]]
    chips = 4 if dims == 3 else 1
    # Start where the train state takes at most a quarter of each chip: activations and the KV
    # cache of long answers need the rest.
    while state_bytes / (chips * slices) > 0.25 * hbm * GIB or chips < cfg.mesh.tensor:
        chips *= 2
    plan = None
    while chips <= 4096:
        topology = f"{generation}-{chips * per_chip}"
        say(f"trying {topology}", flush=True)
        try:
            plan, changes = fit(cfg, topology, slices=slices, model=model, say=say)
        except PlanError as e:  # e.g. the mesh does not divide this many devices
            say(f"  {topology}: {e}", flush=True)
        else:
            if plan.fits:
                return plan, changes
        chips *= 2
    if plan is None:
        raise PlanError(f"no {generation} slice up to 4096 chips can hold this config")
    return plan, changes


def _program_lines(name: str, compiled: Compiled, temps_label: str, temps: int, peak_label: str,
                   peak: int) -> list[str]:
    """A compiled program's lines of the report: its temporaries and peak, or the compiler's refusal."""
    if compiled.error:
        return [f"  {name}: DID NOT COMPILE: {compiled.error.splitlines()[0][:300]}"]
    return [f"  {name + ': ' + temps_label:<37}{_gib(temps)}",
            f"  {peak_label:<37}{_gib(peak)}   (compiled in {compiled.seconds:.0f} s)"]


def engine_lines(plan: Plan) -> list[str]:
    """What the rollout engine holds: slots, and pages or contiguous caches, with the tokens they
    hold against every slot at full length; and how large a pool the memory left would take."""
    c = plan.call
    full, tokens = c.pages_per_slot * c.page_size, c.tokens_held
    lines = [f"sampler: the rollout engine ({c.phase}, the larger phase): {c.prompts} prompts x {c.samples} = "
             f"{c.slots} slots ({c.slots // c.shards} per data shard)"]
    if c.pages:
        lines.append(f"  KV cache: a pool of {c.pool_pages:,} pages of {c.page_size} tokens = {tokens:,} tokens, "
                     f"{tokens // c.slots:,} per slot on average ({100 * tokens / (c.slots * full):.0f}% of every "
                     f"slot at its longest, {full:,}); the latest admitted answers give way when it runs short")
    else:
        lines.append(f"  KV cache: each slot its own stretch, up to {c.slot_span:,} tokens (set rollout.pages for a "
                     f"pool sized by the tokens held)")
    hbm = plan.target.hbm_bytes
    if hbm and not (plan.sampler.error or plan.admit.error):
        per_page = plan.kv_per_token * c.page_size
        room = HEADROOM * hbm - (plan.sampler_peak - plan.kv_cache)
        most = int(room // per_page) * c.shards
        if most > 0:
            lines.append(f"  room for a pool of up to {most:,} pages ({most * c.page_size // c.slots:,} tokens per "
                         f"slot on average) beside the rest of the sampler's peak")
    return lines


def report(plan: Plan, config_name: str) -> str:
    t, m = plan.target, plan.mesh_shape
    cfg = plan.cfg
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(qwen2.abstract_params(plan.model)))
    hbm = f"{t.hbm_bytes / GIB:.2f} GiB {t.memory} each" if t.hbm_bytes else "memory: this machine's"
    lines = [
        f"plan: {config_name} on {t.name} ({len(t.devices)} x {t.kind}, {t.hosts} host(s), {hbm}; "
        f"topology {t.topology})",
        f"mesh: data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}",
        f"model: {n_params / 1e9:.3g}B parameters from {plan.model_source}; params {cfg.model.param_dtype}, "
        f"compute {cfg.model.compute_dtype}, remat {cfg.model.remat_policy}",
        f"train step: {plan.cfg.rollout.prompts_per_step * plan.cfg.rollout.samples_per_prompt} answers, mini-batch "
        f"{cfg.optim.minibatch_size}, passes of {config_lib.microbatch_rows(cfg)} rows x "
        f"{config_lib.row_width(cfg)} tokens ({'packed' if cfg.optim.packing else 'one answer per row'})",
        *engine_lines(plan),
        "",
        "per device                                   GiB",
        f"  parameters                           {_gib(plan.params)}",
        f"  optimizer state (AdamW moments)      {_gib(plan.opt_state)}",
        *([f"  reference policy (KL penalty)        {_gib(plan.ref_params)}"] if plan.ref_params else []),
        f"  train step: batch                    {_gib(plan.batch)}",
    ]
    lines += _program_lines("train step", plan.train, "activations and temps", plan.train.temp,
                            "train step peak", plan.train_peak)
    lines += [f"  sampler: params, sampling layout     {_gib(plan.sampling_params)}   ({cfg.model.compute_dtype}, "
              f"split over tensor only; the reshard brings {plan.reshard / GIB:.3f} GiB to each device)",
              f"  sampler: KV cache                    {_gib(plan.kv_cache)}   "
              f"({plan.kv_per_token / 2**10:.0f} KiB per token of its shard's slots)"]
    if plan.admit.error:
        lines.append(f"  sampler admission: DID NOT COMPILE: {plan.admit.error.splitlines()[0][:300]}")
    else:
        lines.append(f"  sampler: admission (prefill) temps   {_gib(plan.admit.temp)}")
    lines += _program_lines("sampler", plan.sampler, "decode segment temps", plan.sampler.temp,
                            "sampler peak (with the train state)", plan.sampler_peak)
    if t.hbm_bytes:
        lines.append(f"  {t.memory:<37}{_gib(t.hbm_bytes)}")
    if plan.fits is None:
        verdict = f"peak {plan.peak / GIB:.2f} GiB per device (no HBM figure for {t.kind}: compare with its memory)"
    elif plan.train.error or plan.sampler.error or plan.admit.error:
        verdict = "DOES NOT FIT: the compiler refused (above)"
    else:
        verdict = (f"{'FITS' if plan.fits else 'DOES NOT FIT'}: peak {plan.peak / GIB:.2f} GiB of "
                   f"{t.hbm_bytes / GIB:.2f} GiB per device ({100 * plan.peak / t.hbm_bytes:.0f}%; a plan fits "
                   f"under {100 * HEADROOM:.0f}%)")
    lines += ["", verdict]
    for s in suggestions(plan):
        lines.append(f"  - {s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dapo_jax.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a config file, optionally with :arg")
    parser.add_argument("--topology", required=True,
                        help="v5p-128, v4-32, v5e-8, v6e-8, v5p:4x4x4, cpu; or a generation (v5p) to find the "
                             "smallest slice that fits")
    parser.add_argument("--slices", type=int, default=1, help="slices of --topology (multi-slice)")
    parser.add_argument("--fit", action="store_true", help="if it does not fit, apply the suggested changes and "
                                                           "plan again until it does (or nothing is left to try)")
    parser.add_argument("--model", default="", help="random:<preset> to plan for a shape without its checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set rollout.generation_chunk=64 (repeatable)")
    args = parser.parse_args(argv)
    if args.topology != "cpu" and not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # compiling for a TPU description needs no TPU attached
    from dapo_jax import sweep

    try:
        cfg = cli.load_config(args.config)
        for item in args.set:
            key, eq, value = item.partition("=")
            if not eq:
                raise PlanError(f"--set {item!r}: write key=value")
            sweep.set_field(cfg, key, value)
        if args.topology in _GENERATIONS:
            plan, changes = search(cfg, args.topology, slices=args.slices, model=args.model)
        elif args.fit:
            plan, changes = fit(cfg, args.topology, slices=args.slices, model=args.model)
        else:
            plan, changes = make_plan(cfg, args.topology, slices=args.slices, model=args.model), {}
    except (PlanError, sweep.SweepError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.config + "".join(f" --set {s}" for s in args.set)
    print(report(plan, name + "".join(f" --set {k}={v}" for k, v in changes.items())), flush=True)
    if changes and plan.fits:
        print("\nit fits with these changes (add them to the config or the command line):\n  "
              + " ".join(f"--config.{k}={v}" for k, v in changes.items()), flush=True)
    return 0 if plan.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
