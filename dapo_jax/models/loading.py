"""One way to name a model everywhere (configs, command lines, benchmarks).

    "path/to/hf_checkpoint"                 a Hugging Face directory
    "random:0.5B" ... "random:32B"           a published shape, random weights
    "random:tiny"                            the embedded default
    "random:tiny,layers=2,vocab=1024"        a preset with fields changed
"""

from __future__ import annotations

from pathlib import Path

import jax

from dapo_jax import hf
from dapo_jax.models import qwen2

_MODEL_PATH_HINT = ("point it at a Hugging Face directory (config.json, *.safetensors, tokenizer.json), 'embedded' "
                    "or 'random:<preset>'")

# Short names accepted after "random:<preset>," for the config fields people change most.
_SHORT = {"vocab": "vocab_size", "hidden": "hidden_size", "mlp": "intermediate_size", "layers": "num_hidden_layers",
          "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "tied": "tie_word_embeddings"}


def random_config(spec: str, **runtime) -> qwen2.Qwen2Config:
    """The config named by "<preset>[,field=value...]" (the part after "random:")."""
    name, *changes = [part.strip() for part in spec.split(",")]
    fields = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep:
            raise ValueError(f"model spec {spec!r}: {change!r} is not field=value (e.g. layers=2)")
        key = _SHORT.get(key, key)
        if key == "tie_word_embeddings":
            fields[key] = value.lower() in ("1", "true", "yes")
        elif key in ("rms_norm_eps", "rope_theta"):
            fields[key] = float(value)
        else:
            try:
                fields[key] = int(value)
            except ValueError:
                raise ValueError(f"model spec {spec!r}: {key} must be an integer, got {value!r}") from None
    try:
        return qwen2.preset(name, **fields, **runtime)
    except TypeError as e:
        raise ValueError(f"model spec {spec!r}: {e}; short names are {sorted(_SHORT)}") from None


def check_model_path(path: str) -> None:
    """Raise FileNotFoundError (NotADirectoryError for a file), saying what model.path takes, unless `path`
    is "embedded", "random:<spec>" or an existing directory (whose files the checkpoint reader checks)."""
    if path == "embedded" or path.startswith("random:"):
        return
    if not Path(path).exists():
        raise FileNotFoundError(f"model.path {path} does not exist: {_MODEL_PATH_HINT}")
    if not Path(path).is_dir():
        raise NotADirectoryError(f"model.path {path} is a file, not a directory: {_MODEL_PATH_HINT}")


def load_model(source: str, *, dtype: str = "float32", compute_dtype: str | None = None, remat_policy: str = "none",
               attention: str = "auto", mesh=None, seed: int = 0):
    """(config, params) for a checkpoint directory or a "random:<spec>" model."""
    check_model_path(source)
    if source.startswith("random:"):
        config = random_config(source.removeprefix("random:"), param_dtype=dtype, dtype=compute_dtype or dtype,
                               remat_policy=remat_policy, attention=attention)
        return config, qwen2.init_params(config, jax.random.key(seed), mesh=mesh)
    return hf.load_hf_checkpoint(source, dtype=dtype, compute_dtype=compute_dtype, remat_policy=remat_policy,
                                 attention=attention, mesh=mesh)
