"""dapo-jax: DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization) in JAX."""

import os

import jax
from jax._src import hardware_utils


def _only_cpu_without_accelerators() -> None:
    """Where no TPU or GPU is attached, let jax bring up its CPU backend alone.

    Left to choose, jax initialises every backend it has, and with libtpu installed (the dev extra) a
    machine without TPU chips then hears five lines of libtpu errors (`INVALID_ARGUMENT: unexpected
    worker hostname ...`) before anything else. The hardware checks are jax's own (TPU PCI ids, NVIDIA
    and AMD device nodes), read without starting a runtime. A platform the user chose (JAX_PLATFORMS,
    or `jax_platforms` set before this import) is kept; compiling for a TPU topology (plan.py) loads
    libtpu by itself.
    """
    if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms is not None:
        return
    if (hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu()
            or hardware_utils.num_available_amd_gpus(stop_at=1)):  # -1 (could not tell) counts as a GPU
        return
    jax.config.update("jax_platforms", "cpu")


# Before any submodule is imported, so that nothing can have started a backend yet.
_only_cpu_without_accelerators()

from dapo_jax import rewards  # noqa: E402
from dapo_jax.algorithm import group_advantages, policy_loss  # noqa: E402
from dapo_jax.hf import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from dapo_jax.models.qwen2 import KVCache, Qwen2Config, forward, init_params, preset  # noqa: E402
from dapo_jax.rewards.overlong import overlong_penalty  # noqa: E402
from dapo_jax.sampling import GenerateOutput, generate  # noqa: E402

__all__ = ["GenerateOutput", "KVCache", "Qwen2Config", "forward", "generate", "group_advantages", "init_params",
           "load_hf_checkpoint", "overlong_penalty", "policy_loss", "preset", "rewards", "save_hf_checkpoint"]
