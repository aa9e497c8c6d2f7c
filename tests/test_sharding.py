"""The model on a 2x4 (fsdp, tensor) mesh of 8 forced CPU devices: same logits, really sharded."""

import logging

import jax
import numpy as np
import pytest
from conftest import left_padded_batch, tiny_config
from jax.sharding import NamedSharding, PartitionSpec as P

import dapo_jax
from dapo_jax import sharding
from dapo_jax.models import qwen2

# Sizes every mesh axis divides, so that nothing falls back to replication.
SHARDABLE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                 num_key_value_heads=4)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest forces 8 host devices"
    return sharding.make_mesh(data=1, fsdp=2, tensor=4)


def test_sharded_forward_matches_one_device(mesh, tmp_path):
    config = tiny_config(**SHARDABLE)
    params = dapo_jax.init_params(config, jax.random.key(0))
    dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", config, params)
    _, sharded = dapo_jax.load_hf_checkpoint(tmp_path / "ckpt", mesh=mesh)
    tokens, mask = left_padded_batch(0, [9, 4, 12, 1], config.vocab_size)
    want = np.asarray(dapo_jax.forward(config, params, tokens, attention_mask=mask))
    got = dapo_jax.forward(config, sharded, tokens, attention_mask=mask)
    assert isinstance(got.sharding, NamedSharding) and got.sharding.mesh == mesh
    assert got.sharding.spec == P("fsdp", None, "tensor")  # batch over fsdp, vocab over tensor
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_parameters_are_really_sharded(mesh):
    config = tiny_config(**SHARDABLE)
    params = dapo_jax.init_params(config, jax.random.key(0), mesh=mesh)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    for leaf in jax.tree_util.tree_leaves(params):
        if leaf.size >= 4096:  # large tensors: each device holds 1/8 of the bytes
            per_device = sharding.bytes_per_device(leaf)
            assert len(per_device) == 8
            assert set(per_device.values()) == {leaf.nbytes // 8}, jax.tree_util.keystr(leaf)


def test_loading_places_each_tensor_in_its_target_sharding(mesh, tmp_path):
    config = tiny_config(**SHARDABLE)
    params = dapo_jax.init_params(config, jax.random.key(0))
    dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", config, params)
    _, loaded = dapo_jax.load_hf_checkpoint(tmp_path / "ckpt", mesh=mesh)
    want = qwen2.param_shardings(config, mesh)
    for got, expected, value in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(want),
                                    jax.tree_util.tree_leaves(params)):
        assert got.sharding == expected
        np.testing.assert_array_equal(np.asarray(got), np.asarray(value))


def test_sharded_params_save_back_identically(mesh, tmp_path):
    config = tiny_config(**SHARDABLE)
    params = dapo_jax.init_params(config, jax.random.key(3), mesh=mesh)
    dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", config, params)
    _, loaded = dapo_jax.load_hf_checkpoint(tmp_path / "ckpt")
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_indivisible_dimension_is_replicated_and_reported(mesh, caplog):
    config = tiny_config(**{**SHARDABLE, "num_key_value_heads": 2})  # 2 kv heads on a tensor axis of 4
    with caplog.at_level(logging.WARNING, logger="dapo_jax.sharding"):
        shardings = qwen2.param_shardings(config, mesh)
    assert shardings["layers"]["self_attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", None, None)
    assert "k_proj" in caplog.text and "kv_heads=2 not divisible by mesh axis tensor=4" in caplog.text


def test_batch_is_split_over_data_and_fsdp():
    spec, dropped = sharding.logical_to_spec(("batch", "length", "act_embed"), (8, 5, 64),
                                             {"data": 2, "fsdp": 2, "tensor": 2})
    assert spec == P(("data", "fsdp"), None, None) and not dropped


def test_a_mesh_axis_is_used_at_most_once_per_array():
    spec, _ = sharding.logical_to_spec(("heads", "mlp"), (8, 8), {"data": 1, "fsdp": 2, "tensor": 4})
    assert spec == P("tensor", None)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=3, fsdp=-1), "do not divide the 8 devices"),
    (dict(data=2, fsdp=2, tensor=4), "use 16 devices but 8 are given"),
    (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
])
def test_bad_mesh_sizes_say_what_to_change(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(**sizes)


def test_unknown_logical_axis_names_the_rules_table():
    with pytest.raises(KeyError, match="LOGICAL_AXIS_RULES"):
        sharding.logical_to_spec(("nonsense",), (4,), {"fsdp": 2})
