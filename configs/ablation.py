"""The ablation ladder of the paper's Table 1 as named presets, on top of a base config.

    python -m dapo_jax.train --config configs/ablation.py:grpo --workdir runs/ladder/grpo
    python -m dapo_jax.train --config configs/ablation.py:clip_higher,32b --workdir ...

Rungs, each adding one technique to the previous one: grpo, overlong_filtering, clip_higher,
soft_overlong, token_level_loss, dapo (= the full recipe). The base is the embedded default ("tiny",
runs on a CPU) unless ",32b", ",0_5b", ",1_5b" or ",7b" follows the rung.
"""

from pathlib import Path

from dapo_jax.config import ablation, default_config, load_config_file

_BASES = {"32b": "dapo_qwen2_5_32b.py", "0_5b": "qwen2_5_0_5b.py", "1_5b": "qwen2_5_1_5b.py", "7b": "qwen2_5_7b.py"}


def _base(name):
    if name == "tiny":
        return default_config()
    if name not in _BASES:
        raise ValueError(f"unknown base {name!r} for the ablation ladder; use tiny or one of {sorted(_BASES)}")
    return load_config_file(Path(__file__).with_name(_BASES[name])).get_config()


def get_config(arg="dapo"):
    rung, _, base = arg.partition(",")
    return ablation(_base(base or "tiny"), rung)
