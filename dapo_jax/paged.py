"""A paged KV cache: every sequence's keys and values in fixed-size pages of one shared pool.

    pool      k, v: [layers, kv_heads, pages, page_size, head_dim]   (the Pallas paged-attention layout)
    table     [slots, pages_per_slot] int32: slot s's i-th page holds its positions [i * page, (i + 1) * page)

A slot's sequence (prompt, then answer) starts at position 0 of its first page. Pages are handed out
and taken back by the host (`dapo_jax.engine`); an entry of the table that names no page holds
`pages` (one past the last), so writes through it are dropped and reads through it give zeros.

Reading has two implementations (`PagedKVCache.kernel`): the Pallas TPU paged-attention kernel
("pallas", what "auto" picks on TPU for per-layer pools), and a gather of each slot's pages followed
by ordinary grouped-query attention ("gather": portable, and the reference the kernel is tested
against through the Pallas TPU interpreter).

On a mesh a decode step runs per device (shard_map): slots are split over the batch axes (data x
fsdp) and so are the pool's pages, each data shard owning a contiguous share of them, so that a slot
only ever holds pages of its own shard and no step moves keys or values between devices (the host
hands pages out that way: `dapo_jax.engine`); kv heads are split over the tensor axis.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from dapo_jax import attention, sharding

KERNELS = ("auto", "gather", "pallas")


@flax.struct.dataclass
class PagedKVCache:
    """The pool of every layer (k, v: [layers, K, pages, page, D]) or of one layer (no layer axis),
    with the slots' page table [slots, pages_per_slot]."""

    k: jax.Array
    v: jax.Array
    table: jax.Array | None  # None between calls: the host owns the table and passes it to each
    kernel: str = flax.struct.field(pytree_node=False, default="auto")  # one of KERNELS

    @classmethod
    def zeros(cls, config, pages: int, page_size: int, *, per_layer: bool = False, dtype=None, kernel: str = "auto"):
        """An empty pool (stacked, or a list of one per layer), with no table; on the active mesh,
        laid out as `pool_spec` says."""
        if kernel not in KERNELS:
            raise ValueError(f"paged attention kernel {kernel!r} is not one of {KERNELS}")
        dtype = dtype or config.compute_dtype
        shape = (config.num_key_value_heads, pages, page_size, config.kv_head_dim)
        if not per_layer:
            shape = (config.num_hidden_layers,) + shape
        mesh = jax.sharding.get_abstract_mesh()
        out = None if mesh.empty else NamedSharding(mesh, pool_spec(shape, dict(mesh.shape)))
        empty = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=out)
        if per_layer:
            return [cls(empty(), empty(), None, kernel) for _ in range(config.num_hidden_layers)]
        return cls(empty(), empty(), None, kernel)

    @property
    def page_size(self) -> int:
        return self.k.shape[-2]

    @property
    def pages(self) -> int:
        return self.k.shape[-3]

    def write(self, k_BxKxD, v_BxKxD, positions_B, layer=None) -> PagedKVCache:
        """Each slot's new key and value at its position (slot b = row b of the table); a position
        past the table's pages is written nowhere."""
        index_B = positions_B // self.page_size
        inside_B = index_B < self.table.shape[1]
        page_B = jnp.take_along_axis(self.table, jnp.where(inside_B, index_B, 0)[:, None], axis=1)[:, 0]
        page_B = jnp.where(inside_B, page_B, self.pages)
        offset_B = positions_B % self.page_size
        if layer is None:  # k[:, page_B, offset_B] is [K, B, D]
            index, k_new, v_new = (slice(None), page_B, offset_B), k_BxKxD.swapaxes(0, 1), v_BxKxD.swapaxes(0, 1)
        else:  # k[layer, :, page_B, offset_B] is [B, K, D]: indexed axes apart go first
            index, k_new, v_new = (layer, slice(None), page_B, offset_B), k_BxKxD, v_BxKxD
        return self.replace(k=self.k.at[index].set(k_new.astype(self.k.dtype), mode="drop"),
                            v=self.v.at[index].set(v_new.astype(self.v.dtype), mode="drop"))

    def write_in_place(self, k_BxKxD, v_BxKxD, positions_B) -> PagedKVCache:
        """`write` for one layer's pool, one slot at a time (dynamic_update_slice): the pool keeps
        its layout. (For a scatter XLA:TPU lays the pool out its own way and copies it back for the
        kernel, twice per layer and step.)"""
        B, K, D = k_BxKxD.shape
        index_B = positions_B // self.page_size
        inside_B = index_B < self.table.shape[1]
        page_B = jnp.take_along_axis(self.table, jnp.where(inside_B, index_B, 0)[:, None], axis=1)[:, 0]
        valid_B = inside_B & (page_B < self.pages)
        page_B, offset_B = jnp.where(valid_B, page_B, 0), jnp.where(valid_B, positions_B % self.page_size, 0)

        def put(b, pool, new_BxKxD):
            for h in range(K):  # one [D] row each: contiguous in the kernel's row-major layout
                at = (h, page_B[b], offset_B[b], 0)
                old = jax.lax.dynamic_slice(pool, at, (1, 1, 1, D))
                new = jnp.where(valid_B[b], new_BxKxD[b, h].astype(pool.dtype).reshape(1, 1, 1, D), old)
                pool = jax.lax.dynamic_update_slice(pool, new, at)
            return pool

        k, v = jax.lax.fori_loop(0, B, lambda b, kv: (put(b, kv[0], k_BxKxD), put(b, kv[1], v_BxKxD)),
                                 (self.k, self.v))
        return self.replace(k=k, v=v)

    def read(self, layer=None):
        """Keys [B, K, S, D] and values [B, K, S, D] of the pages the table lists for every slot
        (S = its width x page_size); pages not handed out read as zeros."""
        pages_BxN = self.table
        B = pages_BxN.shape[0]

        def gather(pool):
            if layer is None:  # [K, B, N, page, D]
                x_BxKxNxPxD = pool.at[:, pages_BxN].get(mode="fill", fill_value=0).swapaxes(0, 1)
            else:  # [B, N, K, page, D]
                x_BxKxNxPxD = pool.at[layer, :, pages_BxN].get(mode="fill", fill_value=0).swapaxes(1, 2)
            _, K, N, P, D = x_BxKxNxPxD.shape
            return x_BxKxNxPxD.reshape(B, K, N * P, D)

        return gather(self.k), gather(self.v)

    def step(self, q_BxKxGxD, k_BxKxD, v_BxKxD, positions_B, layer=None):
        """One decode step of one layer: write each slot's new key and value at its position, then
        attend its query to its keys up to there. (out [B, K, G, D], the cache.)"""
        kernel, D = self.kernel, q_BxKxGxD.shape[-1]
        if kernel == "auto":  # the kernel takes one layer's pool and head_dim a multiple of 128 (its lanes)
            kernel = "pallas" if attention.target_platform() == "tpu" and layer is None and D % 128 == 0 else "gather"
        if kernel == "pallas" and (layer is not None or D % 128):
            raise ValueError(f"the Pallas paged-attention kernel reads one layer's pool (layer_loop='unrolled') "
                             f"with head_dim a multiple of 128 (this model's is {D}); use kernel 'gather'")
        pages, kernel_name = self.pages, self.kernel

        def local(q, k_new, v_new, positions, k_pool, v_pool, table, shard):
            # this device's pages are global ids [shard * n, (shard + 1) * n); others name no page here
            n = k_pool.shape[-3]
            mine = (table >= shard * n) & (table < (shard + 1) * n)
            cache = PagedKVCache(k_pool, v_pool, jnp.where(mine, table - shard * n, n), kernel_name)
            if kernel == "pallas":
                cache = cache.write_in_place(k_new, v_new, positions)
                out = pallas_attend(q, cache.k, cache.v, positions + 1, cache.table)
            else:
                cache = cache.write(k_new, v_new, positions, layer)
                out = attend(q, *cache.read(layer), positions + 1)
            return out, cache.k, cache.v

        mesh = jax.sharding.get_abstract_mesh()
        args = (q_BxKxGxD, k_BxKxD, v_BxKxD, positions_B, self.k, self.v, self.table)
        if mesh.empty or mesh.size == 1:
            out, k, v = local(*args, 0)
        else:
            shape = dict(mesh.shape)
            rows, heads = _axes(("batch",), (q_BxKxGxD.shape[0],), shape), _axes(("kv_heads",), (self.k.shape[-4],),
                                                                                 shape)
            if rows is not None and pages % math.prod(shape[a] for a in rows):
                raise ValueError(f"a pool of {pages} pages does not split over the {rows} mesh axes; give it a "
                                 f"multiple of {math.prod(shape[a] for a in rows)} pages")
            pool = pool_spec(self.k.shape, shape)
            row = PartitionSpec(rows)
            per_device = jax.shard_map(
                lambda *a: local(*a, 0 if rows is None else jax.lax.axis_index(rows)), mesh=mesh,
                in_specs=(PartitionSpec(rows, heads), PartitionSpec(rows, heads), PartitionSpec(rows, heads), row,
                          pool, pool, row),
                out_specs=(PartitionSpec(rows, heads), pool, pool), check_vma=False)
            out, k, v = per_device(*args)
        return out, self.replace(k=k, v=v)


def _axes(logical, shape, mesh_shape):
    """The mesh axes (a tuple, or None) that the one logical axis of `shape` goes to."""
    axis = sharding.logical_to_spec(logical, shape, mesh_shape)[0][0]
    return None if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


def pool_spec(shape, mesh_shape) -> PartitionSpec:
    """How a pool ([layers,] K, pages, page, D) lies on a mesh: pages over the batch axes (each data
    shard owns a contiguous share), kv heads over the tensor axis where it divides them."""
    heads = _axes(("kv_heads",), (shape[-4],), mesh_shape)
    rows = tuple(a for a in ("data", "fsdp") if mesh_shape.get(a, 1) > 1) or None
    return PartitionSpec(*([None] * (len(shape) - 4)), heads, rows, None, None)


def pallas_attend(q_BxKxGxD, k_KxNxPxD, v_KxNxPxD, lengths_B, table_BxW):
    """Each slot's query against its first lengths_B keys, through the Pallas TPU paged-attention
    kernel, over one layer's pool. The kernel reads keys and values in bfloat16 (the engine's pool
    dtype on TPU) and accumulates in float32; it does not scale the query, so it is scaled here.
    Table entries that name no page are pointed at page 0: the kernel only reads a slot's pages up to
    its length. (megacore_mode stays off: on a megacore chip it would split the rows over its two
    cores, and the kernel's own docs warn that it hangs where megacore is absent.)"""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    B, K, G, D = q_BxKxGxD.shape
    width = table_BxW.shape[1]
    block = math.gcd(width, 8)  # pages per compute block: must divide the table's width
    table_BxW = jnp.where(table_BxW < k_KxNxPxD.shape[1], table_BxW, 0)
    out = paged_attention((q_BxKxGxD * D**-0.5).astype(q_BxKxGxD.dtype).reshape(B, K * G, D), k_KxNxPxD, v_KxNxPxD,
                          lengths_B.astype(jnp.int32), table_BxW.astype(jnp.int32), pages_per_compute_block=block)
    return out.reshape(B, K, G, D)


def attend(q_BxKxGxD, k_BxKxSxD, v_BxKxSxD, lengths_B):
    """Each slot's query against its first lengths_B keys (float32 softmax), in q's dtype."""
    D, dtype = q_BxKxGxD.shape[-1], q_BxKxGxD.dtype
    scores_BxKxGxS = jnp.einsum("bkgd,bksd->bkgs", q_BxKxGxD, k_BxKxSxD.astype(dtype),
                                preferred_element_type=jnp.float32) * D**-0.5
    visible_BxS = jnp.arange(k_BxKxSxD.shape[2])[None, :] < lengths_B[:, None]
    scores_BxKxGxS = jnp.where(visible_BxS[:, None, None], scores_BxKxGxS, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores_BxKxGxS - jnp.max(scores_BxKxGxS, axis=-1, keepdims=True))
    out = jnp.einsum("bkgs,bksd->bkgd", weights.astype(dtype), v_BxKxSxD.astype(dtype),
                     preferred_element_type=jnp.float32)
    return (out / jnp.sum(weights, axis=-1)[..., None]).astype(dtype)


def write_prompts(cache, k_LxBxKxDxP, v_LxBxKxPxD, slot_pages_AxN, source_A):
    """Copy prefilled prompts into slots' pages: prompt source_A[a] (a row of the dense prefill
    cache, keys [L, B, K, D, P], values [L, B, K, P, D]) into the pages slot_pages_AxN[a] (entries
    naming no page are dropped). P must be a multiple of the page size; N = P / page size. `cache`
    is the stacked PagedKVCache or the list of per-layer ones."""
    L, _, K, D, P = k_LxBxKxDxP.shape
    ps = (cache[0] if isinstance(cache, list) else cache).page_size
    N = P // ps
    # [L, A, K, P, D] -> [L, K, A, N, ps, D], matching pool[:, :, pages_AxN] (the indexed axes in place)
    k = k_LxBxKxDxP[:, source_A].transpose(0, 1, 2, 4, 3)
    v = v_LxBxKxPxD[:, source_A]

    def pages(x):
        A = x.shape[1]
        return x.reshape(L, A, K, N, ps, D).transpose(0, 2, 1, 3, 4, 5)

    k, v = pages(k), pages(v)
    if isinstance(cache, list):  # pool[:, pages_AxN] is [K, A, N, page, D]
        return [c.replace(k=c.k.at[:, slot_pages_AxN].set(k[i].astype(c.k.dtype), mode="drop"),
                          v=c.v.at[:, slot_pages_AxN].set(v[i].astype(c.v.dtype), mode="drop"))
                for i, c in enumerate(cache)]
    return cache.replace(k=cache.k.at[:, :, slot_pages_AxN].set(k.astype(cache.k.dtype), mode="drop"),
                         v=cache.v.at[:, :, slot_pages_AxN].set(v.astype(cache.v.dtype), mode="drop"))
