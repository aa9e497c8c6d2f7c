"""Tokenizers behind one small interface, and the Qwen chat format.

Two back ends: a Hugging Face `tokenizer.json` (what every Qwen2.5 checkpoint ships) through the
`tokenizers` library, and a sentencepiece `.model`. Both parse the chat control tokens
(<|im_start|>, <|im_end|>, <|endoftext|>) inside text into their single ids.

The Qwen2.5 chat format, with the default system turn its chat template adds:

    <|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n

`chat_template` writes the same format as a Jinja chat template (tokenizer_config.json's "chat_template"),
so that transformers' `apply_chat_template` renders prompts as `render_chat` does.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_ROLES = ("system", "user", "assistant", "tool")


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = True,
                default_system: str | None = QWEN_DEFAULT_SYSTEM) -> str:
    """The Qwen chat text for a list of {"role", "content"} messages.

    A system turn with `default_system` is prepended when the first message is not one (as Qwen2.5's
    template does); pass default_system=None to leave it out.
    """
    if not messages:
        raise ValueError("render_chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r}")
    if messages[0]["role"] != "system" and default_system is not None:
        messages = [{"role": "system", "content": default_system}, *messages]
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def chat_template(default_system: str | None = QWEN_DEFAULT_SYSTEM) -> str:
    """A Jinja chat template that renders as `render_chat(messages, default_system=default_system)`.

    With the Qwen default system prompt it renders system, user and assistant turns as Qwen2.5's own
    template does (tool turns are ours: a plain "tool" turn).
    """
    lines = ["{%- for message in messages %}",
             r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}",
             "{%- endfor %}",
             "{%- if add_generation_prompt %}", r"{{- '<|im_start|>assistant\n' }}", "{%- endif %}"]
    if default_system is not None:
        # A JSON string is a Jinja string literal: Jinja undoes the same backslash escapes.
        system = json.dumps(f"{IM_START}system\n{default_system}{IM_END}\n", ensure_ascii=False)
        lines = ["{%- if messages[0]['role'] != 'system' %}", f"{{{{- {system} }}}}", "{%- endif %}", *lines]
    return "\n".join(lines)


class Tokenizer:
    """Text <-> token ids. Subclasses implement `_encode_plain`, `decode`, `token_id`, `vocab_size`."""

    special_tokens: tuple[str, ...] = (IM_START, IM_END, END_OF_TEXT)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; chat control tokens in it become their single ids. No BOS is added."""
        ids: list[int] = []
        for piece in self._split_special(text):
            special = self.token_id(piece) if piece in self.special_tokens else None
            ids.extend([special] if special is not None else self._encode_plain(piece))
        return ids

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    default_system: str | None = QWEN_DEFAULT_SYSTEM) -> list[int]:
        return self.encode(render_chat(messages, add_generation_prompt=add_generation_prompt,
                                       default_system=default_system))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The tokenizer's own end-of-sequence id: the one its files declare (tokenizer_config.json's
        eos_token, a sentencepiece model's eos piece), else <|endoftext|> where the vocabulary has it.
        (What ends a rollout is `rollout.stop_ids`, which prefers the checkpoint's generation_config.json.)"""
        declared = self._declared_eos_ids()
        if declared:
            return declared
        end = self.token_id(END_OF_TEXT)
        return () if end is None else (end,)

    @property
    def pad_id(self) -> int:
        pad = self.token_id(END_OF_TEXT)
        return pad if pad is not None else 0

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern | None:
        present = [t for t in self.special_tokens if self.token_id(t) is not None]
        return re.compile("(" + "|".join(re.escape(t) for t in present) + ")") if present else None

    def _split_special(self, text: str) -> list[str]:
        if self._special_pattern is None:
            return [text]
        return [p for p in self._special_pattern.split(text) if p]

    def _declared_eos_ids(self) -> tuple[int, ...]:
        return ()

    # implemented by the back ends
    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer from tokenizer.json (+ tokenizer_config.json's eos token)."""

    def __init__(self, tokenizer_json: str | os.PathLike):
        import tokenizers

        self.path = Path(tokenizer_json)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        config_file = self.path.parent / "tokenizer_config.json"
        self._config = json.loads(config_file.read_text()) if config_file.is_file() else {}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids  # added tokens are parsed natively

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _declared_eos_ids(self) -> tuple[int, ...]:
        eos = self._config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        found = self.token_id(eos) if isinstance(eos, str) else None
        return () if found is None else (found,)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; chat control tokens are found by their piece strings."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece

        self.path = Path(model_file)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            # sentencepiece drops control pieces when decoding; keep ours by decoding around them.
            out, run = [], []
            for i in ids:
                piece = self._sp.id_to_piece(i)
                if piece in self.special_tokens:
                    out += [self._sp.decode(run), piece]
                    run = []
                else:
                    run.append(i)
            return "".join(out + [self._sp.decode(run)])
        specials = {self.token_id(t) for t in self.special_tokens}
        return self._sp.decode([i for i in ids if i not in specials])

    def token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _declared_eos_ids(self) -> tuple[int, ...]:
        return (self._sp.eos_id(),) if self._sp.eos_id() >= 0 else ()


CHARACTERS = "".join(chr(c) for c in range(32, 127)) + "\n"  # printable ASCII and the newline


def build_char_tokenizer(directory: str | os.PathLike, characters: str = CHARACTERS, *,
                         default_system: str | None = None) -> HFTokenizer:
    """Write a character-level tokenizer.json (+ tokenizer_config.json) into `directory` and load it.

    Id 0 is reserved (named <unk>), then one id per character, then the chat control tokens. The
    built-in synthetic task uses it: a tiny model learns arithmetic far more easily one digit at a
    time, and the vocabulary (100 ids) keeps its embedding small. Its chat template renders prompts
    as `render_chat(messages, default_system=default_system)`.

    transformers reads the tokenizer of any qwen2 checkpoint as a Qwen2Tokenizer, which takes only
    the vocabulary and merges from tokenizer.json and puts them behind its own NFC normalizer,
    byte-level pre-tokenizer (" " becomes "Ġ", a newline "Ċ") and decoder, with no unknown token.
    So the vocabulary is written in byte-level form behind that same pipeline, and transformers reads
    the same ids for any text; as there, characters outside `characters` are dropped.
    """
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    if len(set(characters)) != len(characters):
        raise ValueError("build_char_tokenizer: `characters` repeats a character")
    if not characters.isascii():
        raise ValueError(f"build_char_tokenizer: {[c for c in characters if not c.isascii()]} are not ASCII; "
                         f"a byte-level tokenizer reads only one-byte characters as one token each")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pieces = [piece for c in characters for piece, _ in byte_level.pre_tokenize_str(c)]
    tok = tokenizers.Tokenizer(models.BPE(vocab={"<unk>": 0, **{p: i + 1 for i, p in enumerate(pieces)}},
                                          merges=[]))  # no merges: characters
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([END_OF_TEXT, IM_START, IM_END])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": IM_END, "pad_token": END_OF_TEXT,
              "unk_token": None, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              "chat_template": chat_template(default_system)}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    return HFTokenizer(directory / "tokenizer.json")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a checkpoint directory (tokenizer.json or tokenizer.model) or a file path."""
    path = Path(path)
    if path.is_dir():
        for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model; copy the tokenizer "
                                f"files of the base checkpoint into it")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"{path}: a tokenizer is a tokenizer.json (Hugging Face) or a .model (sentencepiece) file")
