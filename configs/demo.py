"""The foundation demo: build or load a Qwen2.5, round-trip it through a Hugging Face checkpoint,
check padding invariance and KV-cache decoding, time group sampling. Run:

    python -m dapo_jax.demo --config configs/demo.py [--config.model=random:0.5B] [--config.mesh.tensor=2]
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "random:tiny"  # or a Hugging Face checkpoint directory, or "random:<preset>[,field=value]"
    c.param_dtype = "float32"
    c.compute_dtype = "float32"
    c.seed = 0
    c.workdir = "workdir/demo"
    c.prompt_lengths = [5, 17, 11, 2]  # one left-padded batch of random prompts
    c.new_tokens = 32
    c.num_samples = 8  # answers per prompt, as DAPO's G
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c
