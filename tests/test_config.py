"""Qwen2Config: reading both config.json generations, presets, and clear errors."""

import json

import jax
import numpy as np
import pytest

from dapo_jax.models import qwen2
from dapo_jax.models.qwen2 import Qwen2Config

V4_CONFIG = {  # transformers 4.x style, as the published Qwen2.5-7B config.json
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 131072,
    "sliding_window": 131072, "max_window_layers": 28, "use_sliding_window": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
}


def v5_form(hf: dict) -> dict:
    out = {k: v for k, v in hf.items() if k not in ("rope_theta", "torch_dtype", "rope_scaling")}
    return {**out, "rope_parameters": {"rope_type": "default", "rope_theta": hf["rope_theta"]}, "dtype": hf["torch_dtype"]}


def test_reads_transformers_4_config():
    c = Qwen2Config.from_hf_dict(V4_CONFIG)
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.kv_head_dim) == (3584, 28, 4, 128)
    assert c.rope_theta == 1e6 and c.rope_type == "default" and c.checkpoint_dtype == "bfloat16"
    assert not c.tie_word_embeddings


def test_reads_transformers_5_config_identically():
    assert Qwen2Config.from_hf_dict(v5_form(V4_CONFIG)) == Qwen2Config.from_hf_dict(V4_CONFIG)


def test_reads_linear_rope_scaling_in_both_forms():
    v4 = {**V4_CONFIG, "rope_scaling": {"type": "linear", "factor": 4.0}}
    v5 = {**v5_form(V4_CONFIG), "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}
    for hf in (v4, v5):
        c = Qwen2Config.from_hf_dict(hf)
        assert (c.rope_type, c.rope_factor, c.rope_theta) == ("linear", 4.0, 1e6)


def test_hf_dict_round_trip_keeps_unmodelled_keys():
    c = Qwen2Config.from_hf_dict(V4_CONFIG)
    again = c.to_hf_dict()
    assert Qwen2Config.from_hf_dict(again) == c
    assert again["max_window_layers"] == 28 and again["sliding_window"] == 131072


@pytest.mark.parametrize("form", ["v4", "v5"])
def test_transformers_reads_our_config_json(tmp_path, form):
    from transformers import AutoConfig

    c = Qwen2Config.from_hf_dict(V4_CONFIG if form == "v4" else v5_form(V4_CONFIG))
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_theta"] == 1e6 and hf.rope_parameters["rope_type"] == "default"
    assert hf.num_key_value_heads == 4 and hf.rms_norm_eps == 1e-6 and hf.tie_word_embeddings is False


# Parameter counts of the published Qwen2.5 base models (model cards), in billions.
PUBLISHED_PARAMS = {"0.5B": 0.49, "1.5B": 1.54, "3B": 3.09, "7B": 7.61, "14B": 14.7, "32B": 32.5}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_presets_have_the_published_parameter_counts(name):
    c = qwen2.preset(name)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(qwen2.abstract_params(c)))
    assert abs(count / 1e9 - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02
    assert c.kv_head_dim == (64 if name == "0.5B" else 128)
    assert c.tie_word_embeddings == (name in ("0.5B", "1.5B", "3B"))
    assert c.rms_norm_eps == (1e-5 if name in ("14B", "32B") else 1e-6)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="0.5B"):
        qwen2.preset("72B")


@pytest.mark.parametrize("change, message", [
    (dict(num_attention_heads=5), "does not divide hidden_size"),
    (dict(num_key_value_heads=3), "does not divide num_attention_heads"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    (dict(use_sliding_window=True), "sliding-window attention is not supported"),
    (dict(model_type="llama"), "model_type='llama'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_invalid_config_fails_with_a_message_that_says_what_to_change(change, message):
    with pytest.raises(ValueError, match=message):
        Qwen2Config.from_hf_dict({**V4_CONFIG, **change})


def test_missing_required_key_is_named():
    hf = dict(V4_CONFIG)
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        Qwen2Config.from_hf_dict(hf)


def test_bad_runtime_settings_are_rejected():
    with pytest.raises(ValueError, match="remat_policy"):
        Qwen2Config.from_hf_dict(V4_CONFIG, remat_policy="sometimes")
    with pytest.raises(ValueError, match="param_dtype"):
        Qwen2Config.from_hf_dict(V4_CONFIG, param_dtype="int8")
