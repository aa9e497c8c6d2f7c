"""Attention implementations against the dense reference: left-padded and packed rows, grouped-query
heads, values and gradients; the memory the blockwise one saves; the TPU kernel in shard_map,
compiled for a TPU topology here and run through the Pallas interpreter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import attention


def inputs(seed=0, B=2, T=40, K=2, G=2, D=16, dtype=jnp.float32):
    """q, k, v and segment ids: even rows left-padded (6 pads, then one sequence), odd rows three
    packed sequences and trailing padding."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, K, G, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, K, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, K, D)), dtype)
    seg = np.zeros((B, T), np.int32)
    for row in range(B):
        if row % 2 == 0:
            seg[row, 6:] = 1
        else:
            seg[row, :11], seg[row, 11:25], seg[row, 25:T - 3] = 1, 2, 3
    return q, k, v, jnp.asarray(seg)


def loss_fn(impl, **kwargs):
    """A scalar of the attention output whose gradient reaches every input position."""
    def f(q, k, v, seg):
        out = impl(q, k, v, seg, **kwargs)
        weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights)
    return f


def test_a_query_sees_only_earlier_keys_of_its_own_segment():
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 0]])
    mask = np.asarray(attention.visible(seg))[0]
    assert mask[4].tolist() == [False, False, True, True, True, False, False, False]
    assert mask[6].tolist() == [False] * 5 + [True, True, False]
    assert mask[1].tolist() == [True, True] + [False] * 6  # padding sees padding: no empty softmax


@pytest.mark.parametrize("block_q, block_kv", [(16, 8), (8, 16), (64, 64), (40, 40)])
def test_blockwise_matches_dense_values_and_gradients(block_q, block_kv):
    q, k, v, seg = inputs()
    kwargs = dict(block_q=block_q, block_kv=block_kv)
    np.testing.assert_allclose(attention.blockwise(q, k, v, seg, **kwargs), attention.dense(q, k, v, seg),
                               atol=2e-6, rtol=1e-5)
    grads = jax.grad(loss_fn(attention.blockwise, **kwargs), argnums=(0, 1, 2))(q, k, v, seg)
    expected = jax.grad(loss_fn(attention.dense), argnums=(0, 1, 2))(q, k, v, seg)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_blockwise_in_bfloat16_stays_close_to_the_float32_reference():
    q, k, v, seg = inputs(dtype=jnp.bfloat16)
    reference = attention.dense(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    out = attention.blockwise(q, k, v, seg, block_q=16, block_kv=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=3e-2, rtol=3e-2)


def test_a_segment_does_not_see_another_segments_keys():
    q, k, v, seg = inputs()
    # Changing sequence 3 of row 1 leaves sequences 1 and 2 as they were.
    changed = v.at[1, 25:].add(10.0)
    for impl in (attention.dense, attention.blockwise):
        a, b = impl(q, k, v, seg), impl(q, k, changed, seg)
        np.testing.assert_array_equal(a[1, :25], b[1, :25])
        assert not np.allclose(a[1, 25:37], b[1, 25:37])


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_holds_one_block_of_scores_not_the_whole_square():
    """The forward and backward pass of 4,096 tokens x 4 heads: dense needs the [T, T] float32 scores
    (256 MiB and more); blockwise about a block's worth beside its inputs and outputs."""
    B, T, K, G, D = 1, 4096, 2, 2, 64
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((B, T, K, G, D), (B, T, K, D), (B, T, K, D))]
    shapes.append(jax.ShapeDtypeStruct((B, T), jnp.int32))
    squares = B * K * G * T * T * 4
    dense = temp_bytes(jax.grad(loss_fn(attention.dense), argnums=(0, 1, 2)), *shapes)
    blockwise = temp_bytes(jax.grad(loss_fn(attention.blockwise, block_q=512, block_kv=512), argnums=(0, 1, 2)),
                           *shapes)
    assert dense >= squares
    assert blockwise < squares / 8, (blockwise, squares)


def test_blockwise_inside_a_differentiated_loop_over_layers_keeps_no_scores_either():
    """Layers are a scan: attention's own loops must not turn into per-block residuals of it."""
    B, T, K, G, D = 1, 4096, 2, 2, 64
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((B, T, K, G, D), (B, T, K, D), (B, T, K, D))]
    shapes.append(jax.ShapeDtypeStruct((B, T), jnp.int32))

    def layers(q, k, v, seg):
        def layer(x, _):
            return attention.blockwise(q + x.mean(), k, v, seg).mean() + x, None
        return jax.lax.scan(layer, jnp.zeros(()), None, length=3)[0]

    squares = B * K * G * T * T * 4  # per layer; kept scores would cost 3 of these, the inputs ~24 MiB a layer
    assert temp_bytes(jax.grad(layers, argnums=(0, 1, 2)), *shapes) < squares / 2


def test_unknown_implementations_are_named():
    with pytest.raises(ValueError, match="'flash' is not one of"):
        attention.resolve("flash")


def test_auto_is_splash_for_a_tpu_mesh_and_blockwise_here():
    from dapo_jax import plan, sharding

    assert attention.resolve("auto") == "blockwise"
    with jax.set_mesh(sharding.make_mesh(devices=plan.target("v5p-8").devices)):
        assert attention.resolve("auto") == "splash"


def test_cudnn_segment_offsets_describe_exactly_the_visible_pairs():
    """cuDNN sees each row as ragged segments (start, length), causal within each: the pairs that
    layout makes visible are the segment ids' visible pairs, minus padding's (which cuDNN leaves out)."""
    seg = np.zeros((5, 40), np.int32)
    _, _, _, seg[:2] = inputs(B=2)  # left-padded, and three packed sequences with trailing padding
    seg[2, :40] = np.repeat(np.arange(1, 11), 4)  # ten packed sequences filling the row
    seg[3, 0] = 7  # a one-token sequence with other ids than 1, 2, ...
    seg[3, 1:30] = 9
    # seg[4]: all padding
    lengths, starts = (np.asarray(x) for x in attention.segment_offsets(jnp.asarray(seg)))
    assert lengths.shape == (5, 40) and starts.shape == (5, 41)
    assert lengths[1, :4].tolist() == [11, 14, 12, -1] and starts[1, :4].tolist() == [0, 11, 25, -1]
    assert (lengths[4] == -1).all() and (starts[4] == -1).all()
    T = seg.shape[1]
    t = np.arange(T)
    for row in range(len(seg)):
        from_offsets = np.zeros((T, T), bool)
        for length, start in zip(lengths[row], starts[row]):
            if length < 0:
                break
            inside = (t >= start) & (t < start + length)
            from_offsets |= inside[:, None] & inside[None, :] & (t[None, :] <= t[:, None])
        expected = np.asarray(attention.visible(jnp.asarray(seg[row:row + 1])))[0] & (seg[row] != 0)[:, None]
        np.testing.assert_array_equal(from_offsets, expected)


def test_cudnn_off_an_nvidia_gpu_says_what_to_use():
    with pytest.raises(ValueError, match="'cudnn' runs on NVIDIA GPUs only, and this program is for cpu: use 'auto'"):
        attention.attention(*inputs(), implementation="cudnn")


def test_splash_matches_dense_through_the_pallas_interpreter():
    q, k, v, seg = inputs(B=2, T=200, K=1, G=2, D=128)  # padded to 256 inside
    splash = lambda *a: attention.splash(*a, interpret=True)  # noqa: E731
    np.testing.assert_allclose(splash(q, k, v, seg), attention.dense(q, k, v, seg), atol=1e-5, rtol=1e-5)
    grads = jax.grad(loss_fn(splash), argnums=(0, 1, 2))(q, k, v, seg)
    expected = jax.grad(loss_fn(attention.dense), argnums=(0, 1, 2))(q, k, v, seg)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_splash_compiles_for_a_tpu_topology_in_shard_map_with_its_memory():
    """Forward and backward over a v5p-8 (4 chips: rows split 4 ways), ahead of time, no TPU here."""
    from jax.sharding import NamedSharding, PartitionSpec

    from dapo_jax import plan, sharding

    mesh = sharding.make_mesh(devices=plan.target("v5p-8").devices)
    B, T, K, G, D = 4, 8192, 2, 4, 128
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=rows)
              for s in ((B, T, K, G, D), (B, T, K, D), (B, T, K, D))]
    shapes.append(jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows))
    with jax.set_mesh(mesh):
        step = jax.jit(jax.grad(loss_fn(lambda *a: attention.attention(*a, implementation="auto")), argnums=(0, 1, 2)))
        lowered = step.lower(*shapes)
        assert "splash" in lowered.as_text()
        memory = lowered.compile().memory_analysis()
    squares = 1 * K * G * T * T * 4  # one row's float32 scores, what dense attention would hold per device
    assert memory.temp_size_in_bytes < squares / 16, memory


def test_the_model_gives_the_same_logits_and_gradients_with_each_portable_implementation():
    from conftest import left_padded_batch, tiny_config

    from dapo_jax.models import qwen2

    config = tiny_config()
    params = qwen2.init_params(config, jax.random.key(0))
    tokens, mask = left_padded_batch(0, [12, 5, 9], config.vocab_size)
    positions = qwen2.positions_from_mask(mask)

    def logits_and_grad(impl):
        model = qwen2.Qwen2ForCausalLM(config.replace(attention=impl))

        def loss(p):
            logits, _ = model.apply({"params": p}, tokens, positions, mask)
            return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)[..., 3]), logits
        (_, logits), grad = jax.value_and_grad(loss, has_aux=True)(params)
        return np.where(mask[..., None] > 0, logits, 0.0), grad

    reference, reference_grad = logits_and_grad("dense")
    logits, grad = logits_and_grad("blockwise")
    np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(reference_grad)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_packed_sequences_get_the_logits_each_gets_alone(impl):
    from conftest import tiny_config

    from dapo_jax.models import qwen2

    config = tiny_config(attention=impl)
    params = qwen2.init_params(config, jax.random.key(1))
    rng = np.random.default_rng(0)
    a, b = rng.integers(2, config.vocab_size, 7), rng.integers(2, config.vocab_size, 9)
    row = np.concatenate([a, b, np.zeros(4, np.int64)])[None].astype(np.int32)
    segments = np.array([[1] * 7 + [2] * 9 + [0] * 4], np.int32)
    positions = np.array([list(range(7)) + list(range(9)) + [0] * 4], np.int32)
    model = qwen2.Qwen2ForCausalLM(config)
    packed, _ = model.apply({"params": params}, row, positions, (segments > 0).astype(np.int32),
                            segment_ids_BxT=segments)
    for seq, span in ((a, slice(0, 7)), (b, slice(7, 16))):
        alone = qwen2.forward(config, params, seq[None].astype(np.int32))
        np.testing.assert_allclose(packed[0, span], alone[0], atol=2e-5, rtol=1e-5)


def test_the_train_memory_bench_prints_one_json_line_per_run(capsys):
    import json

    from dapo_jax import bench

    bench.main(["train-memory", "--checkpoint", "random:tiny,layers=1", "--lengths", "64,256", "--attention",
                "blockwise"])
    line = json.loads(capsys.readouterr().out)
    assert line["bench"] == "train-memory" and set(line["temp_gib"]) == {"64", "256"}
    assert all(v > 0 for v in line["temp_gib"].values())


def test_the_log_prob_pass_compiles_splash_in_shard_map_for_a_tpu_slice():
    """The old-log-prob pass runs under its mesh, so on TPU attention is splash inside shard_map (a
    Pallas kernel cannot be partitioned automatically)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from dapo_jax import plan, rollout, sharding
    from dapo_jax.models import loading, qwen2

    mesh = sharding.make_mesh(devices=plan.target("v5p-8").devices)
    config = loading.random_config("tiny,hidden=256,heads=2,kv_heads=1,layers=1", dtype="bfloat16")  # head_dim 128
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    qwen2.abstract_params(config), qwen2.param_shardings(config, mesh))
    rows = jax.ShapeDtypeStruct((4, 1024), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    logprobs = rollout.make_logprob_fn(config, temperature=1.0, chunk_rows=4, mesh=mesh)
    lowered = logprobs.lower((params,), rows, rows, rows)
    assert "splash" in lowered.as_text()
    lowered.compile()


def test_the_attention_bench_compares_each_implementation_with_the_first(capsys):
    import json

    from dapo_jax import bench

    bench.main(["attention", "--length", "256", "--head-dim", "32", "--repeats", "1"])
    line = json.loads(capsys.readouterr().out)
    assert line["results"]["dense"]["reference"] and line["segments"] >= 2
    blockwise = line["results"]["blockwise"]
    assert blockwise["vs"] == "dense" and blockwise["loss_rel_diff"] < 1e-5 and blockwise["max_grad_diff"] < 1e-4
