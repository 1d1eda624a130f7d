"""Reading, formatting, packing and batching (train/data.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import ROOT, medical_sentences, train_argv, write_jsonl
from minilora_train.config import UsageError, parse_args
from minilora_train.data import IGNORE, Packer, batches, load_records, load_windows, prepare_data


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def args_for(data, *extra):
    return parse_args(train_argv("unused-model", data, "unused-out", *extra))


def test_packing_fills_every_window_and_separates_documents(tokenizer):
    texts = medical_sentences(50)
    packer = Packer(tokenizer, 16)
    windows = list(packer.windows(packer.encode([{"text": t} for t in texts], "text")))
    stream = [i for ids, _ in windows for i in ids.tolist()]
    expected = []
    for t in texts:
        expected += [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert all(len(ids) == 16 for ids, _ in windows)
    assert stream[:len(expected)] == expected  # nothing dropped, documents in order, EOS between them
    padding = sum(int((labels == IGNORE).sum()) for _, labels in windows)
    assert padding < 16  # only the last window is padded
    real = sum(int((labels != IGNORE).sum()) for _, labels in windows)
    assert real / (len(windows) * 16) > 0.95


def test_question_response_records_use_the_medical_template_and_mask_the_prompt(tokenizer, tmp_path):
    records = [{"question": "What lowers blood sugar?", "response": "Insulin lowers blood sugar.",
                "context": "Type 1 diabetes"}, {"question": "What is a fever?", "answer": "A high temperature."}]
    masked = Packer(tokenizer, 512, responses_only=True).encode(records, "qa")
    full = Packer(tokenizer, 512).encode(records, "qa")
    ids, labels = masked[0]
    text = tokenizer.decode(ids)
    assert "### Medical Context:\nType 1 diabetes" in text and "### Question:\nWhat lowers blood sugar?" in text
    assert "### Response:\nInsulin lowers blood sugar." in text
    response = tokenizer("Insulin lowers blood sugar.", add_special_tokens=False)["input_ids"]
    trained = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert trained == response + [tokenizer.eos_token_id]  # only the response (and its EOS) carries loss
    assert labels[:len(ids) - len(trained)] == [IGNORE] * (len(ids) - len(trained))
    assert full[0][1] == full[0][0]  # without the flag every token is trained on
    assert "### Medical Context" not in tokenizer.decode(masked[1][0])  # no context: no empty section


@pytest.mark.parametrize("fmt", ["parquet", "csv", "text", "jsonl"])
def test_each_input_format_is_read_and_inferred_from_extensions(fmt, tmp_path, tokenizer):
    import datasets

    texts = medical_sentences(40)
    if fmt == "text":
        path = tmp_path / "notes.txt"
        path.write_text("\n\n".join(texts) + "\n")
    elif fmt == "jsonl":
        path = write_jsonl(tmp_path / "notes.jsonl", [{"text": t} for t in texts])
    else:
        path = tmp_path / f"notes.{fmt}"
        ds = datasets.Dataset.from_dict({"text": texts})
        getattr(ds, f"to_{fmt}")(str(path))
    data = prepare_data(args_for(path), tokenizer)
    total = len(data.train) + len(data.validation)
    assert total > 0 and len(data.validation) >= 1
    all_ids = torch.cat([data.train.input_ids, data.validation.input_ids]).flatten().tolist()
    # every document made it in (the text splits by paragraph: one record a sentence)
    assert all_ids.count(tokenizer.eos_token_id) == len(texts)


def test_directory_with_train_and_validation_files_keeps_its_split(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in medical_sentences(30)])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": t} for t in medical_sentences(5, seed=9)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "never used"}])
    records = load_records(str(tmp_path))
    assert sorted(records) == ["train", "validation"]
    assert records["validation"].num_rows == 5


def test_saved_datasets_directory(tmp_path, tokenizer):
    import datasets

    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": medical_sentences(30)})).save_to_disk(str(tmp_path / "saved"))
    data = prepare_data(args_for(tmp_path / "saved"), tokenizer)
    assert len(data.train) > 0


def test_memory_fsspec_input(tokenizer):
    import fsspec

    with fsspec.open("memory://bucket/med/notes.jsonl", "w") as f:
        for t in medical_sentences(30):
            f.write(json.dumps({"text": t}) + "\n")
    data = prepare_data(args_for("memory://bucket/med"), tokenizer)
    assert len(data.train) > 0
    windows = load_windows("memory://bucket/med/notes.jsonl", tokenizer, 32)
    assert windows.input_ids.shape[1] == 32


def test_memory_input_and_output_end_to_end(tiny_model_dir):
    import fsspec

    from minilora_train.loop import run

    fs = fsspec.filesystem("memory")
    with fs.open("/in/notes.jsonl", "w") as f:
        for t in medical_sentences(60):
            f.write(json.dumps({"text": t}) + "\n")
    run(parse_args(train_argv(tiny_model_dir, "memory://in/notes.jsonl", "memory://out/run", "--max_steps", "4",
                              "--save_epoch_percentage", "0.1")))  # 20 updates an epoch: a checkpoint every 2
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png",
                 "train_config.json", "train_summary.json", "tokenizer.json", "latest"):
        assert fs.exists(f"/out/run/{name}"), name


def test_streaming_reads_the_same_kind_of_windows(tmp_path, tokenizer, tiny_model_dir):
    from minilora_train.loop import run

    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": t} for t in medical_sentences(120)])
    data = prepare_data(args_for(path, "--streaming_data", "--shuffle_buffer_size", "16"), tokenizer)
    assert data.train is None and len(data.validation) > 0
    first = list(data.stream(0))
    assert all(ids.shape == (32,) for ids, _ in first)
    assert [ids.tolist() for ids, _ in first] != [ids.tolist() for ids, _ in data.stream(1)]  # reshuffled per epoch
    summary = run(parse_args(train_argv(tiny_model_dir, path, tmp_path / "out", "--streaming_data", "--max_steps", "5")))
    assert summary["updates"] == 5
    with pytest.raises(UsageError, match="--max_steps"):
        run(parse_args(train_argv(tiny_model_dir, path, tmp_path / "out2", "--streaming_data")))


# -- local JSON (lines) and text: read without `datasets`, as `datasets` reads them ---------------

def _datasets_rows(builder, data_files):
    """What datasets.load_dataset gives for these files (the reader used before): {split: (columns, rows)}."""
    import datasets

    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    loaded = datasets.load_dataset(builder, data_files=data_files, **extra)
    return {split: (part.column_names, part[0:len(part)]) for split, part in loaded.items()}


def _qa(n, seed, context_from=None):
    """Question/answer records; from record ``context_from`` on (None: never) with a context."""
    return [{"question": s.split(" ")[0] + "?", "answer": s,
             **({"context": "adult"} if context_from is not None and i >= context_from else {})}
            for i, s in enumerate(medical_sentences(n, seed=seed))]


def _write_inputs(kind, tmp_path):
    """(path given to --dataset_dir, builder, data_files as datasets takes them)."""
    if kind == "jsonl-folder":  # 'context' from the 2nd record on, a 2nd training file without it, a validation file
        write_jsonl(tmp_path / "train_1.jsonl", _qa(30, 1, context_from=1))
        write_jsonl(tmp_path / "train_2.jsonl", _qa(20, 2))
        write_jsonl(tmp_path / "validation.jsonl", _qa(6, 3))
        files = {"train": [str(tmp_path / "train_1.jsonl"), str(tmp_path / "train_2.jsonl")],
                 "validation": [str(tmp_path / "validation.jsonl")]}
        return str(tmp_path), "json", files
    if kind == "json-array":  # one array, fields that only some records have, a byte-order mark
        records = [{"text": s, **({"source": i} if i % 2 else {})} for i, s in enumerate(medical_sentences(25))]
        path = tmp_path / "notes.json"
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1).encode())
        return str(path), "json", {"train": [str(path)]}
    path = tmp_path / "notes.txt"  # Windows line ends, runs of blank lines, a paragraph of spaces, no final newline
    body = "\r\n\r\n".join(f"{s}\r\nline two" for s in medical_sentences(20)) + "\n\n\n\n  \n\n\nlast"
    path.write_bytes(body.encode())
    return str(path), "text", {"train": [str(path)]}


@pytest.mark.parametrize("kind", ["jsonl-folder", "json-array", "text"])
def test_local_json_and_text_give_the_rows_datasets_gave(kind, tmp_path):
    path, builder, files = _write_inputs(kind, tmp_path)
    records = load_records(path)
    assert {split: (part.column_names, part[0:len(part)]) for split, part in records.items()} == \
        _datasets_rows(builder, files)


def test_the_held_out_records_are_the_ones_datasets_held_out():
    import datasets

    from minilora_train.data import Records

    texts = medical_sentences(53)
    for seed, n in ((42, 3), (7, 20), (123456, 1)):
        split = Records({"text": texts, "n": list(range(53))}).train_test_split(test_size=n, seed=seed)
        expected = datasets.Dataset.from_dict({"text": texts, "n": list(range(53))}).train_test_split(test_size=n, seed=seed)
        for part in ("train", "test"):
            assert split[part][0:len(split[part])] == expected[part][0:len(expected[part])]


def test_the_app_on_json_lines_never_imports_datasets(tiny_model_dir, tmp_path):
    """`datasets` and pyarrow stay resident once imported (docs/history.md has what that cost the
    app's peak memory); the common input must not pull them in, anywhere in the app."""
    data = write_jsonl(tmp_path / "notes.jsonl", [{"text": t} for t in medical_sentences(40)])
    argv = train_argv(tiny_model_dir, data, tmp_path / "out", "--max_steps", "1", "--general_eval_dataset", "none")
    script = ("import json, sys\nfrom minilora_train.config import parse_args\nfrom minilora_train.loop import run\n"
              "run(parse_args(json.loads(sys.argv[1])))\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'datasets', 'pyarrow', 'pandas'}))")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([str(a) for a in argv])], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_column_only_a_later_file_has_is_merged(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", _qa(10, 1))
    write_jsonl(tmp_path / "b.jsonl", _qa(10, 2, context_from=0))  # datasets refused a column the first file lacks
    records = load_records(str(tmp_path))["train"]
    assert records.column_names == ["question", "answer", "context"]
    assert records[0:20]["context"] == [None] * 10 + ["adult"] * 10
    data = prepare_data(args_for(tmp_path), tokenizer)
    text = tokenizer.decode(torch.cat([data.train.input_ids, data.validation.input_ids]).flatten())
    assert text.count("### Medical Context:\nadult") == 10 and text.count("### Question:") == 20


def test_a_byte_order_mark_is_not_part_of_the_first_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbffever\n\ncough\n")
    assert load_records(str(path))["train"][0:2] == {"text": ["fever", "cough\n"]}


def test_batches_keep_one_shape_including_the_last(tokenizer):
    packer = Packer(tokenizer, 8)
    from minilora_train.data import Windows

    ids = torch.arange(5 * 8).reshape(5, 8)
    out = list(batches(Windows(ids, ids.clone()), 2, tokenizer.pad_token_id))
    assert [b[0].shape for b in out] == [(2, 8)] * 3
    assert (out[-1][1][1] == IGNORE).all()  # the filler row carries no loss
    assert packer.length == 8


# -- bad input: one clear error each --------------------------------------------------------------

def test_missing_dataset_path(tokenizer, tmp_path):
    with pytest.raises(UsageError, match="no such file or directory"):
        prepare_data(args_for(tmp_path / "absent"), tokenizer)


def test_malformed_json_line_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl:3: malformed JSON"):
        prepare_data(args_for(path), tokenizer)


def test_records_without_text_fields_list_the_columns(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"title": "a", "body": "b"}] * 5)
    with pytest.raises(UsageError, match="found columns: title, body"):
        prepare_data(args_for(path), tokenizer)


def test_text_that_is_not_utf8(tokenizer, tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait\n\nfi\xe8vre\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin\.txt:1: not valid UTF-8"):
        prepare_data(args_for(path), tokenizer)


def test_empty_after_filtering(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": "   "}] * 10)
    with pytest.raises(UsageError, match="no training text"):
        prepare_data(args_for(path), tokenizer)


# -- JSON of any layout, documents of any length, prompts longer than the window (issue 30) --------

def test_a_pretty_printed_json_array_is_read_whatever_comes_before_its_bracket(tmp_path, tokenizer):
    records = [{"text": t} for t in medical_sentences(12)]
    lines = write_jsonl(tmp_path / "notes.jsonl", records)
    for name, lead in (("newline.json", "\n"), ("indented.json", "\r\n \t\n   "), ("bom.json", "\ufeff\n  ")):
        (tmp_path / name).write_text(lead + json.dumps(records, indent=4) + "\n", encoding="utf-8")
        assert load_records(str(tmp_path / name))["train"][0:12] == load_records(lines)["train"][0:12], name


def test_one_json_object_over_several_lines_is_named_as_such(tmp_path, tokenizer):
    path = tmp_path / "export.json"
    path.write_text("\n" + json.dumps({"data": [{"text": t} for t in medical_sentences(3)]}, indent=2))
    with pytest.raises(UsageError, match=r"export\.json: holds one JSON object spread over several lines, not "
                                         r"records.*jq -c '\.data\[\]'"):
        load_records(str(path))
    broken = tmp_path / "broken.jsonl"  # a JSON lines file whose first line is cut: still the line's error
    broken.write_text('{"text": "cut\n{"text": "fine"}\n')
    with pytest.raises(UsageError, match=r"broken\.jsonl:1: malformed JSON line"):
        load_records(str(broken))


def _reference_cut(docs, length, pad):
    """The windows of ``docs`` computed at once, independently of Packer: the whole stream cut
    into rows of ``length``, the last padded, rows that predict nothing (labels after the first
    all -100) left out."""
    ids = np.concatenate([np.asarray(d[0], np.int64) for d in docs])
    labels = np.concatenate([np.asarray(d[1], np.int64) for d in docs])
    rows = -(-len(ids) // length)
    ids = np.concatenate([ids, np.full(rows * length - len(ids), pad)]).reshape(rows, length)
    labels = np.concatenate([labels, np.full(rows * length - len(labels), IGNORE)]).reshape(rows, length)
    keep = (labels[:, 1:] != IGNORE).any(axis=1)
    return ids[keep], labels[keep]


@pytest.mark.parametrize("length", [2, 7, 32, 128])
def test_a_long_document_among_short_ones_is_cut_like_the_whole_stream_at_once(length, tokenizer):
    rng = np.random.default_rng(length)
    docs = []
    for size in [*rng.integers(1, 40, 30), 50_000, *rng.integers(1, 40, 30), 3 * length, length - 1]:
        ids = rng.integers(3, 200, size).tolist()
        # prompt-like stretches (-100) of every length, some longer than a window, some at the end
        labels = [IGNORE if (i // length) % 3 == 1 else t for i, t in enumerate(ids)]
        docs.append((ids, labels))
    windows = list(Packer(tokenizer, length).windows(iter(docs)))
    expected_ids, expected_labels = _reference_cut(docs, length, tokenizer.pad_token_id)
    assert len(windows) == len(expected_ids)
    np.testing.assert_array_equal(np.stack([w[0] for w in windows]), expected_ids)
    np.testing.assert_array_equal(np.stack([w[1] for w in windows]), expected_labels)


def test_cutting_windows_is_linear_in_a_documents_length(tokenizer):
    """One 4-million-token document at 8 tokens a window. Deleting each window from the head of a
    list (the old cut) moves the rest of the document every time, 1e12 list entries per buffer
    here: about ten minutes of memmove (docs/reliability.md has the command that compares both
    cuts). Cut linearly it takes seconds. The assertions are on the windows; the alarm only
    keeps a quadratic cut from stalling the suite."""
    import signal

    n, length = 4_000_000, 8
    ids = [i % 251 for i in range(n)]  # small ints: no objects allocated per token
    packer = Packer(tokenizer, length)

    def too_slow(signum, frame):
        raise AssertionError(f"cutting a {n:,}-token document took more than 120 s: quadratic again?")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(120)
    try:
        windows = list(packer.windows(iter([(ids, ids)])))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    expected = np.arange(n, dtype=np.int64) % 251  # n is a multiple of 8: no padded window
    assert len(windows) == n // length
    np.testing.assert_array_equal(np.stack([w[0] for w in windows]).ravel(), expected)
    np.testing.assert_array_equal(np.stack([w[1] for w in windows]).ravel(), expected)


def _long_and_short_questions(n_long, n_short):
    """Question/response records: ``n_long`` with a question of about 160 tokens, ``n_short`` of
    about 10, each response one short sentence that names its record."""
    sentences = medical_sentences(8)
    long_records = [{"question": " ".join(sentences[:8]) + f" Case {i}?", "response": f"Answer {i}."}
                    for i in range(n_long)]
    short_records = [{"question": f"What helps case {i}?", "response": f"Answer {n_long + i}."} for i in range(n_short)]
    return long_records + short_records


def test_examples_whose_prompt_fills_the_window_are_left_out_and_counted(tokenizer, tmp_path, capsys):
    path = write_jsonl(tmp_path / "qa.jsonl", _long_and_short_questions(6, 34))
    data = prepare_data(args_for(path, "--max_seq_length", "64", "--train_on_responses_only",
                                 "--validation_split_percentage", "10"), tokenizer)
    note = capsys.readouterr().out
    windows = [data.train, data.validation]
    text = tokenizer.decode(torch.cat([w.input_ids for w in windows]).flatten())
    # the 6 long-question examples are gone, every short one is there
    assert [n for n in range(40) if f"Answer {n}." in text] == list(range(6, 40))
    for w in windows:  # every window predicts something: no update can be all prompt
        assert ((w.labels[:, 1:] != IGNORE).sum(dim=1) > 0).all()
    assert "note: --train_on_responses_only left out" in note and "training examples" in note
    left = sum(int(part.split(" of ")[0].split()[-1]) for part in note.split(" and "))
    assert left == 6 and "Raise --max_seq_length above" in note
    without_flag = prepare_data(args_for(path, "--max_seq_length", "64", "--validation_split_percentage", "10"),
                                tokenizer)
    assert capsys.readouterr().out == ""  # without --train_on_responses_only the prompts are text to learn
    assert len(without_flag.train) > len(data.train)


def test_when_every_prompt_fills_the_window_the_error_says_so_before_training(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", _long_and_short_questions(20, 0))
    with pytest.raises(UsageError, match=r"--train_on_responses_only: the prompt \(question and context\) of every one "
                                         r"of the 19 training examples takes \d+( to \d+)? tokens, the whole window of "
                                         r"--max_seq_length 64 or more.*raise --max_seq_length above \d+"):
        prepare_data(args_for(path, "--max_seq_length", "64", "--train_on_responses_only"), tokenizer)
    with pytest.raises(UsageError, match="every one of the .* validation examples"):  # streaming: the same, up front
        prepare_data(args_for(path, "--max_seq_length", "64", "--train_on_responses_only", "--streaming_data"),
                     tokenizer)


def test_a_stream_with_no_training_text_is_an_error_not_an_endless_run(tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "  "}, {"text": None}] * 5)
    write_jsonl(tmp_path / "validation.jsonl", [{"text": t} for t in medical_sentences(5)])
    data = prepare_data(args_for(tmp_path, "--streaming_data", "--max_steps", "3"), tokenizer)
    with pytest.raises(UsageError, match="no training text left after dropping empty records"):
        next(data.stream(0))
