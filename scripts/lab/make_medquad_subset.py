"""Write train/assets/medquad.jsonl.gz, the embedded demo's medical data, from MedQuAD.

    python scripts/lab/make_medquad_subset.py /path/to/medquad.jsonl

The input is MedQuAD as one JSON object a line (``source``, ``focus``, ``question``, ``answer``;
Ben Abacha and Demner-Fushman, BMC Bioinformatics 20:511, 2019; CC BY 4.0). The output holds the
same fields plus ``split``: ``train``, ``validation`` or ``question``. Whole topics (``focus``)
are held out, so validation answers and the held-out questions are about conditions the
fine-tuning never saw. The output is byte-for-byte reproducible (fixed seed, gzip mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "train" / "assets" / "medquad.jsonl.gz"
SEED = 0
TRAIN_RECORDS = 2000
VALIDATION_RECORDS = 160
# Held-out questions shown before/after fine-tuning: common conditions a reader can judge, one
# question each; every record about these topics is left out of training and validation.
QUESTIONS = [("Glaucoma", "What is (are) Glaucoma ?"), ("Shingles", "What are the treatments for Shingles ?"),
             ("Celiac Disease", "What causes Celiac Disease ?"), ("Gout", "What are the symptoms of Gout ?")]
# Answers kept for training and validation: long enough to say something, short enough that a record
# spans a few 128-token windows, not dozens.
MIN_CHARS, MAX_CHARS = 200, 1200


def clean_question(text: str) -> str:
    """MedQuAD's questions end in " ?" ("Who is at risk for X? ?", and "Do you have information
    about X" in none); one "?" reads as a question."""
    text = " ".join(text.split())
    return re.sub(r"\s*\?(\s*\?)*$", "", text) + "?"


def clean_answer(text: str) -> str:
    """Lines stripped, runs of blank lines (MedQuAD's " \\n \\n " between paragraphs) made one."""
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def usable(record: dict) -> bool:
    """Prose answers only: the GARD symptom tables (Human Phenotype Ontology lists) and the
    'what research is being done' pages are boilerplate around a list."""
    answer = record["answer"]
    return (MIN_CHARS <= len(answer) <= MAX_CHARS and "Human Phenotype Ontology" not in answer
            and not record["question"].lower().startswith("what research"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("medquad", help="MedQuAD as JSON lines")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    records = []
    with open(args.medquad, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            records.append({"source": r["source"], "focus": r["focus"].strip(),
                            "question": clean_question(r["question"]), "answer": clean_answer(r["answer"])})

    held = {focus.lower() for focus, _ in QUESTIONS}
    questions = []
    for focus, question in QUESTIONS:
        matches = [r for r in records if r["focus"] == focus and r["question"] == clean_question(question)]
        if not matches:
            raise SystemExit(f"{question!r} about {focus} is not in {args.medquad}")
        questions.append({**matches[0], "split": "question"})  # the first source in MedQuAD order

    rng = random.Random(SEED)
    topics = sorted({r["focus"].lower() for r in records} - held)
    rng.shuffle(topics)
    by_topic: dict[str, list[dict]] = {}
    for r in records:
        if r["focus"].lower() not in held and usable(r):
            by_topic.setdefault(r["focus"].lower(), []).append(r)
    validation, train = [], []
    for topic in topics:  # whole topics: validation first until it is full, then training
        target = validation if len(validation) < VALIDATION_RECORDS else train
        target.extend(by_topic.get(topic, []))
    rng.shuffle(train)
    train = train[:TRAIN_RECORDS]

    rows = ([{**r, "split": "train"} for r in train] + [{**r, "split": "validation"} for r in validation]
            + questions)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    Path(args.out).write_bytes(buffer.getvalue())
    print(f"{args.out}: {len(train)} train, {len(validation)} validation, {len(questions)} questions; "
          f"{len(buffer.getvalue()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
