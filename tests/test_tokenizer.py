"""Tokenizers: a Hugging Face tokenizer.json and a sentencepiece model behind one interface."""

import json

import pytest

from dapo_jax import config as config_lib, train
from dapo_jax.tokenizer import (CHARACTERS, END_OF_TEXT, IM_END, IM_START, QWEN_DEFAULT_SYSTEM, HFTokenizer,
                                SentencePieceTokenizer, build_char_tokenizer, load_tokenizer, render_chat)

CORPUS = ["Natalia sold clips to 48 of her friends in April.", "What is 12 + 30? Answer: 42",
          "The answer is $\\frac{1}{2}$ and \\boxed{7}.", "Let x = 3; then 2x + 1 = 7."] * 20
SPECIALS = ["<|endoftext|>", IM_START, IM_END]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json (Qwen's kind) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    import sentencepiece

    path = tmp_path_factory.mktemp("sp_tok")
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(path / "tokenizer"),
                                             vocab_size=310, user_defined_symbols=SPECIALS,
                                             minloglevel=2, byte_fallback=True, normalization_rule_name="identity",
                                             remove_extra_whitespaces=False)
    return path / "tokenizer.model"


@pytest.fixture(params=["hf", "sentencepiece"])
def tokenizer(request, hf_dir, sp_file):
    return load_tokenizer(hf_dir if request.param == "hf" else sp_file)


def test_load_tokenizer_picks_the_backend(hf_dir, sp_file):
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)
    assert isinstance(load_tokenizer(sp_file), SentencePieceTokenizer)


def test_text_round_trips(tokenizer):
    text = "What is 12 + 30? Answer: 42"
    ids = tokenizer.encode(text)
    assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_chat_control_tokens_are_single_ids(tokenizer):
    ids = tokenizer.encode(f"{IM_START}user\nhi{IM_END}")
    assert ids[0] == tokenizer.token_id(IM_START) and ids[-1] == tokenizer.token_id(IM_END)
    assert tokenizer.decode(ids, skip_special_tokens=False) == f"{IM_START}user\nhi{IM_END}"
    assert tokenizer.decode(ids) == "user\nhi"


def test_the_end_id_is_the_one_the_tokenizer_declares(hf_dir, sp_file, tmp_path):
    hf = load_tokenizer(hf_dir)
    assert hf.eos_ids == (hf.token_id("<|endoftext|>"),) and hf.pad_id == hf.token_id("<|endoftext|>")
    sp = load_tokenizer(sp_file)
    assert sp.eos_ids == (sp._sp.eos_id(),)
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": IM_END}))
    assert load_tokenizer(tmp_path).eos_ids == (hf.token_id(IM_END),)
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_tokenizer(tmp_path).eos_ids == (hf.token_id(END_OF_TEXT),)  # nothing declared


def test_chat_format_is_qwens():
    text = render_chat([{"role": "user", "content": "What is 2+2?"}])
    assert text == (f"{IM_START}system\n{QWEN_DEFAULT_SYSTEM}{IM_END}\n"
                    f"{IM_START}user\nWhat is 2+2?{IM_END}\n{IM_START}assistant\n")
    own_system = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                             add_generation_prompt=False)
    assert own_system == f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi{IM_END}\n"
    assert render_chat([{"role": "user", "content": "Hi"}], default_system=None).startswith(f"{IM_START}user")


def test_encode_chat_matches_encoding_the_rendered_text(tokenizer):
    messages = [{"role": "user", "content": "Let x = 3."}]
    assert tokenizer.encode_chat(messages) == tokenizer.encode(render_chat(messages))


@pytest.mark.parametrize("bad", [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]])
def test_malformed_messages_are_rejected(bad):
    with pytest.raises(ValueError, match="message|at least one"):
        render_chat(bad)


def test_missing_tokenizer_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json .* or a .model"):
        (tmp_path / "vocab.txt").write_text("")
        load_tokenizer(tmp_path / "vocab.txt")


def test_char_tokenizer_is_one_id_per_character(tmp_path):
    tok = build_char_tokenizer(tmp_path)
    text = "(7 + 5) * 3\nAnswer: 36"
    ids = tok.encode(IM_START + "user\n" + text + IM_END)
    assert len(ids) == 1 + len("user\n") + len(text) + 1
    assert tok.decode(ids, skip_special_tokens=False) == IM_START + "user\n" + text + IM_END
    assert tok.decode(ids) == "user\n" + text
    assert tok.eos_ids == (tok.token_id(IM_END),)
    assert tok.vocab_size == len(CHARACTERS) + 4
    assert tok.encode("é x") == tok.encode(" x")  # other characters are dropped, as transformers drops them


def test_char_tokenizer_needs_one_byte_characters(tmp_path):
    with pytest.raises(ValueError, match="not ASCII"):
        build_char_tokenizer(tmp_path, "abcé")


def test_char_tokenizer_reads_the_same_in_transformers(tmp_path):
    from transformers import Qwen2Tokenizer  # what transformers builds for every qwen2 checkpoint

    ours = build_char_tokenizer(tmp_path)
    theirs = Qwen2Tokenizer.from_pretrained(str(tmp_path))
    for text in [CHARACTERS, f"{IM_START}user\n(7 + 5) * 3{IM_END}\n{END_OF_TEXT}", " lead, trail ", "é, \t, ünï"]:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


CONVERSATIONS = [[{"role": "user", "content": "(7 + 5) * 3"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2?"}]]


@pytest.mark.parametrize("default_system", [None, QWEN_DEFAULT_SYSTEM, 'Say "hi",\n{{ not jinja }} \\ é 😀'])
def test_chat_template_renders_as_render_chat(tmp_path, default_system):
    from transformers import AutoTokenizer

    build_char_tokenizer(tmp_path, default_system=default_system)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False) == (
                render_chat(messages, add_generation_prompt=add_generation_prompt, default_system=default_system))


def test_embedded_tokenizer_is_what_build_char_tokenizer_writes(tmp_path):
    """`python -m dapo_jax.warmup` would write the same files, with the default run's prompt format."""
    build_char_tokenizer(tmp_path, default_system=train.system_prompt(config_lib.default_config()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (config_lib.EMBEDDED_MODEL / name).read_text(), name


def test_embedded_tokenizer_keeps_the_ids_its_model_learned():
    tok = load_tokenizer(config_lib.EMBEDDED_MODEL)
    assert tok.encode(CHARACTERS) == list(range(1, len(CHARACTERS) + 1))  # " " is 1, "\n" is 96
    assert tok.encode(END_OF_TEXT + IM_START + IM_END) == [97, 98, 99]
