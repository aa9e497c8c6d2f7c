"""Full-size models compile ahead of time from abstract inputs: no weights, no accelerator."""

import time

import jax
import jax.numpy as jnp
import pytest

from dapo_jax import sharding
from dapo_jax.models import qwen2


def abstract_inputs(batch, length):
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return tokens, tokens, tokens


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_32b_forward_compiles_in_seconds(remat_policy):
    config = qwen2.preset("32B", dtype="bfloat16", param_dtype="bfloat16", remat_policy=remat_policy)
    start = time.perf_counter()
    compiled = jax.jit(qwen2._forward, static_argnums=0).lower(
        config, qwen2.abstract_params(config), *abstract_inputs(1, 128)).compile()
    print(f"32B forward ({remat_policy=}) traced, lowered and compiled in {time.perf_counter() - start:.2f}s")
    assert compiled.out_info.shape == (1, 128, 152064) and compiled.out_info.dtype == jnp.float32


def test_32b_forward_compiles_sharded_with_no_replicated_weights():
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    config = qwen2.preset("32B", dtype="bfloat16", param_dtype="bfloat16")
    shardings = qwen2.param_shardings(config, mesh)
    params = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    qwen2.abstract_params(config), shardings)
    for path, s in jax.tree_util.tree_leaves_with_path(shardings):
        if "norm" not in jax.tree_util.keystr(path):
            assert any(axis is not None for axis in s.spec), f"{jax.tree_util.keystr(path)} is replicated"
    with jax.set_mesh(mesh):
        compiled = jax.jit(qwen2._forward, static_argnums=0).lower(config, params, *abstract_inputs(8, 64)).compile()
    assert compiled.out_info.shape == (8, 64, 152064)
