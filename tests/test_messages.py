"""A newcomer's mistakes on the command line and in model.path: each is one clear line saying what to
change (the data files' messages are in test_datasets.py, the sweep's and the planner's in theirs)."""

import subprocess
import sys

import pytest

from dapo_jax import cli, config as config_lib
from dapo_jax.models import loading

ENTRY_POINT = "from dapo_jax import cli; from absl import flags; cli.run(lambda argv: print(flags.FLAGS.config.{}))"


def run_entry_point(*args: str, show: str = "rollout.temperature") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY_POINT.format(show), *args], capture_output=True, text=True,
                          timeout=120)


def test_an_unknown_config_field_on_the_command_line_is_one_line_and_exit_code_2():
    done = run_entry_point("--config.rollout.not_a_field=3")
    assert done.returncode == 2 and done.stdout == ""
    fields = ", ".join(sorted(config_lib.default_config().rollout.keys()))
    assert done.stderr.splitlines() == [f"error: unknown config field rollout.not_a_field; rollout has: {fields}"]


def test_known_config_fields_reach_main_from_the_named_config_file():
    done = run_entry_point("--config", "configs/synthetic_tiny.py", "--config.rollout.temperature=0.5")
    assert (done.returncode, done.stdout) == (0, "0.5\n"), done.stderr


@pytest.mark.parametrize("key, guess", [
    ("rollout.max_respons_length", "rollout.max_response_length"),  # a typo
    ("rolout.temperature", "rollout.temperature"),  # a typo in the section
    ("rollout.learning_rate", "optim.learning_rate"),  # the right name in another section
    ("temperature", "eval.temperature or rollout.temperature"),  # the section left out
])
def test_an_unknown_config_field_suggests_the_closest_name(key, guess):
    message = cli.unknown_field(config_lib.default_config(), key)
    assert message.startswith(f"unknown config field {key} (did you mean {guess}?); ")


def test_a_missing_config_file_is_named():
    assert cli.command_line_problem(["train", "--config=configs/nope.py", "--config.steps=3"]) == (
        "--config 'configs/nope.py': no config file at configs/nope.py; give a config file such as "
        "configs/synthetic_tiny.py (optionally with :arg for its get_config)")


def test_a_missing_model_path_says_what_model_path_takes(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        loading.load_model(str(tmp_path / "qwen"))
    assert str(e.value) == (f"model.path {tmp_path / 'qwen'} does not exist: point it at a Hugging Face directory "
                            f"(config.json, *.safetensors, tokenizer.json), 'embedded' or 'random:<preset>'")
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(NotADirectoryError, match="model.safetensors is a file, not a directory: point it at"):
        loading.check_model_path(str(tmp_path / "model.safetensors"))
    loading.check_model_path("random:tiny")
    loading.check_model_path("embedded")
