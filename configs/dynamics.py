"""The training-dynamics study (the paper's Figures 2 and 4 at a size this 2-core CPU runs): entropy
under symmetric clipping vs clip-higher, and answer length under the sequence-level vs the
token-level loss, 200 rollout steps from the embedded checkpoint.

    python -m dapo_jax.sweep --config configs/dynamics.py --workdir runs/dynamics

runs both comparisons as one sweep (the SWEEP and SEEDS below: 3 arms x 3 seeds, ~100 min here),
then writes the summary table and the plots; `python notebooks/dynamics/windows.py runs/dynamics`
prints the figures by window of steps. The arms share the full recipe and differ in one field each:

    dapo                  clip 0.2 / 0.28, token-mean loss (both comparisons' reference)
    symmetric_clip        clip 0.2 / 0.2
    seq_mean_token_mean   the sequence-level loss (GRPO's: each answer's tokens averaged first)

The task setting, on top of the embedded default (chosen after measuring the starting point):
- Chains of 1 to 5 operations, two beyond the 1-3 the embedded checkpoint was warmed up on, so the
  policy starts unsure: avg@8 5.1%, maj@8 12.0%, pass@8 29.0% on 200 held-out problems, entropy
  1.11 on its first step's answers, 74% of the groups its first step generated all-wrong or
  all-right, answers 30.8 tokens on average (a 5-operation worked answer is ~45).
- A 56-token response limit with an 8-token soft-punishment buffer; prompts up to 56 tokens.
- 4 optimizer updates per rollout step (mini-batches of 32 of the step's 128 answers), so the later
  updates are off-policy and the clip has ratios to act on.
Probes before choosing (40 and 25 steps, symmetric clip): 8 updates per step (mini-batches of 16)
learned less (12.2% avg@8 after 40 steps, against 15.8% after 30 with 4) and clipped no more at the
top (0.0-0.5% of tokens); a learning rate of 5e-4 learned less (6.5% after 25 steps); 32 prompts per
step clipped no more and cost 1.5x the time per step.
"""

from dapo_jax.config import ConfigError, default_config

ARMS = {
    "dapo": {},
    "symmetric_clip": {"algorithm.clip_high": 0.2},
    "seq_mean_token_mean": {"algorithm.agg_mode": "seq-mean-token-mean"},
}
SWEEP = "preset=" + ",".join(ARMS)
SEEDS = 3


def dynamics_task():
    c = default_config()
    c.data.synthetic.min_ops, c.data.synthetic.max_ops = 1, 5
    c.data.max_prompt_length = 56
    c.rollout.max_response_length = 56
    c.reward.overlong_buffer = 8
    c.optim.minibatch_size = 32
    c.steps = 200
    c.eval.every = 25
    c.checkpoint.every = 50
    c.checkpoint.keep = 1
    c.checkpoint.export_hf = False
    c.tensorboard = False
    return c


def get_config(arm="dapo"):
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r} of the dynamics study; choose one of {sorted(ARMS)}")
    c = dynamics_task()
    for key, value in ARMS[arm].items():
        section, field = key.split(".")
        c[section][field] = value
    return c
