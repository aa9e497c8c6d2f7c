"""A paged KV cache: every sequence's keys and values in fixed-size pages of one shared pool.

    pool      k, v: [layers, kv_heads, pages, page_size, head_dim]   (the Pallas paged-attention layout)
    table     [slots, pages_per_slot] int32: slot s's i-th page holds its positions [i * page, (i + 1) * page)

A slot's sequence (prompt, then answer) starts at position 0 of its first page. Pages are handed out
and taken back by the host (`dapo_jax.engine`); an entry of the table that names no page holds
`pages` (one past the last), so writes through it are dropped and reads through it give zeros.

Reading is a gather of each slot's pages followed by ordinary grouped-query attention: the portable
implementation, and the reference the TPU kernel is tested against.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class PagedKVCache:
    """The pool of every layer (k, v: [layers, K, pages, page, D]) or of one layer (no layer axis),
    with the slots' page table [slots, pages_per_slot]."""

    k: jax.Array
    v: jax.Array
    table: jax.Array | None  # None between calls: the host owns the table and passes it to each

    @classmethod
    def zeros(cls, config, pages: int, page_size: int, *, per_layer: bool = False, dtype=None):
        """An empty pool (stacked, or a list of one per layer), with no table."""
        dtype = dtype or config.compute_dtype
        shape = (config.num_key_value_heads, pages, page_size, config.kv_head_dim)
        if per_layer:
            return [cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), None) for _ in range(config.num_hidden_layers)]
        shape = (config.num_hidden_layers,) + shape
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), None)

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
