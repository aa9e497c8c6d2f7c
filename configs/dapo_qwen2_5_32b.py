"""The paper's recipe: Qwen2.5-32B base on DAPO-Math-17k, evaluated on AIME 2024 avg@32.

    python -m dapo_jax.train --config configs/dapo_qwen2_5_32b.py --workdir gs://bucket/dapo-32b \
        --config.model.path=/path/to/Qwen2.5-32B --config.data.train=/path/to/dapo-math-17k.parquet \
        --config.data.eval=/path/to/aime-2024.parquet

Every value below is the paper's (arXiv 2503.14476) or, where the paper is silent, verl's public DAPO
script; shared/DAPO_REFERENCE.md section 2 lists them.
"""

from dapo_jax.config import default_config


def get_config():
    c = default_config()
    c.steps = 500  # the paper does not fix one number: set it to your budget
    c.model.path = "checkpoints/Qwen2.5-32B"  # a Hugging Face directory (config.json, safetensors, tokenizer)
    c.model.param_dtype = "float32"  # master weights; matmuls in bfloat16
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "full"

    c.data.train = "data/dapo-math-17k.parquet"
    c.data.eval = "data/aime-2024.parquet"  # 30 problems (each repeated 32x in the file: deduplicated)
    c.data.max_prompt_length = 2048
    c.data.system_prompt = "qwen"  # the base model's chat template adds Qwen's default system turn
    c.data.eval_problems = 0  # all

    c.rollout.prompts_per_step = 512
    c.rollout.samples_per_prompt = 16
    c.rollout.gen_prompts_per_batch = 1536  # 3x, as the public script
    c.rollout.max_gen_batches = 10
    # The public script drops the surplus of informative groups; we carry it into the next step only
    # (groups older than 1 step are dropped, counted in dynamic_sampling/stale_dropped). At this 3x
    # ratio, once more than a third of the groups are informative the carry can fill a whole step:
    # that step generates nothing and trains on the previous policy's answers (stale_frac = 1, with
    # their own old log-probs, so the ratio stays exact). max_carry_age=0 is the public script's choice.
    c.rollout.max_carry_age = 1
    c.rollout.max_response_length = 20480  # 16384 expected + 4096 overlong buffer
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.prompt_bucket = 256
    # Answers end where vLLM (and so verl) ends them: at the checkpoint's generation_config.json eos,
    # which for Qwen2.5-32B base is <|endoftext|> (151643) alone. An <|im_end|> the base model writes
    # is part of the answer and counts toward its length and overlong penalty.
    c.rollout.stop_ids = ""
    # The rollout engine decodes the answers of 16 prompts at once (256 slots, 128 per data shard) over a
    # pool of 40,960 pages of 64 tokens: 2.6M tokens, 10,240 per slot on average (45% of a 2,048 + 20,480
    # answer; when the pool runs short the latest admitted answers wait and are recomputed). 40 GiB per
    # device on a v5p-32 (fsdp 2 x tensor 8); a contiguous cache per slot would need 44 GiB for 128 slots.
    # `python -m dapo_jax.plan --config configs/dapo_qwen2_5_32b.py --topology v5p-32` checks it.
    c.rollout.generation_chunk = 16
    c.rollout.pages = 40960
    c.rollout.page_size = 64

    c.reward.overlong_buffer = 4096
    c.reward.overlong_penalty_factor = 1.0
    c.reward.overlong_filter = False

    c.algorithm.clip_low = 0.2
    c.algorithm.clip_high = 0.28
    c.algorithm.clip_c = 10.0  # dual clip, from the public script
    c.algorithm.agg_mode = "token-mean"
    c.algorithm.norm_by_std = True

    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 20  # rollout steps (the public script uses 10)
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.minibatch_size = 512  # 32 prompts x 16 answers: 16 updates per rollout step
    c.optim.microbatch_size = 2  # per forward/backward: one 22.5k-token answer per data-parallel device
    # (on a larger slice, raise it with the data-parallel devices: 4 on a v5p-64, 8 on a v5p-128)

    c.eval.every = 10
    c.eval.samples_per_prompt = 32
    c.eval.temperature = 1.0
    c.eval.top_p = 0.7
    c.eval.prompts_per_batch = 4  # 4 x 32 answers per sampler call (the KV cache, as above)

    c.checkpoint.every = 10
    c.checkpoint.keep = 3
    c.mesh.update(data=1, fsdp=-1, tensor=8)  # v5p-32: fsdp 2 x tensor 8 (the planner's smallest fit)
    return c


def at_size(name: str, *, max_response_length: int, overlong_buffer: int, prompts_per_step: int,
            minibatch_size: int, microbatch_size: int, tensor: int, generation_chunk: int = 0,
            eval_prompts_per_batch: int = 30, pages: int = 0):
    """The same recipe for a smaller Qwen2.5: shorter answers, smaller batches, the same algorithm."""
    c = get_config()
    c.model.path = f"checkpoints/Qwen2.5-{name}"
    c.rollout.max_response_length = max_response_length
    c.reward.overlong_buffer = overlong_buffer
    c.rollout.prompts_per_step = prompts_per_step
    c.rollout.gen_prompts_per_batch = 3 * prompts_per_step
    c.optim.minibatch_size = minibatch_size
    c.optim.microbatch_size = microbatch_size
    c.rollout.generation_chunk = generation_chunk
    c.rollout.pages = pages  # 0: a contiguous cache per slot (plan a pool with `python -m dapo_jax.plan`)
    c.eval.prompts_per_batch = eval_prompts_per_batch
    c.mesh.update(data=1, fsdp=-1, tensor=tensor)
    return c
