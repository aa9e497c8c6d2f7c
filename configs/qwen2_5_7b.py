"""DAPO's algorithm on Qwen2.5-7B: the paper's recipe (configs/dapo_qwen2_5_32b.py) at a size one host
(one accelerator machine, or a small TPU slice) can try, with shorter answers and smaller batches.

    python -m dapo_jax.train --config configs/qwen2_5_7b.py --workdir runs/qwen2_5_7b \\
        --config.model.path=/path/to/Qwen2.5-7B --config.data.train=... --config.data.eval=...
"""

from pathlib import Path

from dapo_jax.config import load_config_file


def get_config():
    recipe = load_config_file(Path(__file__).with_name("dapo_qwen2_5_32b.py"))
    # One v5p-8 host (4 chips, tensor 4): `python -m dapo_jax.plan --config configs/qwen2_5_7b.py --topology v5p-8
    # --fit` found micro-batches of 4 answers, 15 prompts per sampler call and 7 per evaluation call.
    return recipe.at_size("7B", max_response_length=16384, overlong_buffer=4096, prompts_per_step=128,
                          minibatch_size=512, microbatch_size=4, tensor=4, generation_chunk=15,
                          eval_prompts_per_batch=7)
