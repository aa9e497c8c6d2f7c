"""What the entry points' command lines share: the config file flag, and one line (not a traceback)
for a config field that does not exist.

    if __name__ == "__main__":
        flags.DEFINE_string("workdir", "", "...")   # the entry point's own flags
        cli.run(main)                               # instead of app.run(main); defines --config

`--config path[:arg]` is an ml_collections config file (its get_config(), or get_config(arg)), by default
the embedded default (dapo_jax/config.py); `--config.<section>.<field>=value` overrides one field. A
misspelt field would otherwise surface as a double traceback from ml_collections' flag parsing.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import ml_collections

from dapo_jax import config as config_lib

DEFAULT_CONFIG = str(Path(config_lib.__file__))
_CONFIG_FLAG = re.compile(r"-{1,2}config(?:=(.*))?")  # --config=x, --config x (the name ml_collections matches)
_OVERRIDE_FLAG = re.compile(r"-{1,2}(?:no)?config\.([^=]+)(?:=.*)?")  # --config.a.b=v, --config.a.b v, --noconfig.a.b


def split_config_arg(spec: str) -> tuple[Path, str | None]:
    """`path[:arg]` (ml_collections' spelling) -> (path, arg); the file must exist."""
    path, colon, arg = spec.partition(":")
    if not Path(path).is_file():
        raise config_lib.ConfigError(f"--config {spec!r}: no config file at {path}; give a config file such as "
                                     f"configs/synthetic_tiny.py (optionally with :arg for its get_config)")
    return Path(path), (arg if colon else None)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config a `--config path[:arg]` names."""
    path, arg = split_config_arg(spec)
    module = config_lib.load_config_file(path)
    return module.get_config(arg) if arg is not None else module.get_config()


def _fields(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """The dotted names of every field under `node`."""
    out = []
    for name, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _fields(value, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def unknown_field(cfg: ml_collections.ConfigDict, key: str) -> str | None:
    """Why the dotted `key` (e.g. rollout.max_response_length) names no field or section of `cfg`, with
    the names that are there and the closest one; None when it names one."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if not isinstance(node, ml_collections.ConfigDict):
            return f"unknown config field {key}: {where} is a field (a {type(node).__name__}), not a section"
        if part in node:
            node = node[part]
            continue
        names = sorted(node.keys())
        near = difflib.get_close_matches(part, names, n=1)
        guess = ".".join([*parts[:i], near[0], *parts[i + 1:]]) if near else ""
        if not guess or unknown_field(cfg, guess):  # the name in another section (temperature: rollout.temperature)?
            fields = _fields(cfg)
            near = difflib.get_close_matches(parts[-1], {f.rsplit(".", 1)[-1] for f in fields}, n=1, cutoff=0.8)
            guess = " or ".join(f for f in fields if near and f.rsplit(".", 1)[-1] == near[0])
        sections = [n for n in names if isinstance(node[n], ml_collections.ConfigDict)]
        listing = ", ".join(n for n in names if n not in sections) + (f"; sections: {', '.join(sections)}"
                                                                      if sections else "")
        return (f"unknown config field {key}" + (f" (did you mean {guess}?)" if guess else "")
                + f"; {where or 'the config'} has: {listing}")
    return None


def command_line_problem(argv: Sequence[str]) -> str | None:
    """What is wrong with the config file or the `--config.<field>` overrides in `argv`, in one line;
    None when nothing (the values themselves are left to the flag parser, which words them well)."""
    from absl import flags

    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)  # --flagfile, as ml_collections does
    spec, keys = DEFAULT_CONFIG, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        if m := _CONFIG_FLAG.fullmatch(arg):
            spec = m.group(1) if m.group(1) is not None else argv[i + 1] if i + 1 < len(argv) else spec
        elif m := _OVERRIDE_FLAG.fullmatch(arg):
            keys.append(m.group(1))
    try:
        cfg = load_config(spec)
    except config_lib.ConfigError as e:  # no such file, or a get_config argument it refuses
        return str(e)
    return next((p for p in (unknown_field(cfg, k) for k in keys) if p), None)


def run(main: Callable[[list[str]], object]) -> NoReturn:
    """`app.run(main)` with the `--config` flag defined, after checking the config file and every
    `--config.<field>` override: a mistake is one line on stderr and exit code 2."""
    from absl import app
    from ml_collections import config_flags

    problem = command_line_problem(sys.argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "a config file, optionally with :arg for its "
                                    "get_config(arg) (default: the embedded default)", lock_config=True)
    app.run(main)
