"""Qwen2.5 in Flax, numerically matching Hugging Face's `Qwen2ForCausalLM`.

    x = embed(tokens)
    repeat L times (one `nn.scan` over stacked layer weights):
        x = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
        x = x + down_proj(silu(gate_proj(rms(x))) * up_proj(rms(x)))
    logits = rms(x) @ W_vocab^T          (W_vocab = embed table when the head is tied)

Grouped-query attention: query head h reads kv head h // (heads / kv_heads). q, k and v have
biases, o has none. Every parameter and main activation carries logical axis names that
`dapo_jax.sharding` maps to mesh axes.

Two modes share one code path. Without a cache (and for a prefill: a cache the T tokens fill from
slot 0) the T input tokens attend causally to each other within their segment, through
`dapo_jax.attention` and the implementation the config names (blockwise, splash on TPU, ...): no
[T, T] mask or score matrix is built. With a `KVCache` the T tokens are written at slots
[cache_index, cache_index + T) of a preallocated cache and, for a decode step (T = 1), attend to
every earlier valid slot.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dapo_jax import attention, paged, sharding
from dapo_jax.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "linear")
REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture (from config.json) plus how to run it (dtypes, rematerialisation).

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as in Qwen2.5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151643
    initializer_range: float = 0.02
    use_sliding_window: bool = False
    hidden_act: str = "silu"
    checkpoint_dtype: str = "bfloat16"  # the dtype tensors are written in by save_hf_checkpoint
    # How to run it: compute dtype, parameter dtype, rematerialisation of each layer.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention: str = "auto"  # a name of dapo_jax.attention.IMPLEMENTATIONS
    # config.json keys we do not model (architectures, max_window_layers, ...), kept for saving.
    hf_extra_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self):
        self.validate()

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> Qwen2Config:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"Qwen2Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} does not divide hidden_size="
                f"{self.hidden_size}; choose a head count that divides it (or set head_dim explicitly)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} does not divide num_attention_heads="
                f"{self.num_attention_heads}; grouped-query attention needs heads to be a multiple of kv heads")
        if self.kv_head_dim % 2:
            raise ValueError(f"head_dim={self.kv_head_dim} must be even for rotary embeddings")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        if self.use_sliding_window:
            raise ValueError("sliding-window attention is not supported (no Qwen2.5 checkpoint uses it); "
                             "set use_sliding_window to false in config.json")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; Qwen2.5 uses 'silu'")
        for name in ("dtype", "param_dtype", "checkpoint_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {attention.IMPLEMENTATIONS}")

    # -- Hugging Face config.json ---------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime) -> Qwen2Config:
        """Read a config.json of either transformers generation.

        4.x writes `rope_theta`, `rope_scaling` and `torch_dtype`; 5.x writes `rope_parameters`
        and `dtype`. `runtime` sets the non-architecture fields (dtype, param_dtype, remat_policy).
        """
        hf = dict(hf)
        model_type = hf.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"config.json has model_type={model_type!r}; this port reads Qwen2/Qwen2.5 ('qwen2') only")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks {missing}; a Qwen2 config needs {list(required)}")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = hf.get("eos_token_id")
        known = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "initializer_range", "use_sliding_window", "hidden_act",
                 "torch_dtype", "dtype"}
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            use_sliding_window=bool(hf.get("use_sliding_window", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            checkpoint_dtype=hf.get("dtype") or hf.get("torch_dtype") or "bfloat16",
            hf_extra_json=json.dumps({k: v for k, v in hf.items() if k not in known}, sort_keys=True),
            **runtime,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents that both transformers 4.x and 5.x read correctly."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        out = {"architectures": ["Qwen2ForCausalLM"], **json.loads(self.hf_extra_json)}
        out.update(
            model_type="qwen2",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            initializer_range=self.initializer_range,
            use_sliding_window=False,
            hidden_act=self.hidden_act,
            # 5.x reads rope_parameters/dtype; 4.x reads rope_theta/rope_scaling/torch_dtype.
            rope_parameters=rope,
            rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_type == "default" else {"type": self.rope_type, "factor": self.rope_factor},
            dtype=self.checkpoint_dtype,
            torch_dtype=self.checkpoint_dtype,
        )
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        return out


# The published Qwen2.5 base checkpoints' config.json values. Instruct variants differ
# (rms_norm_eps 1e-6 for 14B/32B, max_position_embeddings 32768, eos 151645): load their
# config.json rather than a preset.
_PRESETS = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                 max_position_embeddings=32768),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                 max_position_embeddings=131072),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
               max_position_embeddings=32768),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-6,
               max_position_embeddings=131072),
    "14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-5,
                max_position_embeddings=131072),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-5,
                max_position_embeddings=131072),
}
# The embedded default: small enough to train on a laptop CPU in minutes.
_PRESETS["tiny"] = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rms_norm_eps=1e-6,
                        max_position_embeddings=2048, bos_token_id=None, eos_token_id=None)
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides) -> Qwen2Config:
    """Config of a public Qwen2.5 base model (0.5B, 1.5B, 3B, 7B, 14B, 32B) or of "tiny"."""
    key = name if name == "tiny" else name.upper().removeprefix("QWEN2.5-")
    if key not in _PRESETS:
        raise ValueError(f"unknown Qwen2.5 preset {name!r}; choose one of {PRESET_NAMES}")
    return Qwen2Config(**{"rope_theta": 1_000_000.0, **_PRESETS[key], **overrides})


# -- the network ----------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Preallocated keys and values of every layer.

        k: [layers, batch, kv_heads, head_dim, cache_length]
        v: [layers, batch, kv_heads, cache_length, head_dim]

    Both attention products then read the cache as a plain right-hand matrix, scores = q [G, D] @
    k [D, S] and out = weights [G, S] @ v [S, D], which XLA:CPU hands to YNNPACK. (Keys stored
    [.., S, D] and read as the left operand ran as fast there; what cost a decode step ~1.7x was
    the multiply-reduce this replaced, and a layer axis on the unrolled loop's per-layer caches.)
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, config: Qwen2Config, batch: int, length: int, dtype=None, layer_axis: bool = True) -> KVCache:
        """Empty keys [layers, B, K, D, S] and values [layers, B, K, S, D] (one layer's: no layer axis)."""
        v_shape = (config.num_hidden_layers,) * layer_axis + (batch, config.num_key_value_heads, length,
                                                              config.kv_head_dim)
        k_shape = v_shape[:-2] + (config.kv_head_dim, length)
        dtype = dtype or config.compute_dtype
        return cls(k=jnp.zeros(k_shape, dtype), v=jnp.zeros(v_shape, dtype))

    @property
    def length(self) -> int:
        return self.v.shape[-2]

    def constrain(self) -> KVCache:
        """Sharded by the logical axis rules (all layers, or one layer's cache without the layer axis)."""
        return KVCache(k=constrain(self.k, K_CACHE_AXES[-self.k.ndim:]),
                       v=constrain(self.v, V_CACHE_AXES[-self.v.ndim:]))

    def pad(self, slots: int) -> KVCache:
        """The cache with `slots` empty slots appended (one copy, outside any loop)."""
        def grow(x, axis):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, slots)
            return jnp.pad(x, widths)
        return KVCache(k=grow(self.k, self.k.ndim - 1), v=grow(self.v, self.v.ndim - 2))


K_CACHE_AXES = ("layers", "batch", "kv_heads", "head_dim", "cache_length")
V_CACHE_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")


def _param(module: nn.Module, name: str, init, shape, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.config.params_dtype)


def _normal(config: Qwen2Config):
    return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the mean taken in float32."""

    config: Qwen2Config

    @nn.compact
    def __call__(self, x_BxTxE):
        scale_E = _param(self, "scale", nn.initializers.ones, (x_BxTxE.shape[-1],), ("norm",))
        x32 = x_BxTxE.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        dtype = self.config.compute_dtype
        return scale_E.astype(dtype) * normed.astype(dtype)


def rotary_embedding(x_BxTxNxD, positions_BxT, theta: float, factor: float = 1.0):
    """Rotate each head vector by angle position * theta^(-2i/D), halves layout (Hugging Face's).

    x' = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]. Linear scaling divides
    positions by `factor`. Computed in float32 and returned in x's dtype.
    """
    half = x_BxTxNxD.shape[-1] // 2
    inv_freq_H = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / (2 * half))
    angle_BxTxH = (positions_BxT.astype(jnp.float32) / factor)[..., None] * inv_freq_H
    cos = jnp.cos(angle_BxTxH)[:, :, None, :]
    sin = jnp.sin(angle_BxTxH)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxD.dtype)


class Linear(nn.Module):
    """y = einsum(equation, x, W) + b, with W of `shape` and an optional bias over W's output axes.

    With `flat_input`, the equation sees W as [prod(shape[:-1]), shape[-1]] (a free reshape of the
    stored weight). Given two contracted axes, XLA may contract them in the other order and
    transpose the whole weight at every call; one flat axis leaves it no choice.
    """

    config: Qwen2Config
    equation: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    bias_axes: tuple[str, ...] = ()
    flat_input: bool = False

    @nn.compact
    def __call__(self, x):
        dtype = self.config.compute_dtype
        w = _param(self, "kernel", _normal(self.config), self.shape, self.axes)
        if self.flat_input:
            w = w.reshape(-1, self.shape[-1])
        y = jnp.einsum(self.equation, x, w.astype(dtype))
        if self.bias_axes:
            b = _param(self, "bias", nn.initializers.zeros, self.shape[-len(self.bias_axes):], self.bias_axes)
            y = y + b.astype(dtype)
        return y


def attend(q_BxTxKxGxD, k_BxKxDxS, v_BxKxSxD, mask_BxTxS):
    """softmax(q k / sqrt(D) + mask) v for grouped queries (G query heads per kv head).

    The weights are normalised after the product with v (by their sum, on D values per query
    rather than S), which saves a decode step a pass over the scores.
    """
    D, dtype = q_BxTxKxGxD.shape[-1], q_BxTxKxGxD.dtype
    decode = q_BxTxKxGxD.shape[1] == 1  # batched [G, D] products without the length-1 axis: the form measured
    if decode:
        scores_BxKxGxTxS = jnp.einsum("bkgd,bkds->bkgs", q_BxTxKxGxD[:, 0], k_BxKxDxS,
                                      preferred_element_type=jnp.float32)[:, :, :, None]
    else:
        scores_BxKxGxTxS = jnp.einsum("btkgd,bkds->bkgts", q_BxTxKxGxD, k_BxKxDxS, preferred_element_type=jnp.float32)
    # A finite floor, not -inf: a padding query that sees no key gets a uniform (unused) row, not NaN.
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS * D**-0.5, jnp.finfo(jnp.float32).min)
    weights_BxKxGxTxS = jnp.exp(scores_BxKxGxTxS - jnp.max(scores_BxKxGxTxS, axis=-1, keepdims=True))
    total_BxKxGxT = jnp.sum(weights_BxKxGxTxS, axis=-1)
    weights_BxKxGxTxS = weights_BxKxGxTxS.astype(dtype)
    if decode:
        out_BxKxGxD = jnp.einsum("bkgs,bksd->bkgd", weights_BxKxGxTxS[:, :, :, 0], v_BxKxSxD,
                                 preferred_element_type=jnp.float32)
        return (out_BxKxGxD / total_BxKxGxT).astype(dtype)[:, None]
    out_BxTxKxGxD = jnp.einsum("bkgts,bksd->btkgd", weights_BxKxGxTxS, v_BxKxSxD, preferred_element_type=jnp.float32)
    return (out_BxTxKxGxD / total_BxKxGxT.transpose(0, 3, 1, 2)[..., None]).astype(dtype)


class Attention(nn.Module):
    config: Qwen2Config

    @nn.compact
    def __call__(self, x_BxTxE, positions_BxT, mask_BxTxS, cache: KVCache | None = None, layer=None,
                 cache_index=None, segment_ids_BxT=None):
        """Attention output, and the cache with this layer's new keys/values written in place.

        With a cache, the T new keys and values go to slots [cache_index, cache_index + T) of layer
        `layer`; only those slots are written, so a decode step costs no copy of the cache. Given
        `segment_ids_BxT` (and no mask) the T tokens attend to each other alone, segment by segment.
        For one decode step (T = 1) cache_index may be [B], each row's own slot; with a
        `paged.PagedKVCache` it is each row's position in its pages.
        """
        c = self.config
        E, H, K, D, dtype = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.kv_head_dim, c.compute_dtype

        def project(name, n_heads, head_axis):
            y = Linear(c, "bte,end->btnd", (E, n_heads, D), ("embed", head_axis, "head_dim"),
                       bias_axes=(head_axis, "head_dim"), name=name)(x_BxTxE)
            return constrain(y, ("batch", "length", head_axis, "head_dim"))

        q_BxTxHxD = rotary_embedding(project("q_proj", H, "heads"), positions_BxT, c.rope_theta, c.rope_factor)
        k_BxTxKxD = rotary_embedding(project("k_proj", K, "kv_heads"), positions_BxT, c.rope_theta, c.rope_factor)
        k_BxKxDxT = k_BxTxKxD.transpose(0, 2, 3, 1)
        v_BxKxTxD = project("v_proj", K, "kv_heads").transpose(0, 2, 1, 3)

        B, T = x_BxTxE.shape[:2]
        q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
        if isinstance(cache, paged.PagedKVCache):
            # A decode step over a paged cache: slot b's token sits at position cache_index[b] and
            # sees its keys up to there, in the pages its table row lists.
            out_BxKxGxD, cache = cache.step(q_BxTxKxGxD[:, 0], k_BxTxKxD[:, 0], v_BxKxTxD[:, :, 0], cache_index, layer)
            out_BxTxKxGxD = out_BxKxGxD[:, None]
        else:
            if cache is not None:
                stacked = layer is not None  # [layers, B, ...] (scanned layers) or one layer's [B, ...]

                def write(buffer, new, slot_axis):
                    if jnp.ndim(cache_index) == 1:  # one decode step, row b at its own slot cache_index[b]
                        index = [jnp.arange(B), slice(None), slice(None), slice(None)]
                        index[slot_axis] = cache_index  # a slot past the cache writes nowhere
                        index = ([layer] if stacked else []) + index
                        value = jnp.take(new, 0, axis=slot_axis)  # [B, K, D]: the indexed axes go first
                        return buffer.at[tuple(index)].set(value.astype(buffer.dtype), mode="drop")
                    start = [0] * new.ndim
                    start[slot_axis] = cache_index
                    if stacked:
                        new, start = new[None], [layer] + start
                    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)

                cache = KVCache(k=write(cache.k, k_BxKxDxT, 3), v=write(cache.v, v_BxKxTxD, 2))
                k_BxKxDxS, v_BxKxSxD = cache.k, cache.v
                if stacked:
                    k_BxKxDxS = jax.lax.dynamic_index_in_dim(k_BxKxDxS, layer, keepdims=False)
                    v_BxKxSxD = jax.lax.dynamic_index_in_dim(v_BxKxSxD, layer, keepdims=False)
                # Attend over the slots the mask covers; it may be shorter than the cache (the sampler
                # leaves the not-yet-written end out). A prefill attends to its own T tokens alone.
                if mask_BxTxS is not None:
                    span = mask_BxTxS.shape[-1]
                    k_BxKxDxS, v_BxKxSxD = k_BxKxDxS[..., :span], v_BxKxSxD[:, :, :span]
            else:
                k_BxKxDxS, v_BxKxSxD = k_BxKxDxT, v_BxKxTxD
            if segment_ids_BxT is not None:
                out_BxTxKxGxD = attention.attention(q_BxTxKxGxD, k_BxTxKxD, v_BxKxTxD.transpose(0, 2, 1, 3),
                                                    segment_ids_BxT, implementation=c.attention)
            else:
                out_BxTxKxGxD = attend(q_BxTxKxGxD, k_BxKxDxS.astype(dtype), v_BxKxSxD.astype(dtype), mask_BxTxS)
        out_BxTxHxD = constrain(out_BxTxKxGxD.reshape(B, T, H, D), ("batch", "length", "heads", "head_dim"))
        y_BxTxE = Linear(c, "btf,fe->bte", (H, D, E), ("heads", "head_dim", "embed"), flat_input=True,
                         name="o_proj")(out_BxTxHxD.reshape(B, T, H * D))
        return constrain(y_BxTxE, ("batch", "length", "act_embed")), cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: Qwen2Config

    @nn.compact
    def __call__(self, x_BxTxE):
        c = self.config
        E, M = c.hidden_size, c.intermediate_size
        gate_BxTxM = Linear(c, "bte,em->btm", (E, M), ("embed", "mlp"), name="gate_proj")(x_BxTxE)
        up_BxTxM = Linear(c, "bte,em->btm", (E, M), ("embed", "mlp"), name="up_proj")(x_BxTxE)
        h_BxTxM = constrain(jax.nn.silu(gate_BxTxM) * up_BxTxM, ("batch", "length", "mlp"))
        y_BxTxE = Linear(c, "btm,me->bte", (M, E), ("mlp", "embed"), name="down_proj")(h_BxTxM)
        return constrain(y_BxTxE, ("batch", "length", "act_embed"))


class DecoderLayer(nn.Module):
    """One pre-norm block. Scanned: carry = (x, cache or None), per-layer input = layer index."""

    config: Qwen2Config

    @nn.compact
    def __call__(self, carry, layer, positions_BxT, mask_BxTxS, cache_index, segment_ids_BxT=None):
        x_BxTxE, cache = carry
        h_BxTxE = RMSNorm(self.config, name="input_layernorm")(x_BxTxE)
        attn_BxTxE, cache = Attention(self.config, name="self_attn")(
            h_BxTxE, positions_BxT, mask_BxTxS, cache, layer, cache_index, segment_ids_BxT)
        x_BxTxE = x_BxTxE + attn_BxTxE
        x_BxTxE = x_BxTxE + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(x_BxTxE))
        return (x_BxTxE, cache), None


def causal_mask(attention_mask_BxS, num_queries: int, cache_index=0):
    """[B, T, S] visibility: query t (at slot cache_index + t; cache_index may be [B], one per row)
    sees real key slots s <= its own."""
    S = attention_mask_BxS.shape[1]
    query_slot = jnp.asarray(cache_index)[..., None] + jnp.arange(num_queries)  # [T] or [B, T]
    causal = jnp.arange(S) <= query_slot[..., None]
    return (causal if causal.ndim == 3 else causal[None]) & attention_mask_BxS.astype(bool)[:, None, :]


class Qwen2ForCausalLM(nn.Module):
    config: Qwen2Config

    def setup(self):
        c = self.config
        self.embed_tokens = _param(self, "embed_tokens", _normal(c), (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        block = DecoderLayer
        if c.remat_policy != "none":
            block = nn.remat(DecoderLayer, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c)
        self.norm = RMSNorm(c)
        if not c.tie_word_embeddings:
            self.lm_head = _param(self, "lm_head", _normal(c), (c.vocab_size, c.hidden_size), ("vocab", "embed"))

    def embed(self, tokens_BxT):
        x_BxTxE = jnp.take(self.embed_tokens, tokens_BxT, axis=0).astype(self.config.compute_dtype)
        return constrain(x_BxTxE, ("batch", "length", "act_embed"))

    def head(self, x_BxTxE, return_hidden: bool = False):
        """Final norm, then float32 logits (or the normed hidden states)."""
        hidden_BxTxE = self.norm(x_BxTxE)
        if return_hidden:
            return hidden_BxTxE
        head_VxE = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return project_to_vocab(self.config, head_VxE, hidden_BxTxE)

    def decode_paged(self, tokens_Bx1, positions_B, cache: paged.PagedKVCache):
        """One decode step over a paged cache (stacked layers): row b feeds tokens_Bx1[b] at
        position positions_B[b]. Logits [B, 1, vocab] in float32 and the cache."""
        x_BxTxE = self.embed(tokens_Bx1)
        (x_BxTxE, cache), _ = self.layers((x_BxTxE, cache), jnp.arange(self.config.num_hidden_layers),
                                          positions_B[:, None], None, positions_B, None)
        return self.head(x_BxTxE), cache

    def __call__(self, tokens_BxT, positions_BxT, attention_mask_BxS, cache: KVCache | None = None,
                 cache_index=0, *, segment_ids_BxT=None, return_hidden: bool = False):
        """Logits [B, T, vocab] in float32 (or final hidden states), and the updated cache.

        attention_mask_BxS marks real tokens (1) and padding (0) over the key slots: the T inputs
        without a cache; with one, the first S slots of the cache (including the T being written),
        and attention reads only those S slots. segment_ids_BxT, for the T inputs alone (no cache,
        or a prefill from slot 0), separates sequences packed into one row (default: the mask, so
        padding and the sequence are two segments).
        """
        x_BxTxE = self.embed(tokens_BxT)
        T = tokens_BxT.shape[1]
        self_attention = cache is None or (isinstance(cache_index, int) and cache_index == 0
                                           and attention_mask_BxS.shape[1] == T)
        if self_attention:
            mask_BxTxS = None
            if segment_ids_BxT is None:
                segment_ids_BxT = attention_mask_BxS.astype(jnp.int32)
        else:
            if segment_ids_BxT is not None:
                raise ValueError("segment_ids apply to the inputs attending to each other (no cache, or a prefill "
                                 "from slot 0), not to a decode step")
            mask_BxTxS = causal_mask(attention_mask_BxS, T, cache_index)
        if cache is not None:
            cache = cache.constrain()
        (x_BxTxE, cache), _ = self.layers((x_BxTxE, cache), jnp.arange(self.config.num_hidden_layers),
                                          positions_BxT, mask_BxTxS, cache_index, segment_ids_BxT)
        return self.head(x_BxTxE, return_hidden), cache


def unstack_layers(params) -> list:
    """The stacked layer weights as one parameter tree per layer (copies them once)."""
    stacked = params["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)]


def apply_unrolled(config: Qwen2Config, params, layers: list, head_ExV, tokens_BxT, positions_BxT,
                   attention_mask_BxS, caches: list[KVCache], cache_index):
    """Qwen2ForCausalLM's cached call with the layer loop written out: logits and the new caches.

    `layers` holds one parameter tree per layer (`unstack_layers`) and `caches` one layer's KVCache
    (no layer axis) per layer, so a step reads every weight and cache buffer in place. XLA:CPU
    copies a layer's slice out of stacked weights and caches at every scanned step, which costs
    more than the step's arithmetic for small batches; accelerators fuse that slice into the
    matmul, so there the scanned `Qwen2ForCausalLM` is the one to use.

    `head_ExV` is the vocab head laid out [embed, vocab] (`vocab_head(...).T`, transposed once by
    the caller). XLA:CPU's matmul re-lays a transposed right operand out at every call: with the
    stored [vocab, embed] table the tiny model's logits product took twice as long per step.
    """
    mask_BxTxS = causal_mask(attention_mask_BxS, tokens_BxT.shape[1], cache_index)
    return _unrolled(config, params, layers, head_ExV, tokens_BxT, positions_BxT, mask_BxTxS, caches, cache_index)


def apply_unrolled_paged(config: Qwen2Config, params, layers: list, head_ExV, tokens_Bx1, positions_B,
                         caches: list[paged.PagedKVCache]):
    """One decode step with the layer loop written out (see `apply_unrolled`) over per-layer paged
    caches: row b feeds tokens_Bx1[b] at position positions_B[b]. Logits [B, 1, V] and the caches."""
    return _unrolled(config, params, layers, head_ExV, tokens_Bx1, positions_B[:, None], None, caches, positions_B)


def _unrolled(config, params, layers, head_ExV, tokens_BxT, positions_BxT, mask_BxTxS, caches, cache_index):
    model = Qwen2ForCausalLM(config)
    x_BxTxE = model.apply({"params": params}, tokens_BxT, method=Qwen2ForCausalLM.embed)
    new_caches = []
    for layer_params, cache in zip(layers, caches, strict=True):
        (x_BxTxE, cache), _ = DecoderLayer(config).apply({"params": layer_params}, (x_BxTxE, cache), None,
                                                         positions_BxT, mask_BxTxS, cache_index, None)
        new_caches.append(cache)
    hidden_BxTxE = model.apply({"params": params}, x_BxTxE, return_hidden=True, method=Qwen2ForCausalLM.head)
    return project_to_vocab(config, head_ExV, hidden_BxTxE, vocab_axis=1), new_caches


def project_to_vocab(config: Qwen2Config, head, hidden_BxTxE, vocab_axis: int = 0):
    """Float32 logits from final hidden states: hidden @ head^T for the stored [vocab, embed] head,
    or hidden @ head for one laid out [embed, vocab] (vocab_axis=1)."""
    equation = "bte,ve->btv" if vocab_axis == 0 else "bte,ev->btv"
    logits = jnp.einsum(equation, hidden_BxTxE, head.astype(config.compute_dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


def vocab_head(config: Qwen2Config, params):
    """The [vocab, embed] matrix the logits are computed with (the embedding table when tied)."""
    return params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]


# -- pure functions over a parameter tree ---------------------------------------------------------


def positions_from_mask(attention_mask_BxT):
    """Position ids that start at 0 on each row's first real token (left padding gets 0)."""
    mask = jnp.asarray(attention_mask_BxT, jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


@functools.lru_cache(maxsize=64)
def _abstract_boxed_params(config: Qwen2Config):
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(
        lambda t: Qwen2ForCausalLM(config).init(jax.random.key(0), t, t, t)["params"], tokens)


def param_logical_axes(config: Qwen2Config):
    """The logical axis names of every parameter, as a tree of tuples shaped like the params."""
    specs = nn.get_partition_spec(_abstract_boxed_params(config))
    return jax.tree_util.tree_map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def abstract_params(config: Qwen2Config):
    """ShapeDtypeStructs of the parameters, with no memory allocated."""
    return nn.unbox(_abstract_boxed_params(config))


def param_shardings(config: Qwen2Config, mesh, rules: sharding.LogicalRules = sharding.LOGICAL_AXIS_RULES):
    """NamedShardings of every parameter on `mesh`, from the logical-axis rules."""
    return sharding.param_shardings(param_logical_axes(config), abstract_params(config), mesh, rules)


def _init(config: Qwen2Config, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(Qwen2ForCausalLM(config).init(rng, tokens, tokens, tokens)["params"])


_init_jit = jax.jit(_init, static_argnums=0)


def init_params(config: Qwen2Config, rng: jax.Array, mesh=None):
    """Random parameters (Hugging Face's init: normal(0, initializer_range), zero biases, unit norms).

    With a mesh each parameter is created directly in its sharding; nothing is built whole on one
    device first.
    """
    if mesh is None:
        return _init_jit(config, rng)
    return jax.jit(_init, static_argnums=0, out_shardings=param_shardings(config, mesh))(config, rng)


def _forward(config: Qwen2Config, params, tokens_BxT, attention_mask_BxT, positions_BxT):
    logits, _ = Qwen2ForCausalLM(config).apply({"params": params}, tokens_BxT, positions_BxT, attention_mask_BxT)
    return logits


_forward_jit = jax.jit(_forward, static_argnums=0)


def forward(config: Qwen2Config, params, tokens, *, attention_mask=None, positions=None):
    """Logits [batch, length, vocab] in float32 for a (left-)padded batch of token ids.

    attention_mask marks real tokens with 1 (default: all real). Positions default to
    `positions_from_mask`, so a left-padded row gets the same logits as the unpadded sequence.
    When the params live on a mesh, the call runs sharded on that mesh.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    attention_mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} differs from tokens shape {tokens.shape}")
    positions = positions_from_mask(attention_mask) if positions is None else jnp.asarray(positions, jnp.int32)
    mesh = sharding.mesh_of(params)
    if mesh is None:
        return _forward_jit(config, params, tokens, attention_mask, positions)
    with jax.set_mesh(mesh):
        return _forward_jit(config, params, tokens, attention_mask, positions)
