"""Meshes and the one table that maps logical axis names to mesh axes.

Model code names the axes of its parameters and activations ("embed", "heads", ...) and never
sees a mesh. `LOGICAL_AXIS_RULES` says where each name goes on the mesh ("data", "fsdp",
"tensor"). With no mesh active the constraints are no-ops, so the same model runs on a laptop.

A dimension that a mesh axis does not divide (Qwen2.5-0.5B has 2 kv heads; a tensor axis of 4
cannot split them) is replicated along that axis instead; `param_shardings` reports every such
fallback so that replication is never silent.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
LOGICAL_AXIS_RULES: LogicalRules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    # parameters (and activations that share their layout)
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)

# The layout parameters take while decoding (`sampling.sampling_layout`): split over the tensor axis
# only and whole on every data-parallel device, so a decode step reads its weights in place. In the
# training layout above a decode step would all-gather its fsdp-split weights at every token.
SAMPLING_RULES: LogicalRules = tuple((name, None if name == "embed" else axes) for name, axes in LOGICAL_AXIS_RULES)

log = logging.getLogger(__name__)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None,
              slices: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all devices by default).

    One of the sizes may be -1: it takes whatever the others leave. With `slices` > 1 (multi-slice:
    TPU slices joined over the slower data-centre network) the data axis is split `slices` ways across
    slices and fsdp / tensor stay inside each slice, so only data-parallel gradient reductions cross
    slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {len(devices)} devices; "
                f"choose sizes whose product divides {len(devices)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices but "
            f"{len(devices)} are given; make the product equal the device count or set one size to -1")
    auto = (jax.sharding.AxisType.Auto,) * 3
    if slices > 1:
        return _multislice_mesh(sizes, devices, slices, auto)
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        # A TPU torus whose physical axes do not match these sizes one for one (a tensor axis of 8 on
        # a 4x4x4 slice): let a logical axis span parts of several physical ones.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes), devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def _multislice_mesh(sizes: list[int], devices: list, slices: int, axis_types) -> Mesh:
    from jax.experimental import mesh_utils

    data, fsdp, tensor = sizes
    if data % slices:
        raise ValueError(f"mesh.data={data} must be a multiple of mesh.slices={slices}: the data axis is what "
                         f"spans the slices; set mesh.data to {slices} x (data-parallel groups per slice)")
    # TPU devices know their slice; elsewhere (CPU processes in tests) each process stands for one.
    by_process = not hasattr(devices[0], "slice_index")
    granules = len({d.process_index if by_process else d.slice_index for d in devices})
    if granules != slices:
        raise ValueError(f"mesh.slices={slices} but the devices come from {granules} "
                         f"{'processes' if by_process else 'slices'}")
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices,
                                                process_is_granule=by_process, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def define_distributed_flags() -> None:
    """The absl flags an entry point needs to run as one process of several."""
    from absl import flags

    flags.DEFINE_bool("distributed", False, "join a multi-host run, detecting the cluster (Cloud TPU pods, SLURM, "
                                            "Open MPI, Kubernetes); every host runs the same command")
    flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
                        "host:port of process 0, for a multi-process run without cluster detection")
    flags.DEFINE_integer("num_processes", 0, "processes in the run (with --coordinator_address)")
    flags.DEFINE_integer("process_id", -1, "this process's index, 0..num_processes-1 (with --coordinator_address)")


def initialize_distributed_from_flags() -> None:
    """Join JAX's multi-controller runtime when the flags say this is one process of several. Must run
    before anything touches a device."""
    from absl import flags

    f = flags.FLAGS
    if f.coordinator_address:
        if f.num_processes < 1 or not 0 <= f.process_id < f.num_processes:
            raise ValueError(f"--coordinator_address needs --num_processes >= 1 and --process_id in "
                             f"[0, num_processes); got {f.num_processes} and {f.process_id}")
        jax.distributed.initialize(f.coordinator_address, num_processes=f.num_processes, process_id=f.process_id)
    elif f.distributed:
        jax.distributed.initialize()


def _rule(name: str | None, rules: LogicalRules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule; add it to LOGICAL_AXIS_RULES in {__name__}")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
                    rules: LogicalRules = LOGICAL_AXIS_RULES) -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec for an array with these logical axes on a mesh of `mesh_shape`.

    Mesh axes absent from the mesh, already used by an earlier dimension, or not dividing the
    dimension are dropped; the second return value describes each drop caused by divisibility.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec, dropped = [], []
    for name, size in zip(logical_axes, shape):
        chosen: list[str] = []
        for axis in _rule(name, rules):
            if axis not in mesh_shape or axis in used or mesh_shape[axis] == 1:
                continue
            if size % (math.prod(mesh_shape[a] for a in chosen) * mesh_shape[axis]):
                dropped.append(f"{name}={size} not divisible by mesh axis {axis}={mesh_shape[axis]}")
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec), dropped


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Shard an activation by its logical axes under the active mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec, _ = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def param_shardings(logical_tree, abstract_tree, mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES):
    """NamedShardings for a parameter tree, logging every dimension that had to be replicated."""
    mesh_shape = dict(mesh.shape)

    def one(path, axes, leaf):
        spec, dropped = logical_to_spec(axes, leaf.shape, mesh_shape, rules)
        for reason in dropped:
            log.warning("parameter %s: %s, so that dimension is replicated instead of sharded",
                        jax.tree_util.keystr(path), reason)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, tuple))


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` live on, or None when they are not NamedSharding-placed."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a numpy array that every process holds whole (the same on each): each
    process transfers only the slices its own devices hold. jit refuses numpy inputs with a
    non-replicated sharding once the mesh spans several processes; this is the way in."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The whole array as numpy on this host (every host takes part when it spans several)."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def bytes_per_device(array: jax.Array) -> dict[int, int]:
    """Bytes of `array` held by each addressable device (to check that sharding is real)."""
    out: dict[int, int] = {}
    for shard in array.addressable_shards:
        out[shard.device.id] = out.get(shard.device.id, 0) + int(np.prod(shard.data.shape)) * array.dtype.itemsize
    return out
