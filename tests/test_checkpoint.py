"""Hugging Face checkpoint I/O: round trips, transformers compatibility, errors, safe replacement."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, torch_logits

import dapo_jax
from dapo_jax import hf
from dapo_jax.hf import CheckpointError


def assert_trees_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_then_load_is_bit_exact(tmp_path, dtype, tied):
    config = tiny_config(tie_word_embeddings=tied, dtype=dtype, param_dtype=dtype, checkpoint_dtype=dtype)
    params = dapo_jax.init_params(config, jax.random.key(0))
    dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", config, params)
    loaded_config, loaded = dapo_jax.load_hf_checkpoint(tmp_path / "ckpt", dtype=dtype)
    assert loaded_config == config
    assert_trees_identical(loaded, params)


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    config = tiny_config()
    params = dapo_jax.init_params(config, jax.random.key(0))
    dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", config, params, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ckpt" / hf.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "ckpt" / hf.SINGLE_FILE).exists()
    assert_trees_identical(dapo_jax.load_hf_checkpoint(tmp_path / "ckpt")[1], params)


def test_transformers_loads_our_checkpoint_with_identical_logits(hf_checkpoint, tmp_path):
    from transformers import Qwen2ForCausalLM

    path, model = hf_checkpoint
    config, params = dapo_jax.load_hf_checkpoint(path)
    dapo_jax.save_hf_checkpoint(tmp_path / "ours", config, params, max_shard_bytes=60_000)
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 11))
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(model, tokens))


def test_bf16_checkpoint_loads_into_float32_params(tmp_path):
    config = tiny_config(checkpoint_dtype="bfloat16")
    params = dapo_jax.init_params(config, jax.random.key(0))
    dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", config, params)
    header = hf._read_header(tmp_path / "ckpt" / hf.SINGLE_FILE)
    assert {t.dtype.name for t in header.values()} == {"bfloat16"}
    _, loaded = dapo_jax.load_hf_checkpoint(tmp_path / "ckpt", dtype="float32")
    for x, y in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        assert x.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jnp.bfloat16).astype(jnp.float32)))


def test_companion_tokenizer_files_are_copied(tmp_path):
    config = tiny_config()
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text('{"eos_token_id": 1}')
    dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", config, dapo_jax.init_params(config, jax.random.key(0)),
                                copy_files_from=src)
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "ckpt" / "generation_config.json").exists()


# -- errors that name the file and the key --------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    config = tiny_config()
    dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", config, dapo_jax.init_params(config, jax.random.key(0)),
                                max_shard_bytes=60_000)
    return tmp_path / "ckpt"


def rewrite_tensors(path, edit):
    """Rewrite one shard of a checkpoint with edit(dict of numpy tensors) applied."""
    from safetensors.numpy import load_file, save_file

    index = json.loads((path / hf.INDEX_FILE).read_text())
    shard = path / index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (path / hf.INDEX_FILE).write_text(json.dumps(index))
    return shard


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        dapo_jax.load_hf_checkpoint(tmp_path / "nowhere")


def test_missing_config_json_is_named(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        dapo_jax.load_hf_checkpoint(saved)


def test_missing_weights_are_reported_with_what_is_there(saved):
    for f in saved.glob("*.safetensors*"):
        f.unlink()
    (saved / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"neither model.safetensors nor .*\.bin checkpoints are not read"):
        dapo_jax.load_hf_checkpoint(saved)


def test_index_pointing_to_a_missing_file_names_it(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}, which is missing"):
        dapo_jax.load_hf_checkpoint(saved)


def test_missing_tensor_is_named(saved):
    rewrite_tensors(saved, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.k_proj.weight \(and 0 more\) is missing"):
        dapo_jax.load_hf_checkpoint(saved)


def test_wrong_shape_names_file_and_key(saved):
    def shrink(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:-1]

    shard = rewrite_tensors(saved, shrink)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: model.layers.1.self_attn.k_proj.weight has shape"):
        dapo_jax.load_hf_checkpoint(saved)


def test_unexpected_tensor_names_file_and_key(saved):
    def add(t):
        t["model.layers.1.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)

    shard = rewrite_tensors(saved, add)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: unexpected tensor model.layers.1.self_attn.extra"):
        dapo_jax.load_hf_checkpoint(saved)


def test_truncated_file_is_named(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        dapo_jax.load_hf_checkpoint(saved)


def test_config_of_another_architecture_is_refused(saved):
    hf_config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**hf_config, "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match="config.json: num_key_value_heads=3 does not divide"):
        dapo_jax.load_hf_checkpoint(saved)


def test_params_of_another_config_are_refused_before_writing(tmp_path):
    params = dapo_jax.init_params(tiny_config(), jax.random.key(0))
    with pytest.raises(CheckpointError, match="different config"):
        dapo_jax.save_hf_checkpoint(tmp_path / "ckpt", tiny_config(intermediate_size=96), params)
    assert not any(tmp_path.iterdir())


# -- nothing good is lost -------------------------------------------------------------------------


def test_save_refuses_to_replace_without_overwrite(saved):
    config, params = dapo_jax.load_hf_checkpoint(saved)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        dapo_jax.save_hf_checkpoint(saved, config, params)


def test_interrupted_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    config, params = dapo_jax.load_hf_checkpoint(saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    calls = []
    real_write = hf._write_safetensors

    def write_then_die(file, entries, arrays):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill during the second shard")
        real_write(file, entries, arrays)

    monkeypatch.setattr(hf, "_write_safetensors", write_then_die)
    new_params = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    with pytest.raises(KeyboardInterrupt):
        dapo_jax.save_hf_checkpoint(saved, config, new_params, overwrite=True, max_shard_bytes=60_000)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name], "temporary directories must be cleaned up"


def test_overwrite_replaces_the_checkpoint(saved):
    config, params = dapo_jax.load_hf_checkpoint(saved)
    new_params = jax.tree_util.tree_map(lambda x: x * 2.0, params)
    dapo_jax.save_hf_checkpoint(saved, config, new_params, overwrite=True)
    assert_trees_identical(dapo_jax.load_hf_checkpoint(saved)[1], new_params)
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
