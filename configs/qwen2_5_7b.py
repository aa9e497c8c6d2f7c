"""DAPO's algorithm on Qwen2.5-7B: the paper's recipe (configs/dapo_qwen2_5_32b.py) at a size one host
(one accelerator machine, or a small TPU slice) can try, with shorter answers and smaller batches.

    python -m dapo_jax.train --config configs/qwen2_5_7b.py --workdir runs/qwen2_5_7b \
        --config.model.path=/path/to/Qwen2.5-7B --config.data.train=... --config.data.eval=...
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("dapo_32b", Path(__file__).with_name("dapo_qwen2_5_32b.py"))
_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_recipe)


def get_config():
    c = _recipe.get_config()
    c.model.path = "checkpoints/Qwen2.5-7B"
    c.rollout.max_response_length = 16384
    c.reward.overlong_buffer = 4096
    c.rollout.prompts_per_step = 128
    c.rollout.gen_prompts_per_batch = 3 * 128
    c.optim.minibatch_size = 512
    c.optim.microbatch_size = 16
    c.mesh.update(data=1, fsdp=-1, tensor=4)
    return c
