"""Training data: read records, format them, tokenise once, pack into fixed windows.

Every batch the loop sees has the same shape, (batch, max_seq_length), the last one included
(it is filled with rows whose labels are all -100), so XLA compiles the step once.
"""

from __future__ import annotations

import collections
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .chat import chat_parts
from .config import UsageError
from .loss import IGNORE
MEDICAL_TEMPLATE = "### Medical Context:\n{context}\n\n### Question:\n{question}\n\n### Response:\n"
QUESTION_TEMPLATE = "### Question:\n{question}\n\n### Response:\n"
RESPONSE_FIELDS = ("response", "answer")
EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
              ".csv": "csv", ".md": "text"}
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "eval": "validation"}


@dataclass
class Windows:
    """Packed token windows: ``input_ids`` and ``labels`` are (N, L) int64; labels are -100
    where no loss is taken (padding, prompts under --train_on_responses_only)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def real_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class TrainData:
    train: Optional[Windows]          # map-style data, all windows in memory
    stream: Optional[Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]]  # streaming: epoch -> windows
    validation: Windows


# -- reading ------------------------------------------------------------------------------------

def format_prompt(question: str, context: Optional[str] = None) -> str:
    """The medical question template up to the response (what a model is prompted with)."""
    if context:
        return MEDICAL_TEMPLATE.format(context=context.strip(), question=question.strip())
    return QUESTION_TEMPLATE.format(question=question.strip())


def record_kind(columns: list[str], where: str) -> str:
    """'text' or 'qa' from a dataset's column names; anything else is a usage error."""
    if "text" in columns:
        return "text"
    if "question" in columns and any(c in columns for c in RESPONSE_FIELDS):
        return "qa"
    raise UsageError(f"{where}: records need a 'text' field, or 'question' and 'response' (optionally "
                     f"'context') fields; found columns: {', '.join(columns) or '(none)'}")


def record_parts(record: dict, kind: str, chat_tokenizer=None) -> tuple[str, str]:
    """(prompt, response) of one record; for plain text the prompt is empty. With
    ``chat_tokenizer`` (--chat_template) a question/response record goes through its chat template."""
    if kind == "text":
        text = record.get("text")
        return "", text if isinstance(text, str) else ""
    question = record.get("question")
    response = next((record[c] for c in RESPONSE_FIELDS if isinstance(record.get(c), str)), "")
    if not isinstance(question, str) or not question.strip() or not response.strip():
        return "", ""
    context = record.get("context")
    context = context if isinstance(context, str) else None
    if chat_tokenizer is not None:
        return chat_parts(chat_tokenizer, question, context, response)
    return format_prompt(question, context), response.strip()


def _local_copy(path: str, tmp_dir: Optional[str], storage_options: Optional[dict] = None) -> str:
    """A local path for ``path``: itself if local, else a download into a scratch folder."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        if not os.path.exists(root):
            raise UsageError(f"--dataset_dir {path}: no such file or directory")
        return root
    if not fs.exists(root):
        raise UsageError(f"--dataset_dir {path}: nothing there (checked with fsspec)")
    local = tempfile.mkdtemp(prefix="minilora-data-", dir=tmp_dir)
    target = os.path.join(local, os.path.basename(root.rstrip("/")) or "data")
    if fs.isdir(root):
        fs.get(root.rstrip("/") + "/", target + "/", recursive=True)
    else:
        fs.get(root, target)
    return target


def _data_files(root: str, dataset_format: Optional[str]) -> tuple[str, dict[str, list[str]]]:
    """(datasets builder name, {split: files}) for a file or a directory of files."""
    if os.path.isfile(root):
        files = [root]
    else:
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                       if not n.startswith(".") and (dataset_format or os.path.splitext(n)[1].lower() in EXTENSIONS))
    if not files:
        raise UsageError(f"--dataset_dir {root}: no data files found (looked for {', '.join(sorted(EXTENSIONS))})")
    if dataset_format:
        builder = "json" if dataset_format == "jsonl" else dataset_format
    else:
        kinds = {EXTENSIONS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise UsageError(f"--dataset_dir {root}: cannot tell the format from the file names "
                             f"({', '.join(os.path.basename(f) for f in files[:5])}); pass --dataset_format")
        builder = kinds.pop()
    if os.path.isfile(root):
        return builder, {"train": files}  # one file named directly is the data, whatever its name
    splits: dict[str, list[str]] = {}
    for f in files:
        stem = os.path.splitext(os.path.relpath(f, root if os.path.isdir(root) else os.path.dirname(root)))[0]
        words = [w for part in stem.replace("-", "_").replace(os.sep, "_").split("_") for w in [part.lower()]]
        split = next((SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS), None)
        if split is None and "test" in words:
            continue  # a test split is not for training or validation
        splits.setdefault(split or "train", []).append(f)
    if "train" not in splits:
        found = ", ".join(os.path.relpath(f, root) for f in files[:5])
        raise UsageError(f"--dataset_dir {root}: no training files; found only {found}, whose names mark them as "
                         + (", ".join(f"{k} files" for k in splits) or "test files")
                         + " (a file whose name has none of validation, valid, val, dev, eval or test is for training)")
    return builder, splits


def reader_of(dataset_dir: str, dataset_format: Optional[str]) -> Optional[str]:
    """The reader (json, text, parquet, csv) ``load_records`` uses for local files: --dataset_format,
    or the one the file names give; None for a saved `datasets` folder or a remote URL."""
    if "://" in dataset_dir or not os.path.exists(dataset_dir) or any(
            os.path.exists(os.path.join(dataset_dir, name)) for name in ("dataset_dict.json", "state.json")):
        return None
    return _data_files(dataset_dir, dataset_format)[0]


def load_records(dataset_dir: str, *, dataset_format: Optional[str] = None, streaming: bool = False,
                 tmp_dir: Optional[str] = None, storage_options: Optional[dict] = None):
    """The records by split: {'train': ..., maybe 'validation': ...}.

    JSON, JSON lines and text files, not streamed, are read here (the json module) into
    ``Records``: the common case, and the cheap one, since the `datasets` library and pyarrow
    stay resident once imported and here they never are. A folder saved with ``save_to_disk``,
    parquet and csv files, and every --streaming_data input go through `datasets` (a
    (Iterable)DatasetDict). Either way the rows, their order, their columns and the held-out
    split are the same."""
    root = _local_copy(dataset_dir, tmp_dir, storage_options)
    if os.path.isdir(root) and (os.path.exists(os.path.join(root, "dataset_dict.json"))
                                or os.path.exists(os.path.join(root, "state.json"))):
        import datasets

        try:
            loaded = datasets.load_from_disk(root)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged state.json or dataset_dict.json
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--dataset_dir {dataset_dir}: a folder saved by datasets' save_to_disk that cannot be "
                             f"read ({type(e).__name__}: {first}); save it again") from None
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict(train=loaded)
        loaded = datasets.DatasetDict({SPLIT_WORDS.get(k, k): v for k, v in loaded.items()})
        return loaded.to_iterable_dataset() if streaming and hasattr(loaded, "to_iterable_dataset") else loaded
    builder, splits = _data_files(root, dataset_format)
    for files in splits.values():
        for f in files:
            if os.path.getsize(f) == 0:
                raise UsageError(f"{f} is empty (0 bytes); remove it or give a file holding records")
    if builder in ("json", "text") and not streaming:
        return _read_records(builder, splits)
    if builder == "json":
        kinds = _RecordKinds()  # one for all files: their columns are merged, per split and across them
        for files in splits.values():
            for f in files:
                collections.deque(_json_records(f, kinds), maxlen=0)  # checks every record, keeps none
    else:
        for files in splits.values():
            for f in files:
                _check_utf8(f)
    import datasets

    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=splits, streaming=streaming,
                                     cache_dir=os.path.join(tmp_dir, "hf-datasets") if tmp_dir else None, **extra)
    except Exception as e:  # datasets wraps parser errors; say which input is at fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--dataset_dir {dataset_dir}: could not read it as {builder}: {first}") from None


class Records:
    """One split of records read by this module (``_read_records``): equal-length column lists,
    with the part of ``datasets.Dataset`` that the rest of this module uses, so both readers'
    splits go through the same code."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, rows: slice) -> dict[str, list]:
        """A slice of rows as {column: values}, as ``datasets.Dataset[a:b]`` gives it."""
        return {name: values[rows] for name, values in self.columns.items()}

    def select(self, indices) -> "Records":
        return Records({name: [values[i] for i in indices] for name, values in self.columns.items()})

    def train_test_split(self, test_size: int, seed: int) -> dict[str, "Records"]:
        """``test_size`` records held out at random: the records, in the order, that
        ``datasets.Dataset.train_test_split(test_size=test_size, seed=seed)`` picks (the same
        numpy permutation), so a run holds out the same validation whichever reader read it."""
        permutation = np.random.default_rng(seed).permutation(len(self))
        return {"train": self.select(permutation[test_size:]), "test": self.select(permutation[:test_size])}


def _read_records(builder: str, splits: dict[str, list[str]]) -> dict[str, Records]:
    """JSON (lines) or text files by split, read with the json module: the rows `datasets` would
    give, in the same order. Every split has the columns of every file, in the order they first
    appear; a record without one holds None there (datasets fills in null the same way, but
    refuses a column that only a later file has, which is merged here)."""
    kinds = _RecordKinds()  # one for all files, as for datasets
    rows = {split: [record for f in files for record in (_json_records(f, kinds) if builder == "json"
                                                          else _text_records(f))]
            for split, files in splits.items()}
    names = list(dict.fromkeys(name for records in rows.values() for record in records for name in record))
    return {split: Records({name: [record.get(name) for record in records] for name in names})
            for split, records in rows.items()}


def _text_records(path: str) -> Iterator[dict]:
    """A text file's paragraphs (split at blank lines) as {'text': ...} records, as `datasets`'
    text reader gives them with sample_by='paragraph': every line end read as a newline, empty
    paragraphs left out, the rest as they are. A byte-order mark is not text and is dropped
    (datasets kept it as the first character)."""
    _check_utf8(path)
    with open(path, encoding="utf-8-sig") as f:  # universal newlines, as datasets' reader opens it
        for paragraph in f.read().split("\n\n"):
            if paragraph:
                yield {"text": paragraph}


def _check_utf8(path: str) -> None:
    if path.endswith(".parquet"):
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                 "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _json_records(path: str, kinds: "_RecordKinds") -> Iterator[dict]:
    """The records of a JSON lines file (or of one JSON array), each checked. A malformed line is
    reported with its file and line number (datasets' own error is not), and so is a record whose
    fields differ from the first usable one's: the missing field would be null and the record
    would vanish as if it were empty."""
    _check_utf8(path)
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows exports) is fine, as for datasets
        head = _first_visible_character(f)
        f.seek(0)
        if head == "[":  # one JSON array (pretty-printed ones start with a line end or spaces), not JSON lines
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            except RecursionError:
                raise UsageError(f"{path}: JSON nested too deeply to read; records are flat objects") from None
            for number, value in enumerate(records if isinstance(records, list) else [], 1):
                kinds.check(value, f"{path}: record {number}")
                yield value
            return
        first = True  # no line parsed yet: a pretty-printed object fails on its first line, "{"
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    if first and head == "{" and _is_one_json_object(path):
                        raise UsageError(f"{path}: holds one JSON object spread over several lines, not records; "
                                         "give JSON lines (one object per line) or a JSON array of objects (records "
                                         "kept under a key, say 'data', come out as JSON lines with: "
                                         "jq -c '.data[]')") from None
                    raise UsageError(f"{path}:{number}: malformed JSON line ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise UsageError(f"{path}:{number}: JSON nested too deeply to read; each line is one flat "
                                     "object such as {\"text\": \"...\"}") from None
                if not isinstance(value, dict):
                    raise UsageError(f"{path}:{number}: each JSON line must be an object, found {type(value).__name__}")
                kinds.check(value, f"{path}:{number}")
                first = False
                yield value


def _first_visible_character(f) -> str:
    """The first character of text file ``f`` that is not white space ("" for none), read a block at a time."""
    while block := f.read(1 << 16):
        if block.strip():
            return block.lstrip()[0]
    return ""


def _is_one_json_object(path: str) -> bool:
    """Whether the whole file parses as one JSON object (asked only when its first line did not parse)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return isinstance(json.load(f), dict)
    except (ValueError, RecursionError):
        return False


class _RecordKinds:
    """Every record of a dataset has the fields of the first one that has usable fields ('text', or
    'question' with 'response'/'answer'), and those fields hold text (or null: an empty record)."""

    def __init__(self):
        self.kind, self.first = None, None
        self.unusable = None  # (where, record) of the first record without usable fields

    def check(self, record, where: str) -> None:
        if not isinstance(record, dict):
            raise UsageError(f"{where}: each record must be an object, found {type(record).__name__}")
        kind = "text" if "text" in record else "qa" if "question" in record and any(
            c in record for c in RESPONSE_FIELDS) else None
        fields = ("text",) if kind == "text" else ("question", *RESPONSE_FIELDS, "context")
        for name in fields:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{where}: {name!r} holds {type(value).__name__} {json.dumps(value)[:40]}; it must be "
                                 "text (in quotes) or null")
        if kind is None:  # fine only if no record has usable fields (then record_kind lists the columns)
            self.unusable = self.unusable or (where, record)
        elif self.kind is None:
            self.kind, self.first = kind, where
        if self.kind is None or kind == self.kind and self.unusable is None:
            return
        bad_where, bad = (where, record) if kind not in (None, self.kind) or self.unusable is None else self.unusable
        wanted = "a 'text' field" if self.kind == "text" else "'question' and 'response' fields"
        raise UsageError(f"{bad_where}: this record has other fields (found: {', '.join(bad) or 'none'}) than the "
                         f"record at {self.first}, which has {wanted}; give every record the same fields (a record "
                         "without them would be dropped silently)")


# -- tokenising and packing ---------------------------------------------------------------------

class Packer:
    """Turns records into (ids, labels) token streams and cuts them into fixed windows.

    Each document becomes [bos] + tokens + [eos]; documents follow each other with no padding,
    so only the very last window of a split can hold padding.

    With --train_on_responses_only a question/response example whose prompt alone fills a window
    (``max_seq_length`` tokens or more) is left out: none of its answer tokens could be learned
    with its question in view, only after a fragment of it. ``examples`` and ``left_out`` count
    them (``left_out_lengths``: the shortest and longest such prompt), for the run to say so.
    """

    def __init__(self, tokenizer, max_seq_length: int, responses_only: bool = False, chat_template: bool = False):
        self.tokenizer, self.length, self.responses_only = tokenizer, max_seq_length, responses_only
        self.chat = chat_template  # question/response records through the chat template, which has its own bos/eos
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.examples, self.left_out, self.left_out_lengths = 0, 0, (math.inf, 0)

    def encode(self, records: list[dict], kind: str) -> list[tuple[list[int], list[int]]]:
        chat = self.chat and kind == "qa"
        parts = [record_parts(r, kind, self.tokenizer if chat else None) for r in records]
        parts = [(p, t) for p, t in parts if t.strip()]
        if not parts:
            return []
        tok = self.tokenizer
        prompts = tok([p for p, _ in parts], add_special_tokens=False)["input_ids"]
        texts = tok([t for _, t in parts], add_special_tokens=False)["input_ids"]
        masked = self.responses_only and kind == "qa"
        out = []
        for prompt_ids, text_ids in zip(prompts, texts):
            head = ([self.bos] if self.bos is not None and not chat else []) + prompt_ids
            if masked:
                self.examples += 1
                if len(head) >= self.length:
                    self.left_out += 1
                    shortest, longest = self.left_out_lengths
                    self.left_out_lengths = (min(shortest, len(head)), max(longest, len(head)))
                    continue
            ids = head + text_ids + ([self.eos] if self.eos is not None and not chat else [])
            labels = ([IGNORE] * len(head) if masked else list(head)) + text_ids + ids[len(head) + len(text_ids):]
            out.append((ids, labels))
        return out

    def windows(self, docs: Iterator[tuple[list[int], list[int]]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Fixed windows, (L,) int64 ids and labels each, from a document stream; the final partial
        window is padded. A window that predicts nothing (every label after its first is -100: a
        stretch of prompt under --train_on_responses_only) is left out: it would add no loss and
        no gradient, and an update made only of such windows would have no loss to log.

        Linear in the number of tokens, however long a document: tokens gather in a list until
        at least one window is full, all full windows are then cut from one array at once, and
        only the rest, under L tokens, is carried on. (Deleting each window's tokens from the
        head of the list instead moves everything behind them: quadratic in a document's length.)"""
        L = self.length
        ids_buf: list[int] = []
        lab_buf: list[int] = []
        for ids, labels in docs:
            ids_buf += ids
            lab_buf += labels
            if len(ids_buf) < L:
                continue
            full = len(ids_buf) // L * L
            ids_rows = np.asarray(ids_buf, np.int64)[:full].reshape(-1, L)  # (windows, L)
            lab_rows = np.asarray(lab_buf, np.int64)[:full].reshape(-1, L)
            ids_buf, lab_buf = ids_buf[full:], lab_buf[full:]
            for row in np.flatnonzero((lab_rows[:, 1:] != IGNORE).any(axis=1)):
                yield ids_rows[row], lab_rows[row]
        if any(label != IGNORE for label in lab_buf[1:]):  # only if a prediction remains
            pad = L - len(ids_buf)
            yield (np.asarray(ids_buf + [self.pad] * pad, np.int64), np.asarray(lab_buf + [IGNORE] * pad, np.int64))

    def pack_texts(self, texts: list[str]) -> Windows:
        return self.pack({"text": list(texts)}, "text")

    def pack(self, dataset, kind: str, batch: int = 1000) -> Windows:
        """``dataset``: a datasets.Dataset or a dict of equal-length column lists."""
        n = len(next(iter(dataset.values()))) if isinstance(dataset, dict) else len(dataset)

        def docs():
            for start in range(0, n, batch):
                rows = ({k: v[start:start + batch] for k, v in dataset.items()} if isinstance(dataset, dict)
                        else dataset[start:start + batch])
                records = [dict(zip(rows, values)) for values in zip(*rows.values())]
                yield from self.encode(records, kind)

        pairs = list(self.windows(docs()))
        if not pairs:
            return Windows(torch.empty(0, self.length, dtype=torch.long), torch.empty(0, self.length, dtype=torch.long))
        return Windows(torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))


def prepare_data(args, tokenizer, dataset_dir: Optional[str] = None) -> TrainData:
    """Load, split, tokenise and pack the run's data (see TrainArgs for the settings used)."""
    dataset_dir = dataset_dir or args.dataset_dir
    records = load_records(dataset_dir, dataset_format=args.dataset_format, streaming=args.streaming_data,
                           tmp_dir=args.tmp_dir)
    packers = {split: Packer(tokenizer, args.max_seq_length, args.train_on_responses_only, args.chat_template)
               for split in ("training", "validation")}  # one each: each counts what it left out
    train = records["train"]
    columns = _columns(train)
    kind = record_kind(columns, dataset_dir)
    if args.streaming_data:
        return _streaming(args, packers, records, kind, dataset_dir)
    if "validation" in records:
        validation = records["validation"]
        record_kind(validation.column_names, f"{dataset_dir} (validation)")
    else:
        if len(train) < 2:
            raise UsageError(f"--dataset_dir {dataset_dir}: {len(train)} record(s); need at least 2 to hold out validation")
        n_val = max(1, math.ceil(len(train) * args.validation_split_percentage / 100)) if args.validation_split_percentage > 0 else 0
        if n_val == 0:
            raise UsageError("--validation_split_percentage 0 needs a validation split in --dataset_dir")
        if n_val >= len(train):
            raise UsageError(f"--validation_split_percentage {args.validation_split_percentage:g} of {len(train)} "
                             f"records holds out {n_val}, leaving none to train on; lower it or add a validation file")
        split = train.train_test_split(test_size=n_val, seed=args.seed)
        train, validation = split["train"], split["test"]
    train_windows = packers["training"].pack(train, kind)
    val_windows = packers["validation"].pack(validation, kind)
    _say_what_was_left_out(packers)
    if len(train_windows) == 0:
        raise UsageError(f"--dataset_dir {dataset_dir}: no training text left after dropping empty records")
    if len(val_windows) == 0:
        raise UsageError(f"--dataset_dir {dataset_dir}: the validation split holds no text")
    return TrainData(train=train_windows, stream=None, validation=cap_windows(val_windows, args.max_eval_samples))


def _say_what_was_left_out(packers: dict[str, Packer]) -> None:
    """--train_on_responses_only: a UsageError when a split lost every example to prompts that
    fill the window (its loss would have nothing to measure), else one note with the counts."""
    left = {split: p for split, p in packers.items() if p.left_out}
    if not left:
        return
    length = next(iter(left.values())).length

    def lengths(p: Packer) -> str:
        shortest, longest = p.left_out_lengths
        return f"{shortest}" if shortest == longest else f"{shortest} to {longest}"

    for split, p in left.items():
        if p.left_out == p.examples:
            shortest, longest = p.left_out_lengths
            raise UsageError(
                f"--train_on_responses_only: the prompt (question and context) of every one of the {p.examples} "
                f"{split} examples takes {lengths(p)} tokens, the whole window of --max_seq_length {length} or more, "
                f"so no answer token can be learned with its question in view; raise --max_seq_length above {longest}"
                + (f" (above {shortest} keeps some)" if shortest < longest else "")
                + ", or shorten the questions and contexts")
    if os.environ.get("RANK", "0") == "0":  # torchrun: every rank packs the same data; one says so
        counts = " and ".join(f"{p.left_out} of {p.examples} {split} examples" for split, p in left.items())
        longest = max(p.left_out_lengths[1] for p in left.values())
        print(f"note: --train_on_responses_only left out {counts}: their prompts take "
              f"{' / '.join(lengths(p) for p in left.values())} tokens, the whole window of --max_seq_length {length} "
              f"or more, so their answers cannot be learned with their questions in view; training on the rest. "
              f"Raise --max_seq_length above {longest} to keep them", flush=True)


def _streaming(args, packers: dict[str, Packer], records, kind: str, dataset_dir: str) -> TrainData:
    """Streaming: records are shuffled through a buffer and packed on the fly; validation is
    taken from the validation split, or every k-th record when there is none. What
    --train_on_responses_only leaves out of the stream is not known before training: a stream
    left with nothing at all is a UsageError when the first epoch ends empty."""
    import itertools

    every = max(2, round(100 / args.validation_split_percentage)) if args.validation_split_percentage > 0 else 0
    has_val = "validation" in records
    cap = args.max_eval_samples or 1000
    packer = packers["training"]

    def val_docs():
        source = records["validation"] if has_val else (r for i, r in enumerate(records["train"]) if every and i % every == 0)
        for chunk in _chunks(source, 256):
            yield from packers["validation"].encode(chunk, kind)

    pairs = list(itertools.islice(packers["validation"].windows(val_docs()), cap))
    if not pairs:
        _say_what_was_left_out({"validation": packers["validation"]})
        raise UsageError(f"--dataset_dir {dataset_dir}: the validation split holds no text")
    validation = Windows(torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))

    def stream(epoch: int):
        source = records["train"]
        if not has_val and every:
            source = (r for i, r in enumerate(source) if i % every != 0)
            source = _shuffled(source, args.shuffle_buffer_size, args.seed + epoch)
        else:
            source = records["train"].shuffle(buffer_size=args.shuffle_buffer_size, seed=args.seed + epoch)
        docs = (d for chunk in _chunks(source, 256) for d in packer.encode(chunk, kind))
        empty = True
        for ids, labels in packer.windows(docs):
            empty = False
            yield torch.from_numpy(ids), torch.from_numpy(labels)
        if empty:  # else the loop would start epoch after empty epoch, for ever
            _say_what_was_left_out({"training": packer})
            raise UsageError(f"--dataset_dir {dataset_dir}: no training text left after dropping empty records")

    return TrainData(train=None, stream=stream, validation=validation)


def _shuffled(source, buffer_size: int, seed: int):
    """A shuffle buffer over any iterator (datasets' own needs an IterableDataset)."""
    rng = np.random.default_rng(seed)
    buffer = []
    for item in source:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _chunks(source, size: int):
    chunk = []
    for item in source:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _columns(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names:
        return list(names)
    first = next(iter(dataset), None)  # streaming datasets may not know their columns up front
    return list(first) if isinstance(first, dict) else []


def cap_windows(windows: Windows, limit: Optional[int]) -> Windows:
    if limit is None or len(windows) <= limit:
        return windows
    return Windows(windows.input_ids[:limit], windows.labels[:limit])


def load_windows(dataset_dir: str, tokenizer, max_seq_length: int, *, dataset_format: Optional[str] = None,
                 tmp_dir: Optional[str] = None) -> Windows:
    """All text of a dataset (every split) packed into windows: for evaluation."""
    records = load_records(dataset_dir, dataset_format=dataset_format, tmp_dir=tmp_dir)
    packer = Packer(tokenizer, max_seq_length)
    parts = []
    for name, split in records.items():
        parts.append(packer.pack(split, record_kind(split.column_names, f"{dataset_dir} ({name})")))
    ids = torch.cat([p.input_ids for p in parts])
    if len(ids) == 0:
        raise UsageError(f"{dataset_dir}: no text to evaluate on")
    return Windows(ids, torch.cat([p.labels for p in parts]))


# -- batching -----------------------------------------------------------------------------------

def batches(windows: Windows, batch_size: int, pad_id: int, order: Optional[torch.Tensor] = None,
            start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) batches of exactly ``batch_size`` rows, (B, L) each; the final batch is
    completed with rows of padding whose labels are all -100 (they add no loss and no gradient)."""
    n = len(windows)
    order = torch.arange(n) if order is None else order
    for begin in range(start * batch_size, n, batch_size):
        index = order[begin:begin + batch_size]
        ids, labels = windows.input_ids[index], windows.labels[index]
        missing = batch_size - len(index)
        if missing:
            L = windows.input_ids.shape[1]
            ids = torch.cat([ids, torch.full((missing, L), pad_id, dtype=ids.dtype)])
            labels = torch.cat([labels, torch.full((missing, L), IGNORE, dtype=labels.dtype)])
        yield ids, labels


def stream_batches(stream: Iterator[tuple[torch.Tensor, torch.Tensor]], batch_size: int, pad_id: int,
                   length: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of exactly ``batch_size`` windows from a window stream, skipping ``skip`` batches."""
    for number, chunk in enumerate(_chunks(stream, batch_size)):
        if number < skip:
            continue
        ids = torch.stack([c[0] for c in chunk])
        labels = torch.stack([c[1] for c in chunk])
        yield from batches(Windows(ids, labels), batch_size, pad_id)


