"""The Flax port against Hugging Face transformers' Qwen2ForCausalLM (float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch, make_hf_model, torch_logits

import dapo_jax
from dapo_jax.models import qwen2

PARITY_ATOL = 1e-4  # the bar; observed differences are around 2e-6


def test_logits_match_transformers(hf_checkpoint):
    path, model = hf_checkpoint
    config, params = dapo_jax.load_hf_checkpoint(path)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (3, 17))
    ours = np.asarray(dapo_jax.forward(config, params, tokens))
    assert ours.dtype == np.float32 and ours.shape == (3, 17, config.vocab_size)
    np.testing.assert_allclose(ours, torch_logits(model, tokens), atol=PARITY_ATOL, rtol=0)


def test_left_padded_batch_matches_transformers(hf_checkpoint):
    path, model = hf_checkpoint
    config, params = dapo_jax.load_hf_checkpoint(path)
    tokens, mask = left_padded_batch(2, [5, 13, 1, 9], config.vocab_size)
    ours = np.asarray(dapo_jax.forward(config, params, tokens, attention_mask=mask))
    ref = torch_logits(model, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=PARITY_ATOL, rtol=0)


def test_left_padding_does_not_change_logits(hf_checkpoint):
    path, _ = hf_checkpoint
    config, params = dapo_jax.load_hf_checkpoint(path)
    lengths = [5, 13, 1, 9]
    tokens, mask = left_padded_batch(3, lengths, config.vocab_size)
    padded = np.asarray(dapo_jax.forward(config, params, tokens, attention_mask=mask))
    assert np.isfinite(padded).all(), "padding rows must not produce NaN/inf"
    for row, n in enumerate(lengths):
        alone = np.asarray(dapo_jax.forward(config, params, tokens[row:row + 1, -n:]))
        np.testing.assert_allclose(padded[row, -n:], alone[0], atol=1e-5, rtol=0)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    model = make_hf_model(rope_type="linear", rope_factor=2.0)
    model.save_pretrained(tmp_path)
    config, params = dapo_jax.load_hf_checkpoint(tmp_path)
    assert config.rope_type == "linear"
    tokens = np.random.RandomState(4).randint(0, config.vocab_size, (2, 40))
    np.testing.assert_allclose(np.asarray(dapo_jax.forward(config, params, tokens)), torch_logits(model, tokens),
                               atol=PARITY_ATOL, rtol=0)


def test_bf16_compute_with_fp32_params(hf_checkpoint):
    path, model = hf_checkpoint
    config, params = dapo_jax.load_hf_checkpoint(path, dtype="float32", compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    tokens = np.random.RandomState(5).randint(0, config.vocab_size, (2, 12))
    ours = np.asarray(dapo_jax.forward(config, params, tokens))
    ref = torch_logits(model, tokens)
    assert ours.dtype == np.float32
    # bf16 keeps ~3 significant digits; the argmax should almost always agree.
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_logits_and_gradients(policy):
    from conftest import tiny_config

    base = tiny_config()
    params = dapo_jax.init_params(base, jax.random.key(0))
    tokens, mask = left_padded_batch(6, [6, 3], base.vocab_size)

    def loss(config, p):
        return qwen2._forward(config, p, tokens, mask, qwen2.positions_from_mask(mask)).mean()

    want_loss, want_grads = jax.value_and_grad(loss, argnums=1)(base, params)
    got_loss, got_grads = jax.value_and_grad(loss, argnums=1)(base.replace(remat_policy=policy), params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


def test_forward_rejects_mismatched_mask():
    from conftest import tiny_config

    config = tiny_config()
    params = dapo_jax.init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="attention_mask shape"):
        dapo_jax.forward(config, params, np.zeros((2, 4), np.int32), attention_mask=np.ones((2, 5), np.int32))
