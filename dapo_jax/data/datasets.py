"""Prompt datasets on disk, their validation, tokenisation, and the endless shuffled prompt stream.

Rows use the layout of DAPO-Math-17k and AIME-2024 (parquet files, one row per prompt):

    data_source   "math_dapo"
    prompt        [{"role": "user", "content": "Solve the following math problem ... Answer: ..."}]
    ability       "MATH"
    reward_model  {"ground_truth": "34", "style": "rule"}
    extra_info    {"index": ..., (AIME also) "raw_problem": ..., "split": ...}

A `.jsonl` file (UTF-8) holds one row per line, either in that layout or as a plain
`{"problem": str, "answer": str | int}`, which becomes a user turn in DAPO-Math-17k's wording
(`PROBLEM_TEMPLATE`). Every row is validated when read; the published 17k set repeats each prompt about
100 times, so rows are deduplicated by prompt text, keeping the first occurrence.

    load_rows(path) -> LoadedRows -> encode_rows(rows, tokenizer) -> [PromptRecord] -> PromptStream
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain

from dapo_jax.tokenizer import _ROLES, QWEN_DEFAULT_SYSTEM, Tokenizer, render_chat

log = logging.getLogger(__name__)

PROBLEM_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    "Remember to put your answer on its own line after \"Answer:\"."
)
SUFFIXES = (".parquet", ".jsonl")
_SKIP_HINT = "set data.skip_bad_rows=True to skip such rows (they are counted and logged)"
_REASONS_LOGGED = 5


class DataError(ValueError):
    """A data file or row that cannot be used as it is; the message says which and what to change."""


class _BadRow(Exception):
    """Why one row is unusable (turned into a DataError naming the file and row, or counted and skipped)."""


@dataclasses.dataclass(frozen=True)
class LoadedRows:
    rows: list[dict]  # valid, deduplicated rows in DAPO layout; ground_truth always a str
    row_numbers: list[int]  # the 0-based row (line, for .jsonl) of each kept row in the file
    num_read: int  # rows in the file, bad ones and duplicates included
    duplicates_dropped: int
    bad_rows_skipped: int
    path: str


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One tokenised prompt, ready for the sampler."""

    prompt_ids: tuple[int, ...]
    ground_truth: str
    data_source: str
    uid: str  # sha256 of the prompt text, first 16 hex digits: stable across runs and files
    origin: str  # where it came from, e.g. "dapo-math-17k.parquet:41"


def prompt_text(messages: Sequence[dict]) -> str:
    """The roles and contents of a chat prompt, joined: the key for deduplication and for `PromptRecord.uid`."""
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


def load_rows(path: str | Path, *, skip_bad_rows: bool = False, dedup: bool = True) -> LoadedRows:
    """The valid rows of a .parquet or .jsonl file in DAPO layout, deduplicated by prompt text."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; data files must end in one of {SUFFIXES}")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in SUFFIXES)[:5]
        held = f" (it holds {', '.join(inside)})" if inside else ""
        raise IsADirectoryError(f"data file {path} is a directory, not a file; point data.train / data.eval at a "
                                f"{' or '.join(SUFFIXES)} file{held}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; check the path in the data config")
    rows, row_numbers, seen = [], [], set()
    num_read = duplicates = 0
    bad_reasons: list[str] = []
    for index, raw in _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path):
        num_read += 1
        try:
            row = _to_dapo_row(raw, default_source=path.stem, index=index)
        except _BadRow as e:
            reason = f"{path}: row {index}: {e}"
            if not skip_bad_rows:
                raise DataError(f"{reason}; fix the row, or {_SKIP_HINT}") from None
            bad_reasons.append(reason)
            continue
        key = prompt_text(row["prompt"])
        if dedup and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append(row)
        row_numbers.append(index)
    if bad_reasons:
        log.warning("skipped %d bad rows of %d in %s (data.skip_bad_rows=True); the first: %s", len(bad_reasons),
                    num_read, path, "; ".join(bad_reasons[:_REASONS_LOGGED]))
    if duplicates:
        log.info("dropped %d duplicate prompts of %d rows in %s, keeping %d", duplicates, num_read, path, len(rows))
    return LoadedRows(rows, row_numbers, num_read, duplicates, len(bad_reasons), str(path))


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=65_536)
        index = 0
        for batch in batches:  # in batches, so only the unique rows of a large file are ever held
            try:
                raws = batch.to_pylist()
            except UnicodeDecodeError:  # a string that is not UTF-8 spoils its row, not the batch
                raws = [_parquet_row(batch, i) for i in range(batch.num_rows)]
            for raw in raws:
                yield index, raw
                index += 1
    except pa.ArrowException as e:
        raise DataError(f"{path} cannot be read as parquet ({e}); check that the file is complete") from e


def _parquet_row(batch, i: int) -> dict | _BadRow:
    row = {}
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            row[name] = column[i].as_py()
        except UnicodeDecodeError as e:
            return _BadRow(f"column {name!r} holds a string that is not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                           f"at byte {e.start} of the string)")
    return row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    # Read as bytes and decoded line by line, so a byte that is not UTF-8 spoils its row, not the file.
    # Lines end at "\n" (JSON Lines; a "\r" before it is whitespace to JSON).
    with path.open("rb") as f:
        offset = 0  # of the line's first byte in the file
        for index, raw in enumerate(f):
            body = raw.removeprefix(codecs.BOM_UTF8) if index == 0 else raw  # some editors begin with a BOM
            start, offset = offset + len(raw) - len(body), offset + len(raw)
            try:
                text = body.decode("utf-8").rstrip()  # leading whitespace kept: JSON's columns stay the file's
            except UnicodeDecodeError as e:
                column = len(body[:e.start].decode("utf-8")) + 1
                yield index, _BadRow(f"is not UTF-8 text: byte 0x{body[e.start]:02x} at line {index + 1} column "
                                     f"{column} (byte offset {start + e.start} in the file; save the file as UTF-8)")
                continue
            if text:
                try:
                    yield index, json.loads(text)
                except json.JSONDecodeError as e:
                    where = "" if e.msg.endswith(" at") else " at"  # "Unterminated string starting at"
                    yield index, _BadRow(f"is not valid JSON: {e.msg}{where} line {index + 1} column {e.colno}")


def _to_dapo_row(raw: object, *, default_source: str, index: int) -> dict:
    """The row in DAPO layout with ground_truth as a str; raises _BadRow saying what is wrong."""
    if isinstance(raw, _BadRow):
        raise raw
    if not isinstance(raw, dict):
        raise _BadRow(f"is a {type(raw).__name__}, not an object")
    if "prompt" not in raw:
        if "problem" not in raw or "answer" not in raw:
            raise _BadRow(f"has neither 'prompt' (DAPO layout) nor both 'problem' and 'answer'; "
                          f"its keys are {sorted(raw)}")
        if not isinstance(raw["problem"], str) or not raw["problem"].strip():
            raise _BadRow(f"'problem' must be a non-empty string, got {raw['problem']!r}")
        raw = {
            "data_source": raw.get("data_source", default_source),
            "prompt": [{"role": "user", "content": PROBLEM_TEMPLATE.format(problem=raw["problem"])}],
            "ability": "MATH",
            "reward_model": {"ground_truth": raw["answer"], "style": "rule"},
            "extra_info": {"index": index},
        }
    prompt = raw["prompt"]
    if not isinstance(prompt, list) or not prompt:
        raise _BadRow(f"'prompt' must be a non-empty list of {{role, content}} messages, got {prompt!r:.200}")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise _BadRow(f"prompt message {i} must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r:.200}")
    if not any(m["content"].strip() for m in prompt):
        raise _BadRow("the prompt's messages are all empty")
    reward_model = raw.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if isinstance(truth, int) and not isinstance(truth, bool):
        truth = str(truth)
    if not isinstance(truth, str) or not truth.strip():
        raise _BadRow(f"reward_model.ground_truth must be a non-empty string (or an int), got {truth!r}")
    source = raw.get("data_source")
    if not isinstance(source, str) or not source:
        raise _BadRow(f"data_source must be a non-empty string, got {source!r}")
    return {**raw, "reward_model": {**reward_model, "ground_truth": truth}}


def encode_rows(rows: Sequence[dict], tokenizer: Tokenizer, *, max_prompt_length: int, truncation: str = "left",
                system_prompt: str | None = QWEN_DEFAULT_SYSTEM, origin_prefix: str = "",
                row_numbers: Sequence[int] | None = None) -> tuple[list[PromptRecord], int]:
    """(records, number truncated): each row's chat prompt rendered and tokenised.

    A prompt longer than max_prompt_length keeps its last max_prompt_length tokens with
    truncation="left" (as the reference does), or raises with truncation="error". A record's origin is
    origin_prefix + its row number (row_numbers[i], e.g. `LoadedRows.row_numbers`, else i).
    """
    if truncation not in ("left", "error"):
        raise ValueError(f"truncation={truncation!r}: use 'left' (keep a long prompt's last max_prompt_length "
                         f"tokens, as the reference does) or 'error'")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be >= 1")
    if row_numbers is not None and len(row_numbers) != len(rows):
        raise ValueError(f"row_numbers has {len(row_numbers)} entries for {len(rows)} rows; pass one per row")
    records, truncated = [], 0
    for i, row in enumerate(rows):
        origin = f"{origin_prefix}{i if row_numbers is None else row_numbers[i]}"
        ids = tokenizer.encode(render_chat(row["prompt"], default_system=system_prompt))
        if len(ids) > max_prompt_length:
            if truncation == "error":
                raise DataError(f"{origin}: the prompt is {len(ids)} tokens, longer than max_prompt_length="
                                f"{max_prompt_length}; raise data.max_prompt_length or set data.truncation='left'")
            ids = ids[-max_prompt_length:]
            truncated += 1
        uid = hashlib.sha256(prompt_text(row["prompt"]).encode()).hexdigest()[:16]
        records.append(PromptRecord(tuple(ids), row["reward_model"]["ground_truth"], row["data_source"], uid, origin))
    if truncated:
        log.warning("%d of %d prompts%s were longer than max_prompt_length=%d tokens and lost their beginning "
                    "(data.truncation='left'); raise data.max_prompt_length to keep them whole",
                    truncated, len(rows), f" from {origin_prefix}" if origin_prefix else "", max_prompt_length)
    return records, truncated


class PromptStream:
    """An endless stream of prompt records, in a new shuffled order every epoch, resumable from a state.

    A grain pipeline: MapDataset.source(records).shuffle(seed).repeat(), where repeat reseeds the
    shuffle each epoch, read in this process. The state (a JSON-able dict) is the position in that
    sequence plus a fingerprint of the records, so a restored stream continues exactly where the
    saved one was, and restoring over different data is an error rather than a silent reshuffle.
    """

    def __init__(self, records: Sequence[PromptRecord], *, seed: int):
        if not records:
            raise DataError("the prompt dataset is empty; check the data files, and whether data.skip_bad_rows "
                            "skipped every row")
        self.num_records, self.seed = len(records), seed
        self._fingerprint = hashlib.sha256("\n".join(r.uid for r in records).encode()).hexdigest()[:16]
        dataset = grain.MapDataset.source(list(records)).shuffle(seed=seed).repeat()
        self._iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    def next_records(self, n: int) -> list[PromptRecord]:
        if n < 0:
            raise ValueError(f"next_records(n={n}): n must be >= 0")
        return [next(self._iterator) for _ in range(n)]

    def peek(self, n: int) -> list[PromptRecord]:
        """The next n records, left in the stream (a rollout takes from them what it used)."""
        state = self._iterator.get_state()
        records = self.next_records(n)
        self._iterator.set_state(state)
        return records

    def get_state(self) -> dict:
        return {"seed": self.seed, "num_records": self.num_records, "fingerprint": self._fingerprint,
                "iterator": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        saved = (state["seed"], state["num_records"], state["fingerprint"])
        if saved != (self.seed, self.num_records, self._fingerprint):
            raise DataError(f"the saved prompt stream (seed, records, fingerprint) = {saved} is not this one's "
                            f"{(self.seed, self.num_records, self._fingerprint)}; resume with the same data files, "
                            f"data settings and seed, or start the stream afresh")
        self._iterator.set_state(state["iterator"])
