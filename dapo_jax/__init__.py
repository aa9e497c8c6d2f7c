"""dapo-jax: DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization) in JAX."""

from dapo_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from dapo_jax.models.qwen2 import KVCache, Qwen2Config, forward, init_params, preset
from dapo_jax.sampling import GenerateOutput, generate

__all__ = ["GenerateOutput", "KVCache", "Qwen2Config", "forward", "generate", "init_params", "load_hf_checkpoint",
           "preset", "save_hf_checkpoint"]
