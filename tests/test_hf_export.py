"""A run's hf_final/ in transformers: the embedded model exported as train.py exports it reads our
ids, renders our prompts and computes our logits."""

import numpy as np
import pytest
from conftest import torch_logits

from dapo_jax import config as config_lib, hf, train
from dapo_jax.data import datasets, synthetic
from dapo_jax.models import qwen2
from dapo_jax.models.loading import load_model
from dapo_jax.tokenizer import (END_OF_TEXT, IM_END, IM_START, QWEN_DEFAULT_SYSTEM, chat_template, load_tokenizer,
                                render_chat)

PARITY_ATOL = 1e-4  # as tests/test_model_parity.py
PLAIN_TEXTS = ["12 + 3", "  two  spaces\n\nand newlines \n", f"{IM_START}user\n1 + 2?{IM_END}\n{IM_START}assistant\n",
               f"7 * 6 = 42\nAnswer: 42{IM_END}{END_OF_TEXT}",  # within the alphabet: these round-trip
               "<unk> is text, not a token", "\tthe tab, é, → are dropped",
               "e\u0301 composes to one character (NFC), which is dropped"]


@pytest.fixture(scope="module")
def cfg():
    return config_lib.default_config()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cfg):
    """(hf_final directory, model config, params): the embedded model saved as train.py saves a run's policy."""
    model_config, params = load_model(str(config_lib.EMBEDDED_MODEL), dtype=cfg.model.param_dtype,
                                      compute_dtype=cfg.model.compute_dtype, seed=cfg.seed)
    path = hf.save_hf_checkpoint(tmp_path_factory.mktemp("run") / "hf_final", model_config, params, overwrite=True,
                                 copy_files_from=config_lib.EMBEDDED_MODEL)
    return path, model_config, params


@pytest.fixture(scope="module")
def prompts(cfg):
    """(messages, prompt ids) of 500 training prompts of the embedded default, tokenised as a run does."""
    rows = synthetic.rows(train.synthetic_task(cfg), "train", 500, seed=cfg.seed)
    records, _ = datasets.encode_rows(rows, load_tokenizer(config_lib.EMBEDDED_MODEL),
                                      max_prompt_length=cfg.data.max_prompt_length, truncation="error",
                                      system_prompt=train.system_prompt(cfg))
    return [row["prompt"] for row in rows], [list(r.prompt_ids) for r in records]


def auto_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("which", ["hf_final", "embedded"])
def test_transformers_reads_our_ids(which, exported, prompts, cfg):
    path = exported[0] if which == "hf_final" else config_lib.EMBEDDED_MODEL
    theirs, ours = auto_tokenizer(path), load_tokenizer(path)
    for text in PLAIN_TEXTS:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    for messages, ids in zip(*prompts):
        text = render_chat(messages, default_system=train.system_prompt(cfg))
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text


def test_transformers_decodes_our_ids(exported, prompts):
    theirs, ours = auto_tokenizer(exported[0]), load_tokenizer(exported[0])
    for text in PLAIN_TEXTS[:4]:  # the ones within the tokenizer's alphabet
        assert theirs.decode(ours.encode(text), skip_special_tokens=False) == text
    for ids in prompts[1]:
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
        assert theirs.decode(ids, skip_special_tokens=False) == ours.decode(ids, skip_special_tokens=False)


def test_chat_template_renders_our_prompts(exported, prompts, cfg):
    theirs = auto_tokenizer(exported[0])
    for messages, ids in zip(*prompts):
        text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == render_chat(messages, default_system=train.system_prompt(cfg))
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids


def test_end_and_pad_tokens_are_ours(exported):
    theirs, ours = auto_tokenizer(exported[0]), load_tokenizer(exported[0])
    assert theirs.eos_token_id == ours.token_id(IM_END) and theirs.pad_token_id == ours.pad_id
    assert theirs.unk_token is None and theirs.bos_token is None


def test_transformers_logits_match_ours(exported, prompts):
    import torch
    from transformers import AutoModelForCausalLM

    path, model_config, params = exported
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = prompts[1][:8]
    width = max(map(len, ids))
    pad = load_tokenizer(path).pad_id
    tokens = np.array([[pad] * (width - len(row)) + row for row in ids], np.int32)
    mask = np.array([[0] * (width - len(row)) + [1] * len(row) for row in ids], np.int32)
    ours = np.asarray(qwen2.forward(model_config, params, tokens, attention_mask=mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], torch_logits(model, tokens, mask)[real], atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("with_jinja_file", [False, True])
def test_save_writes_the_chat_template_it_is_given(tmp_path, exported, with_jinja_file):
    source = tmp_path / "tokenizer"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((config_lib.EMBEDDED_MODEL / name).read_bytes())
    if with_jinja_file:  # transformers 5 saves a template there, and reads it before tokenizer_config.json's
        (source / hf.CHAT_TEMPLATE_FILE).write_text("{{- 'a template to be replaced' }}")
    _, model_config, params = exported
    path = hf.save_hf_checkpoint(tmp_path / "hf_final", model_config, params, copy_files_from=source,
                                 chat_template=chat_template(QWEN_DEFAULT_SYSTEM))
    messages = [{"role": "user", "content": "1 + 2"}]
    assert auto_tokenizer(path).apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=False) == render_chat(messages)
