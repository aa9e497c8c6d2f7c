"""Rewards: the rule-based math answer score (`math_dapo`) and overlong shaping (`overlong`)."""

from dapo_jax.rewards.math_dapo import TAIL_CHARS, compute_score, extract_answer, normalize_final_answer
from dapo_jax.rewards.overlong import overlong_filter_weights, overlong_penalty

__all__ = ["TAIL_CHARS", "compute_score", "extract_answer", "normalize_final_answer", "overlong_filter_weights",
           "overlong_penalty"]
