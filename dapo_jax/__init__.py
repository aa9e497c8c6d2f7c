"""dapo-jax: DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization) in JAX."""

from dapo_jax import rewards
from dapo_jax.algorithm import group_advantages, policy_loss
from dapo_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from dapo_jax.models.qwen2 import KVCache, Qwen2Config, forward, init_params, preset
from dapo_jax.rewards.overlong import overlong_penalty
from dapo_jax.sampling import GenerateOutput, generate

__all__ = ["GenerateOutput", "KVCache", "Qwen2Config", "forward", "generate", "group_advantages", "init_params",
           "load_hf_checkpoint", "overlong_penalty", "policy_loss", "preset", "rewards", "save_hf_checkpoint"]
