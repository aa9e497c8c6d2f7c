"""Causal self-attention over padded or packed rows: one function, several implementations.

    out_BxTxKxGxD = attention(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, implementation="auto")

Query t of a row sees key s when both belong to the same segment and s <= t:

    visible(t, s) = segment_ids[t] == segment_ids[s]  and  s <= t

A row is one left-padded sequence (padding is segment 0, the sequence segment 1) or several
sequences packed one after another (segments 1, 2, ... and the padding after them). No token
attends across a segment boundary. q holds G query heads per kv head (grouped-query attention);
scores are scaled by 1/sqrt(D), softmax is taken in float32.

Implementations, chosen by name (`IMPLEMENTATIONS`):

    dense      the plain einsum: [B, K, G, T, T] float32 scores. The reference the others are tested
               against; memory grows with T^2.
    blockwise  pure JAX, flash-style: queries and keys in blocks, an online softmax over key blocks
               and a custom VJP that recomputes each block's scores in the backward pass, so no more
               than one [block_q, block_kv] block of scores per head exists at a time. Key blocks
               entirely above the causal diagonal are never visited. The default off TPU.
    splash     TPU: the Pallas splash-attention kernel (causal mask + segment ids, forward and
               backward), run per device inside `shard_map` (a Pallas kernel cannot be partitioned
               automatically): rows split over the batch axes, kv heads over the tensor axis.
    cudnn      NVIDIA GPUs: cuDNN's fused flash attention (through JAX's cuDNN binding), causal within
               each segment, the segments given to it as ragged offsets and lengths per row
               (`segment_offsets`), so packed rows need no [T, T] mask.
    auto       splash on TPU, blockwise elsewhere (on GPUs too, until the cuDNN path is measured on one:
               `python -m dapo_jax.bench attention --implementations dense,blockwise,cudnn`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dapo_jax import sharding

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "splash", "cudnn")
BLOCK = 512  # the blockwise implementation's default query and key block (tokens)
_FLOOR = float(jnp.finfo(jnp.float32).min)  # masked scores: finite, so a row that sees nothing stays NaN-free


def attention(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, *, implementation: str = "auto",
              block_q: int = BLOCK, block_kv: int = BLOCK):
    """softmax(q k^T / sqrt(D) + causal segment mask) v, in q's dtype."""
    impl = resolve(implementation)
    if impl == "dense":
        return dense(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)
    if impl == "blockwise":
        return blockwise(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, block_q=block_q, block_kv=block_kv)
    if impl == "cudnn":
        return cudnn(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)
    return splash(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)


def resolve(implementation: str) -> str:
    """The implementation "auto" stands for on the platform being compiled for: the active mesh's
    devices (a TPU topology compiled ahead of time on a CPU host is TPU), else the default backend."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation == "cudnn" and target_platform() not in ("gpu", "cuda"):
        raise ValueError(f"attention implementation 'cudnn' runs on NVIDIA GPUs only, and this program is for "
                         f"{target_platform()}: use 'auto' or 'blockwise'")
    if implementation != "auto":
        return implementation
    return "splash" if target_platform() == "tpu" else "blockwise"


def target_platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def visible(segment_ids_BxT):
    """[B, T, T] bool: query t sees key s (same segment, s <= t)."""
    T = segment_ids_BxT.shape[1]
    causal_TxT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    return causal_TxT[None] & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])


# -- dense: the reference ---------------------------------------------------------------------------


def dense(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT):
    D, dtype = q_BxTxKxGxD.shape[-1], q_BxTxKxGxD.dtype
    scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxTxKxD, preferred_element_type=jnp.float32)
    mask_BxTxS = visible(segment_ids_BxT)
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS * D**-0.5, _FLOOR)
    weights_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bskd->btkgd", weights_BxKxGxTxS, v_BxTxKxD,
                      preferred_element_type=jnp.float32).astype(dtype)


# -- blockwise: flash attention in pure JAX ---------------------------------------------------------


def blockwise(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, *, block_q: int = BLOCK,
              block_kv: int = BLOCK):
    """Flash-style attention: exact (the same softmax, accumulated per key block), with memory for
    one [block_q, block_kv] block of scores per head instead of [T, T]. T is padded up to a common
    multiple of the blocks; padded queries and keys see nothing of the real ones."""
    T = segment_ids_BxT.shape[1]
    bq, bk = min(block_q, T), min(block_kv, T)
    out = _flash(*_pad_length(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, _lcm(bq, bk)), bq, bk)
    return out[:, :T]


def _pad_length(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, multiple: int):
    """The inputs with T padded up to a multiple of `multiple`. Padded slots get a segment id no real
    slot has, so each sees only the padded slots before it and no real query sees them."""
    pad = -segment_ids_BxT.shape[1] % multiple
    if not pad:
        return q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    return (jnp.pad(q_BxTxKxGxD, widths + ((0, 0),)), jnp.pad(k_BxTxKxD, widths), jnp.pad(v_BxTxKxD, widths),
            jnp.pad(segment_ids_BxT, widths[:2], constant_values=jnp.iinfo(segment_ids_BxT.dtype).min))


def _lcm(a: int, b: int) -> int:
    import math

    return a * b // math.gcd(a, b)


def _block(x, index, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _block_scores(q_i, k_j, seg_i, seg_j, i, j, bq, bk):
    """[B, K, G, bq, bk] float32 scaled scores of query block i against key block j, masked."""
    D = q_i.shape[-1]
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * D**-0.5
    causal = (j * bk + jnp.arange(bk))[None, :] <= (i * bq + jnp.arange(bq))[:, None]
    mask_Bxqxs = causal[None] & (seg_i[:, :, None] == seg_j[:, None, :])
    return jnp.where(mask_Bxqxs[:, None, None], s, _FLOOR), mask_Bxqxs


def _last_block(i, bq, bk, nk):
    """The last key block holding a key at or before query block i's last query (causality): the key
    loops stop there. They are while loops with that bound, not scans over every block with a cond:
    a cond inside a scan makes JAX keep every block's scores as residuals when the whole attention
    sits in a differentiated loop over layers, even behind a custom VJP."""
    return jnp.minimum((i * bq + bq - 1) // bk, nk - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, bq, bk):
    return _flash_forward(q, k, v, seg, bq, bk)[0]


def _flash_forward(q, k, v, seg, bq, bk):
    B, T, K, G, D = q.shape
    nq, nk = T // bq, T // bk

    def query_block(i):
        q_i, seg_i = _block(q, i, bq), _block(seg, i, bq)

        def key_block(j, carry):
            m, l, acc = carry
            s, _ = _block_scores(q_i, _block(k, j, bk), seg_i, _block(seg, j, bk), i, j, bq, bk)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _block(v, j, bk),
                            preferred_element_type=jnp.float32)
            return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

        init = (jnp.full((B, K, G, bq), _FLOOR, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, D), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _last_block(i, bq, bk, nk) + 1, key_block, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out_NxBxKxGxQxD, lse_NxBxKxGxQ = jax.lax.map(query_block, jnp.arange(nq))
    out = out_NxBxKxGxQxD.transpose(1, 0, 4, 2, 3, 5).reshape(B, T, K, G, D)
    lse = lse_NxBxKxGxQ.transpose(1, 2, 3, 0, 4).reshape(B, K, G, T)
    return out, lse


def _flash_fwd(q, k, v, seg, bq, bk):
    out, lse = _flash_forward(q, k, v, seg, bq, bk)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(bq, bk, residuals, dout):
    """dq, dk, dv of flash attention, recomputing each block's probabilities from the saved
    log-sum-exp: P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q."""
    q, k, v, seg, out, lse = residuals
    B, T, K, G, D = q.shape
    nq, nk = T // bq, T // bk
    f32 = jnp.float32
    delta_BxKxGxT = jnp.einsum("btkgd,btkgd->bkgt", dout.astype(f32), out.astype(f32))
    scale = D**-0.5
    def add(acc, j, x):
        return jax.lax.dynamic_update_slice_in_dim(acc, _block(acc, j, bk) + x, j * bk, axis=1)

    def query_block(i, carry):
        dq, dk, dv = carry
        q_i, seg_i = _block(q, i, bq), _block(seg, i, bq)
        do_i = _block(dout, i, bq).astype(f32)
        lse_i, delta_i = _block(lse, i, bq, axis=3), _block(delta_BxKxGxT, i, bq, axis=3)

        def key_block(j, carry):
            dq_i, dk, dv = carry
            k_j, v_j = _block(k, j, bk), _block(v, j, bk)
            s, mask = _block_scores(q_i, k_j, seg_i, _block(seg, j, bk), i, j, bq, bk)
            p = jnp.where(mask[:, None, None], jnp.exp(s - lse_i[..., None]), 0.0)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j.astype(f32))
            ds = p * (dp - delta_i[..., None]) * scale
            dq_i = dq_i + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_j.astype(f32))
            dk = add(dk, j, jnp.einsum("bkgqs,bqkgd->bskd", ds, q_i.astype(f32)))
            dv = add(dv, j, jnp.einsum("bkgqs,bqkgd->bskd", p, do_i))
            return dq_i, dk, dv

        dq_i = jnp.zeros((B, bq, K, G, D), f32)
        dq_i, dk, dv = jax.lax.fori_loop(0, _last_block(i, bq, bk, nk) + 1, key_block, (dq_i, dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=1), dk, dv

    zeros = jnp.zeros((B, T, K, D), f32)
    dq, dk, dv = jax.lax.fori_loop(0, nq, query_block, (jnp.zeros(q.shape, f32), zeros, zeros))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- splash: the TPU kernel -------------------------------------------------------------------------


def splash(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, *, interpret: bool = False):
    """The Pallas splash-attention kernel (TPU; `interpret=True` runs it through the Pallas
    interpreter anywhere, which is how its numerics are tested on CPU). T is padded to a multiple
    of 128, the kernel's block granularity."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, K, G, D = q_BxTxKxGxD.shape
    q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT = _pad_length(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD,
                                                                   segment_ids_BxT, 128)
    padded = segment_ids_BxT.shape[1]
    block = min(512, padded)
    while padded % block:
        block //= 2
    sizes = sa.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((padded, padded))] * G)
    kernel = sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)

    def per_device(q, k, v, seg):
        # [B, K, G, T, D] queries (scaled here: the kernel does not), [B, K, T, D] keys and values;
        # one MQA kernel call per (row, kv head).
        q = (q * D**-0.5).astype(q.dtype).transpose(0, 2, 3, 1, 4)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        ids = jax.vmap(lambda s: sa.SegmentIds(q=s, kv=s))(seg)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
        out = jax.vmap(lambda q, k, v, ids: per_head(q, k, v, ids))(q, k, v, ids)
        return out.transpose(0, 3, 1, 2, 4)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        # rows over the batch axes, kv heads over the tensor axis where it divides them (as the params)
        kv_spec, _ = sharding.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k_BxTxKxD.shape,
                                              dict(mesh.shape))
        q_spec = PartitionSpec(*kv_spec, None)
        per_device = jax.shard_map(per_device, mesh=mesh, out_specs=q_spec, check_vma=False,
                                   in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(kv_spec[0])))
    return per_device(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)[:, :T]


# -- cudnn: the GPU kernel --------------------------------------------------------------------------


def segment_offsets(segment_ids_BxT, max_segments: int | None = None):
    """(lengths_BxM, starts_BxM1): each row's segments (maximal runs of one nonzero id, in order)
    as lengths and start offsets, unused entries -1; M = max_segments, default T (always enough).
    Padding (id 0) belongs to no segment. This is the ragged layout cuDNN takes for packed rows."""
    B, T = segment_ids_BxT.shape
    M = max_segments or T
    seg = segment_ids_BxT
    previous = jnp.pad(seg, ((0, 0), (1, 0)), constant_values=0)[:, :-1]
    starts_BxT = (seg != 0) & (seg != previous)
    index_BxT = jnp.cumsum(starts_BxT, axis=1) - 1  # the segment each token belongs to
    rows = jnp.arange(B)[:, None]
    count_B = index_BxT[:, -1] + 1
    t_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    starts = jnp.full((B, M + 1), T, jnp.int32).at[rows, jnp.where(starts_BxT, index_BxT, M)].min(t_BxT)
    lengths = jnp.zeros((B, M + 1), jnp.int32).at[rows, jnp.where(seg != 0, index_BxT, M)].add(1)
    used = jnp.arange(M + 1)[None, :] < count_B[:, None]
    return jnp.where(used, lengths, -1)[:, :M], jnp.where(used, starts, -1)


def cudnn(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT):
    """cuDNN flash attention (NVIDIA GPUs only; cuDNN 9 or later), causal within each segment.
    Positions outside every segment (padding) come out as zeros."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    B, T, K, G, D = q_BxTxKxGxD.shape
    lengths_BxM, starts_BxM1 = segment_offsets(segment_ids_BxT)
    out = fused.dot_product_attention(
        q_BxTxKxGxD.reshape(B, T, K * G, D), k_BxTxKxD, v_BxTxKxD, q_seqlen=lengths_BxM, kv_seqlen=lengths_BxM,
        q_offsets=starts_BxM1, kv_offsets=starts_BxM1, scale=D**-0.5, mask_type=fused.MaskType.CAUSAL,
        qkv_layout="BTNH")
    return out.reshape(B, T, K, G, D)
