"""Data files: DAPO's parquet layout and JSONL, validation, dedup, tokenisation, the resumable stream."""

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_jax.data.datasets import (PROBLEM_TEMPLATE, DataError, PromptRecord, PromptStream, encode_rows,
                                    load_rows)
from dapo_jax.tokenizer import END_OF_TEXT, IM_END, IM_START, Tokenizer, render_chat


class CharTokenizer(Tokenizer):
    """One id per character (its code point); the chat control tokens above the code points."""

    _specials = {END_OF_TEXT: 0x110000, IM_START: 0x110001, IM_END: 0x110002}

    def _encode_plain(self, text):
        return [ord(c) for c in text]

    def token_id(self, token):
        return self._specials.get(token)


def dapo_row(question: str, answer: str = "34", index: int = 0) -> dict:
    """A row as DAPO-Math-17k publishes it."""
    return {"data_source": "math_dapo",
            "prompt": [{"role": "user", "content": PROBLEM_TEMPLATE.format(problem=question)}],
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule"},
            "extra_info": {"index": f"idx-{index}"}}


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_parquet_round_trip_in_the_published_layout(tmp_path):
    rows = [dapo_row(f"What is {i} + {i}?", str(2 * i), i) for i in range(5)]
    loaded = load_rows(write_parquet(tmp_path / "dapo-math-17k.parquet", rows))
    assert loaded.rows == rows
    assert (loaded.num_read, loaded.duplicates_dropped, loaded.bad_rows_skipped) == (5, 0, 0)
    assert loaded.row_numbers == [0, 1, 2, 3, 4]


def test_jsonl_problem_answer_rows_become_dapo_rows(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"problem": "What is 2 + 2?", "answer": 4},
                                                 {"problem": "Name 7.", "answer": "7", "data_source": "custom"}])
    first, second = load_rows(path).rows
    assert first == {"data_source": "mine",
                     "prompt": [{"role": "user", "content": PROBLEM_TEMPLATE.format(problem="What is 2 + 2?")}],
                     "ability": "MATH", "reward_model": {"ground_truth": "4", "style": "rule"},
                     "extra_info": {"index": 0}}
    assert first["prompt"][0]["content"].startswith("Solve the following math problem step by step.")
    assert first["prompt"][0]["content"].endswith('What is 2 + 2?\n\nRemember to put your answer on its own line '
                                                  'after "Answer:".')
    assert second["data_source"] == "custom" and second["extra_info"] == {"index": 1}


def test_jsonl_also_reads_the_dapo_layout(tmp_path):
    rows = [dapo_row("a"), dapo_row("b", answer=12)]
    loaded = load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [r["reward_model"]["ground_truth"] for r in loaded.rows] == ["34", "12"]


def test_duplicate_prompts_are_dropped_keeping_the_first(tmp_path):
    rows = [dapo_row(q, index=k) for k in range(4) for q in ("a", "b", "c")]
    loaded = load_rows(write_parquet(tmp_path / "rep.parquet", rows))
    assert (len(loaded.rows), loaded.duplicates_dropped, loaded.num_read) == (3, 9, 12)
    assert [r["extra_info"]["index"] for r in loaded.rows] == ["idx-0"] * 3
    assert len(load_rows(tmp_path / "rep.parquet", dedup=False).rows) == 12


BAD_ROWS = {
    "empty prompt": {**dapo_row("q"), "prompt": []},
    "prompt not a list": {**dapo_row("q"), "prompt": "What is 1 + 1?"},
    "message without content": {**dapo_row("q"), "prompt": [{"role": "user"}]},
    "unknown role": {**dapo_row("q"), "prompt": [{"role": "narrator", "content": "hi"}]},
    "blank content": {**dapo_row("q"), "prompt": [{"role": "user", "content": "  "}]},
    "missing ground truth": {**dapo_row("q"), "reward_model": {"style": "rule"}},
    "empty ground truth": dapo_row("q", answer=""),
    "float answer": {"problem": "q", "answer": 0.5},
    "bool answer": {"problem": "q", "answer": True},
    "null answer": {"problem": "q", "answer": None},
    "list answer": {"problem": "q", "answer": [1]},
    "empty data source": {**dapo_row("q"), "data_source": ""},
    "neither layout": {"question": "q"},
    "not an object": [1, 2],
    "invalid json": '{"problem": "q", "answer": ',
}


@pytest.mark.parametrize("bad", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_row_names_the_file_and_row(tmp_path, bad):
    path = write_jsonl(tmp_path / "train.jsonl", [dapo_row("a"), dapo_row("b"), bad])
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: .*data\.skip_bad_rows=True"):
        load_rows(path)


def test_a_bad_parquet_row_names_the_file_and_row(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [dapo_row("a"), dapo_row("b"), dapo_row("c", answer="")])
    with pytest.raises(DataError, match=r"train\.parquet: row 2: reward_model\.ground_truth"):
        load_rows(path)


def test_skip_bad_rows_counts_and_logs_them(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [dapo_row("a"), *BAD_ROWS.values(), dapo_row("b")])
    loaded = load_rows(path, skip_bad_rows=True)
    assert [r["prompt"] for r in loaded.rows] == [dapo_row("a")["prompt"], dapo_row("b")["prompt"]]
    assert loaded.bad_rows_skipped == len(BAD_ROWS) and loaded.num_read == len(BAD_ROWS) + 2
    assert loaded.row_numbers == [0, len(BAD_ROWS) + 1]
    assert f"skipped {len(BAD_ROWS)} bad rows" in caplog.text and "train.jsonl: row 1:" in caplog.text


def test_unsupported_suffix_and_missing_file(tmp_path):
    (tmp_path / "data.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match=r"\.parquet.*\.jsonl"):
        load_rows(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_rows(tmp_path / "nope.parquet")


def test_a_directory_named_like_a_data_file_is_said_to_be_one(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    write_jsonl(tmp_path / "data.jsonl" / "part-0.jsonl", [dapo_row("a")])
    with pytest.raises(IsADirectoryError, match=r"data\.jsonl is a directory, not a file; point data\.train / data\."
                                                r"eval at a \.parquet or \.jsonl file \(it holds part-0\.jsonl\)"):
        load_rows(tmp_path / "data.jsonl")


def test_a_json_error_names_the_files_line_and_column(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [dapo_row("a"), "", '{"problem": "q, "answer": 1}'])
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: is not valid JSON: Expecting ',' delimiter at line 3 "
                                        r"column 18; fix the row"):
        load_rows(path)
    write_jsonl(path, ['{"problem": "unterminated'])  # json's message ends in "starting at"
    with pytest.raises(DataError, match=r"row 0: is not valid JSON: Unterminated string starting at line 1 column 13;"):
        load_rows(path)


def test_a_byte_that_is_not_utf8_names_the_line_and_column_and_can_be_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"problem": "q", "answer": 1}).encode()
    path.write_bytes(good + b'\n{"problem": "caf\xe9", "answer": 2}\n' + good.replace(b"q", b"r") + b"\n")
    with pytest.raises(DataError, match=r"train\.jsonl: row 1: is not UTF-8 text: byte 0xe9 at line 2 column 17 "
                                        rf"\(byte offset {len(good) + 17} in the file; save the file as UTF-8\); "
                                        r"fix the row, or set data\.skip_bad_rows=True"):
        load_rows(path)
    loaded = load_rows(path, skip_bad_rows=True)
    assert (loaded.num_read, loaded.bad_rows_skipped, loaded.row_numbers) == (3, 1, [0, 2])


def test_a_byte_order_mark_before_the_first_row_is_not_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"problem": "q", "answer": 1}).encode() + b"\r\n")
    assert len(load_rows(path).rows) == 1


def test_a_parquet_string_that_is_not_utf8_is_a_bad_row(tmp_path):
    problems = pa.array([b"q", b"caf\xe9", b"r"], pa.binary()).view(pa.string())  # pyarrow does not check
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"problem": problems, "answer": ["1", "2", "3"]}), path)
    with pytest.raises(DataError, match=r"train\.parquet: row 1: column 'problem' holds a string that is not UTF-8 "
                                        r"text \(byte 0xe9 at byte 3 of the string\); fix the row"):
        load_rows(path)
    loaded = load_rows(path, skip_bad_rows=True)
    assert (loaded.num_read, loaded.bad_rows_skipped, loaded.row_numbers) == (3, 1, [0, 2])


def test_encode_renders_the_chat_and_keeps_the_answer():
    row = dapo_row("What is 2 + 2?", answer="4")
    (record,), truncated = encode_rows([row], CharTokenizer(), max_prompt_length=10_000, origin_prefix="f.parquet:")
    assert record.prompt_ids == tuple(CharTokenizer().encode(render_chat(row["prompt"])))
    assert (record.ground_truth, record.data_source, record.origin, truncated) == ("4", "math_dapo", "f.parquet:0", 0)
    assert len(record.uid) == 16 and pickle.loads(pickle.dumps(record)) == record


def test_uid_is_stable_and_depends_only_on_the_prompt():
    a, b, c = encode_rows([dapo_row("x", "1"), dapo_row("x", "2"), dapo_row("y")], CharTokenizer(),
                          max_prompt_length=10_000, system_prompt=None)[0]
    assert a.uid == b.uid != c.uid
    assert a.uid == encode_rows([dapo_row("x")], CharTokenizer(), max_prompt_length=10_000)[0][0].uid


def test_left_truncation_keeps_the_tail_and_counts(tmp_path, caplog):
    rows = [dapo_row("short"), dapo_row("long " * 100)]
    full = [CharTokenizer().encode(render_chat(r["prompt"])) for r in rows]
    limit = len(full[0])
    records, truncated = encode_rows(rows, CharTokenizer(), max_prompt_length=limit)
    assert truncated == 1 and "1 of 2 prompts" in caplog.text
    assert records[0].prompt_ids == tuple(full[0])
    assert records[1].prompt_ids == tuple(full[1][-limit:])


def test_truncation_error_names_the_origin():
    rows = [dapo_row("short"), dapo_row("long " * 100)]
    limit = len(CharTokenizer().encode(render_chat(rows[0]["prompt"], default_system=None)))
    with pytest.raises(DataError, match=rf"train\.parquet:7: the prompt is \d+ tokens, longer than "
                                        rf"max_prompt_length={limit}; .*data\.truncation='left'"):
        encode_rows(rows, CharTokenizer(), max_prompt_length=limit, truncation="error", system_prompt=None,
                    origin_prefix="train.parquet:", row_numbers=[3, 7])
    with pytest.raises(ValueError, match="truncation='right'"):
        encode_rows(rows, CharTokenizer(), max_prompt_length=limit, truncation="right")


def records(n: int) -> list[PromptRecord]:
    return [PromptRecord((i,), str(i), "s", f"{i:016x}", f"f:{i}") for i in range(n)]


def test_each_epoch_is_a_new_permutation():
    stream = PromptStream(records(20), seed=0)
    epochs = [[r.origin for r in stream.next_records(20)] for _ in range(3)]
    assert all(sorted(e) == sorted(r.origin for r in records(20)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != [r.origin for r in PromptStream(records(20), seed=1).next_records(20)]


def test_a_restored_stream_continues_identically_across_an_epoch_boundary():
    stream = PromptStream(records(7), seed=3)
    stream.next_records(5)
    state = json.loads(json.dumps(stream.get_state()))
    expected = stream.next_records(12)  # crosses into epochs 2 and 3
    restored = PromptStream(records(7), seed=3)
    restored.set_state(state)
    assert restored.next_records(12) == expected


def test_restoring_over_different_data_is_an_error():
    state = PromptStream(records(7), seed=3).get_state()
    for other in (PromptStream(records(8), seed=3), PromptStream(records(7), seed=4),
                  PromptStream(records(7)[::-1], seed=3)):
        with pytest.raises(DataError, match="same data files"):
            other.set_state(state)


def test_an_empty_dataset_is_an_error():
    with pytest.raises(DataError, match="empty"):
        PromptStream([], seed=0)
