"""train/demo_assets.py: the embedded default's packaged MedQuAD subset, the fortunes, the split."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import re
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from minilora_train import demo_assets
from minilora_train.demo_assets import (default_general_validation, medquad_dataset_dir, medquad_path, read_fortune_file,
                               read_fortunes, read_medquad, split_holdout, train_tokenizer)


@pytest.fixture(scope="module")
def fortunes():
    return read_fortunes()


def offensive_fortune_files() -> list[Path]:
    dist = importlib.metadata.distribution(demo_assets.FORTUNES_PACKAGE)
    return [Path(dist.locate_file(f)) for f in dist.files or []
            if Path(str(f)).parent.name == "fortune" and str(f).endswith("-o")]


# ---- MedQuAD ----------------------------------------------------------------------------------

def test_packaged_medquad_is_small_attributed_and_split_by_topic():
    assert medquad_path().stat().st_size < 3e6  # "a few MB at most, compressed"
    license_text = (medquad_path().parent / "MEDQUAD-LICENSE.md").read_text()
    assert "CC BY 4.0" in license_text and "Ben Abacha" in license_text
    records = read_medquad()
    assert {r["split"] for r in records} == {"train", "validation", "question"}
    train, validation, questions = (read_medquad(s) for s in ("train", "validation", "question"))
    assert (len(train), len(validation), len(questions)) == (2000, 186, 4)
    assert all(r["question"].endswith("?") and r["answer"].strip() for r in records)
    # Held out by topic: validation and the questions are about conditions training never saw.
    topics = {r["focus"].lower() for r in train}
    assert topics.isdisjoint(r["focus"].lower() for r in validation + questions)
    assert not {r["answer"] for r in train} & {r["answer"] for r in validation + questions}
    with pytest.raises(ValueError, match="split must be one of"):
        read_medquad("test")


def test_packaged_medquad_comes_from_the_collection_word_for_word():
    """Every packaged answer is a MedQuAD answer with only its whitespace normalised (the full
    collection is at ../shared/data on development and CI machines)."""
    with open(SHARED_DATA, encoding="utf-8") as f:
        originals = {" ".join(json.loads(line)["answer"].split()) for line in f}
    assert all(" ".join(r["answer"].split()) in originals for r in read_medquad())


def test_medquad_dataset_dir_is_what_dataset_dir_takes(tmp_path):
    folder = medquad_dataset_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["train.jsonl", "validation.jsonl"]
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert rows[0] == {"question": read_medquad("train")[0]["question"], "answer": read_medquad("train")[0]["answer"]}
    assert len(rows) == 2000
    assert medquad_dataset_dir(tmp_path) == folder  # reused, not rewritten
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_the_general_held_out_text_is_the_fortunes_split_no_run_trains_on(fortunes):
    held_out = default_general_validation()
    assert held_out == split_holdout(fortunes, 0.05, 0)[1]
    assert 0.04 * len(fortunes) < len(held_out) < 0.06 * len(fortunes)


# ---- fortunes ---------------------------------------------------------------------------------

def test_fortunes_leave_out_the_offensive_files(fortunes):
    offensive = offensive_fortune_files()
    assert {p.name for p in offensive} == {"fortunes-o", "murphy-o"}
    assert not any(p.name.endswith("-o") for p in demo_assets.fortune_files())
    offensive_records = {r for p in offensive for r in read_fortune_file(p)}
    assert len(offensive_records) > 2000
    assert offensive_records.isdisjoint(fortunes)
    assert len(fortunes) == sum(len(read_fortune_file(p)) for p in demo_assets.fortune_files())


def test_fortune_attribution_stays_inside_its_record(tmp_path, fortunes):
    path = tmp_path / "sample"
    path.write_text("%% $FreeBSD$\n%\nLine one\n\tindented\n\t\t-- Author, \"Book\"\n%\n"
                    "Second\n%% a comment inside\n%\n\n%\n")
    assert read_fortune_file(path) == [
        'Line one\n        indented\n                -- Author, "Book"', "Second"]

    # The same on the real file: the first record whose last line is a tab-indented attribution.
    main = next(p for p in demo_assets.fortune_files() if p.name == "fortunes")
    raw = next(r for r in main.read_text().split("\n%\n")
               if r.split("\n")[-1].startswith("\t\t-- "))
    assert raw.expandtabs(8) in fortunes
    assert not any("\t" in r for r in fortunes)
    # No tab-indented attribution became a record of its own (zippy has one "-- ... --" record).
    assert not any(re.fullmatch(r" {8,}-- .*", r) for r in fortunes)
    assert not any("$FreeBSD$" in r for r in fortunes)


# ---- split and the benchmark's tokenizer ----------------------------------------------------------------------

def test_split_holdout_is_deterministic_and_disjoint():
    texts = [f"text {i}" for i in range(100)]
    train, val = split_holdout(texts, 0.1, seed=3)
    assert (train, val) == split_holdout(texts, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == sorted(texts)
    assert split_holdout(texts, 0.1, seed=4)[1] != val
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(texts, 1.0, seed=0)


def test_tokenizer_round_trips_and_loads_with_auto_tokenizer(tmp_path, fortunes):
    from transformers import AutoTokenizer

    tokenizer = train_tokenizer(fortunes[:2000], 512, tmp_path / "tok")
    text = "A00.0 Cholera due to Vibrio cholerae\n        -- Ünïcode, tabs\tand  spaces 😀"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == 512

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(text)["input_ids"] == ids
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")
    assert len({loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id}) == 3


def test_train_loop_takes_the_general_text_from_the_assets_not_from_the_demo():
    """No import circle: the loop's forgetting check needs the held-out fortunes, and the demo needs the loop."""
    import ast

    import minilora_train.forgetting.check
    import minilora_train.loop

    def imported(module) -> set:
        tree = ast.parse(Path(module.__file__).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}

    assert "demo" not in imported(minilora_train.loop)
    check = imported(minilora_train.forgetting.check)
    assert "demo_assets" in check and "demo" not in check
