"""DAPO's algorithm on Qwen2.5-0.5B: the paper's recipe (configs/dapo_qwen2_5_32b.py) at a size one host
(one accelerator machine, or a small TPU slice) can try, with shorter answers and smaller batches.

    python -m dapo_jax.train --config configs/qwen2_5_0_5b.py --workdir runs/qwen2_5_0_5b \\
        --config.model.path=/path/to/Qwen2.5-0.5B --config.data.train=... --config.data.eval=...
"""

from pathlib import Path

from dapo_jax.config import load_config_file


def get_config():
    recipe = load_config_file(Path(__file__).with_name("dapo_qwen2_5_32b.py"))
    # Micro-batch, sampler chunk and evaluation batch: what `python -m dapo_jax.plan --config
    # configs/qwen2_5_0_5b.py --topology v5e-8 --fit` found to fit one 8-chip v5e host (63% of HBM).
    return recipe.at_size("0.5B", max_response_length=4096, overlong_buffer=1024, prompts_per_step=64,
                          minibatch_size=256, microbatch_size=8, tensor=1, generation_chunk=16,
                          eval_prompts_per_batch=8)
