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

log = logging.getLogger(__name__)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all devices by default).

    One of the sizes may be -1: it takes whatever the others leave.
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
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def _rule(name: str | None, rules: LogicalRules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule; add it to LOGICAL_AXIS_RULES in {__name__}")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh_shape: dict[str, int]) -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec for an array with these logical axes on a mesh of `mesh_shape`.

    Mesh axes absent from the mesh, already used by an earlier dimension, or not dividing the
    dimension are dropped; the second return value describes each drop caused by divisibility.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    rules = LOGICAL_AXIS_RULES
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


def param_shardings(logical_tree, abstract_tree, mesh: Mesh):
    """NamedShardings for a parameter tree, logging every dimension that had to be replicated."""
    mesh_shape = dict(mesh.shape)

    def one(path, axes, leaf):
        spec, dropped = logical_to_spec(axes, leaf.shape, mesh_shape)
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
