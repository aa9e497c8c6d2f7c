"""DAPO's algorithm on Qwen2.5-7B: the paper's recipe (configs/dapo_qwen2_5_32b.py) at a size one host
(one accelerator machine, or a small TPU slice) can try, with shorter answers and smaller batches.

    python -m dapo_jax.train --config configs/qwen2_5_7b.py --workdir runs/qwen2_5_7b \\
        --config.model.path=/path/to/Qwen2.5-7B --config.data.train=... --config.data.eval=...
"""

from pathlib import Path

from dapo_jax.config import load_config_file


def get_config():
    recipe = load_config_file(Path(__file__).with_name("dapo_qwen2_5_32b.py"))
    # One v5p-8 host (4 chips, tensor 4): `python -m dapo_jax.plan --config configs/qwen2_5_7b.py --topology
    # v5p-8` plans micro-batches of 4 answers and the rollout engine's 240 slots (15 prompts x 16) over a
    # pool of 40,960 pages of 64 tokens (10,922 tokens per slot on average, 59% of a 2,048 + 16,384
    # answer; 35 GiB per device): 81% of HBM at the train step's peak. With a contiguous cache per slot
    # instead (pages=0), only 7 prompts per sampler call fit.
    return recipe.at_size("7B", max_response_length=16384, overlong_buffer=4096, prompts_per_step=128,
                          minibatch_size=512, microbatch_size=4, tensor=4, generation_chunk=15,
                          eval_prompts_per_batch=7, pages=40960)
