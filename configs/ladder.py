"""The paper's ablation ladder (Table 1) at a size this 2-core CPU runs in about an hour: 6 presets x
3 seeds of the embedded model on a synthetic task where every DAPO technique has something to act on.

    python -m dapo_jax.sweep --config configs/ladder.py --workdir runs/ladder

runs the whole ladder (the SWEEP and SEEDS below), then writes the summary table and the plots; a
single rung is `python -m dapo_jax.train --config configs/ladder.py:clip_higher --workdir ...`.

The task setting, on top of the embedded default:
- Chains of 1 to 4 operations. The worked answer grows by ~7 tokens per operation (a 1-operation
  answer is ~17 tokens, a 4-operation one ~38), so answer lengths vary by a factor of two.
- A 40-token response limit with an 8-token soft-punishment buffer: correct 4-operation answers
  (~38 tokens) fall inside the buffer, and answers that wander (a tenth of the embedded model's
  samples run past 42 tokens) are truncated, so overlong filtering and soft punishment change what
  is trained on.
- A difficulty mix: before training 60-90% of the 2- to 4-operation groups come back all-wrong (the
  embedded model, 8 samples at T=1), and short chains become all-correct as the policy sharpens, so
  dynamic sampling has groups to filter from the first step to the last.
"""

from dapo_jax.config import ABLATION_LADDER, ablation, default_config

SWEEP = "preset=" + ",".join(ABLATION_LADDER)
SEEDS = 3


def ladder_task():
    c = default_config()
    c.data.synthetic.min_ops, c.data.synthetic.max_ops = 1, 4
    c.data.max_prompt_length = 48  # a 4-operation chain renders to 42 prompt tokens
    c.rollout.max_response_length = 40
    c.reward.overlong_buffer = 8
    c.steps = 60
    c.eval.every = 10
    c.checkpoint.every = 20
    c.checkpoint.keep = 1
    c.checkpoint.export_hf = False
    c.tensorboard = False
    return c


def get_config(preset="dapo"):
    return ablation(ladder_task(), preset)
