"""Evaluation of a base model, an adapter, or a merged model: perplexity on held-out windows,
multiple-choice medical questions scored by log-likelihood, and general-capability prompts
for a person to read (did the adapter make the model forget how to write?).

    from minilora_train.evaluate import perplexity, score_multiple_choice, load_multiple_choice
    perplexity(model, windows.input_ids, windows.labels)          # {loss, perplexity, tokens}
    score_multiple_choice(model, tokenizer, load_multiple_choice(DEFAULT_MC_FILE))

Command line: ``minilora-eval --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Optional, Sequence, Union

import torch

import minilora
from minilora_train.command import quiet_start, require_app_packages, run_command
from minilora_train.device import inference_device
from minilora_train.inference import (add_model_arguments, eval_mode, generate_texts, model_device, model_from_args,
                                      pad_rows)
from minilora_train.loss import nll_result, next_token_nll, predicted_tokens

DEFAULT_MC_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "medical_mc.jsonl")
MC_CATEGORIES = ("medical_terminology", "diagnostic_reasoning", "treatment_recommendations", "safety_responses")

# General-capability checks: everyday tasks that a model fine-tuned on medical text should still do.
GENERAL_PROMPTS = (
    "Explain the concept of photosynthesis",
    "Write a short story about friendship",
    "Solve this math problem: 2x + 5 = 13",
    "Translate 'Hello world' to Spanish",
)


# -- perplexity ---------------------------------------------------------------------------------

def perplexity(model, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, batch_size: int = 8,
               device: Union[str, torch.device, None] = None) -> dict:
    """Mean token negative log-likelihood over fixed windows, as a causal LM's loss counts it.

    Args:
        input_ids: (N, L) int64 token windows.
        labels: (N, L) int64, ``-100`` where a token is not predicted (prompt masking, padding);
            default ``input_ids``. Position t's logits predict ``labels[:, t + 1]``, so the first
            label of every window is never scored.
        batch_size: windows per forward pass; the (batch, L, vocab) float32 logits are the
            memory peak, so lower it for large vocabularies.
        device: where the windows are sent; default the model's device (the model is not moved).

    Returns ``{"loss": sum NLL / tokens (nats), "perplexity": exp(loss), "tokens": tokens}``,
    exact over the whole set (not a mean of per-batch means).
    """
    labels = input_ids if labels is None else labels
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"input_ids and labels must both be (N, L); got {tuple(input_ids.shape)} and "
                         f"{tuple(labels.shape)}")
    device = model_device(model) if device is None else inference_device(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with torch.inference_mode(), eval_mode(model):
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            targets = labels[start:start + batch_size].to(device)  # (B, L)
            total += next_token_nll(model(input_ids=ids).logits, targets).double()
            count += predicted_tokens(targets)
    # The one host sync of the evaluation (on XLA this also runs the accumulated graph).
    total, count = total.item(), int(count.item())
    if count == 0:
        raise ValueError("no token is predicted: every label after the first position of each window is -100")
    return nll_result(total, count)


# -- multiple choice ----------------------------------------------------------------------------

def load_multiple_choice(path: str = DEFAULT_MC_FILE) -> list[dict]:
    """Items from a JSONL file (local path or fsspec URL), one JSON object a line:

        {"prompt": "Question: What does 'tachycardia' mean?\\nAnswer:",
         "choices": ["a fast heart rate", "a slow heart rate", ...],
         "answer": 0,                       # index into choices, or the correct choice's text
         "category": "medical_terminology"} # optional, default "general"

    Blank lines are skipped; other fields (an ``id``, a source) are kept. Raises ValueError
    naming the file and line of the first bad item. Returned items have ``answer`` as an index.
    """
    import fsspec

    items = []
    with fsspec.open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            items.append(check_item(raw, where))
    if not items:
        raise ValueError(f"{path} holds no items; expected one JSON object a line")
    return items


def check_item(item, where: str) -> dict:
    """A copy of ``item`` with ``answer`` as an index and ``category`` filled in, or ValueError."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object with prompt, choices, answer; got {type(item).__name__}")
    missing = [k for k in ("prompt", "choices", "answer") if k not in item]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}; every item needs prompt (text), choices "
                         "(list of texts) and answer (index or choice text)")
    prompt, choices, answer = item["prompt"], item["choices"], item["answer"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: prompt must be non-empty text")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise ValueError(f"{where}: choices must be a list of at least two non-empty texts")
    if len(set(choices)) != len(choices):
        raise ValueError(f"{where}: choices repeat; each choice must be different")
    if isinstance(answer, str):
        if answer not in choices:
            raise ValueError(f"{where}: answer {answer!r} is not one of the choices {choices!r}")
        answer = choices.index(answer)
    elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer={answer!r}; give an index 0..{len(choices) - 1} or the choice's text")
    category = item.get("category", "general")
    if not isinstance(category, str) or not category:
        raise ValueError(f"{where}: category must be non-empty text")
    return {**item, "answer": answer, "category": category}


def score_multiple_choice(model, tokenizer, items: Sequence[dict], *, normalize: str = "sum") -> dict:
    """Pick, for each item, the choice the model finds most likely after the prompt.

    Each choice is appended to the prompt (after one space, unless the prompt ends or the
    choice starts with whitespace); prompt and prompt+choice are tokenised and only the tokens
    past their common prefix are scored, so a token merging across the boundary counts as
    part of the choice. Score = summed log-probability of those tokens (``normalize="sum"``,
    which favours short choices: keep choices of similar length) or their mean
    (``normalize="mean"``, per token). Ties go to the earlier choice.

    Returns ``{"accuracy", "per_category": {cat: {"accuracy", "n"}}, "items": [{"prediction",
    "answer", "correct", "category", "logprobs"}]}``; prediction and answer are indices and
    ``logprobs`` holds every choice's score.
    """
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize={normalize!r}; use 'sum' (total log-likelihood) or 'mean' (per token)")
    results = []
    for i, raw in enumerate(items):
        item = check_item(raw, f"item {i}")
        scores = [s / n if normalize == "mean" else s
                  for s, n in _choice_logprobs(model, tokenizer, item["prompt"], item["choices"])]
        prediction = max(range(len(scores)), key=lambda k: (scores[k], -k))
        results.append({"prediction": prediction, "answer": item["answer"], "correct": prediction == item["answer"],
                        "category": item["category"], "logprobs": scores})
    if not results:
        raise ValueError("no items to score")
    per_category: dict[str, dict] = {}
    for r in results:
        per_category.setdefault(r["category"], []).append(r["correct"])
    per_category = {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(per_category.items())}
    return {"accuracy": sum(r["correct"] for r in results) / len(results), "per_category": per_category,
            "items": results}


def _choice_logprobs(model, tokenizer, prompt: str, choices: Sequence[str]) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each choice's continuation tokens, all choices
    of the item in one right-padded batch."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    rows, starts = [], []
    for choice in choices:
        sep = "" if prompt[-1:].isspace() or choice[:1].isspace() else " "
        full = tokenizer(prompt + sep + choice)["input_ids"]
        start = _common_prefix(prompt_ids, full)
        if start == len(full):
            raise ValueError(f"choice {choice!r} adds no tokens to the prompt")
        rows.append(full)
        starts.append(max(start, 1))  # the first token has no context to predict it from
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked, so any id works
    ids, mask = pad_rows(rows, pad, side="right", device=model_device(model))  # (C, W) each
    # no_grad, not inference_mode: a model sharded with FSDP2 (a run under torchrun --fsdp scores
    # these questions too) reshards in place after each layer, which inference tensors forbid
    with torch.no_grad(), eval_mode(model):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (C, W, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
        token_logprobs = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()  # (C, W-1)
    return [(float(token_logprobs[i, start - 1:len(row) - 1].sum()), len(row) - start)
            for i, (row, start) in enumerate(zip(rows, starts))]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- general capabilities -----------------------------------------------------------------------

def general_generations(model, tokenizer, prompts: Optional[Sequence[str]] = None, max_new_tokens: int = 100,
                        **options) -> list[dict]:
    """``[{"prompt", "response"}]`` for the four general tasks of GENERAL_PROMPTS (or ``prompts``), greedy
    by default: not scored, for a person to compare before and after fine-tuning."""
    prompts = list(GENERAL_PROMPTS if prompts is None else prompts)
    responses = generate_texts(model, tokenizer, prompts, max_new_tokens, **options)
    return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]


# -- command line -------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="minilora-eval", description=(
        "Evaluate a base model, an adapter, or a merged model: perplexity on a dataset, multiple-choice "
        "medical questions, and general-capability generations."))
    add_model_arguments(parser)
    parser.add_argument("--compare_base", action="store_true",
                        help="also evaluate the base model (adapter disabled) and show both columns")
    parser.add_argument("--dataset_dir", help="dataset for perplexity (any path or format the trainer reads)")
    parser.add_argument("--dataset_format", help="format of --dataset_dir when it cannot be inferred")
    parser.add_argument("--max_seq_length", type=int, default=512, help="window length for perplexity")
    parser.add_argument("--max_windows", type=int, help="evaluate only the first N windows")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--mc_file", default=DEFAULT_MC_FILE,
                        help="multiple-choice JSONL (default: the shipped medical set)")
    parser.add_argument("--skip_mc", action="store_true", help="skip the multiple-choice questions")
    parser.add_argument("--mc_normalize", choices=("sum", "mean"), default="sum",
                        help="score choices by summed (default) or per-token mean log-likelihood")
    parser.add_argument("--general_prompts", action="store_true",
                        help="also generate answers to four general-capability prompts (an explanation, a story, "
                             "an equation, a translation)")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="for --general_prompts")
    parser.add_argument("--output_json", help="write all results here")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    require_app_packages(parser.prog)
    quiet_start(args.device, auto_picks_xla=False)
    if args.compare_base and (args.adapter is None or args.merge):
        parser.error("--compare_base needs --adapter and no --merge (a merged model has no base to fall back to)")

    def evaluate() -> int:
        for flag in ("max_seq_length", "batch_size", "max_new_tokens", "max_windows"):
            value = getattr(args, flag)
            if value is not None and value < (2 if flag == "max_seq_length" else 1):
                raise ValueError(f"--{flag} must be at least {2 if flag == 'max_seq_length' else 1}, got {value}")

        items = None if args.skip_mc else load_multiple_choice(args.mc_file)  # fail on a bad file before loading a model
        model, tokenizer = model_from_args(args)
        windows = None
        if args.dataset_dir:
            from minilora_train.data import load_windows  # the trainer's reader, so evaluation sees the data as training did

            windows = load_windows(args.dataset_dir, tokenizer, args.max_seq_length, dataset_format=args.dataset_format)

        label = "merged" if args.merge else ("adapter" if args.adapter else "base")
        variants = {label: contextlib.nullcontext}
        if args.compare_base:
            variants = {"base": lambda: minilora.disable_adapters(model), **variants}
        if windows is not None:
            ids, labels = windows.input_ids[:args.max_windows], windows.labels[:args.max_windows]

        results = {}
        for name, context in variants.items():
            with context():
                result = {}
                if windows is not None:
                    result["perplexity"] = perplexity(model, ids, labels, args.batch_size)
                if items is not None:
                    result["multiple_choice"] = score_multiple_choice(model, tokenizer, items, normalize=args.mc_normalize)
                if args.general_prompts:
                    result["general"] = general_generations(model, tokenizer, max_new_tokens=args.max_new_tokens)
                results[name] = result

        report = {"base_model": args.base_model, "adapter": args.adapter, "merged": args.merge,
                  "dataset_dir": args.dataset_dir, "windows": list(ids.shape) if windows is not None else None,
                  "mc_file": None if args.skip_mc else args.mc_file, "mc_normalize": args.mc_normalize,
                  "results": results}
        print(format_report(report))
        if args.output_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
            with open(args.output_json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
            print(f"wrote {args.output_json}")
        return 0

    return run_command("minilora-eval", argv, evaluate, errors=(ValueError,))


def format_report(report: dict) -> str:
    """A plain-text table of ``main``'s report, one column per variant (base / adapter / merged)."""
    results = report["results"]
    names = list(results)
    first = results[names[0]]
    lines = []

    def row(label: str, values: list[str]) -> None:
        lines.append(f"  {label:<34}" + "".join(f"{v:>10}" for v in values))

    if "perplexity" in first:
        count, length = report["windows"]
        lines.append(f"Perplexity on {report['dataset_dir']} ({count} windows of {length} tokens, "
                     f"{first['perplexity']['tokens']:,d} predicted)")
        row("", names)
        row("loss (nats/token)", [f"{results[n]['perplexity']['loss']:.4f}" for n in names])
        row("perplexity", [f"{results[n]['perplexity']['perplexity']:.3f}" for n in names])
    if "multiple_choice" in first:
        mc = first["multiple_choice"]
        lines.append(f"Multiple choice: {report['mc_file']} ({len(mc['items'])} items, "
                     f"{report['mc_normalize']} log-likelihood)")
        row("", names)
        row("accuracy", [f"{results[n]['multiple_choice']['accuracy']:.1%}" for n in names])
        for category, stats in mc["per_category"].items():
            row(f"{category} ({stats['n']})",
                [f"{results[n]['multiple_choice']['per_category'][category]['accuracy']:.1%}" for n in names])
    if "general" in first:
        lines.append("General-capability prompts (read them: fluent, on topic, correct?)")
        for n in names:
            for g in results[n]["general"]:
                lines.append(f"  [{n}] {g['prompt']}\n      -> {g['response'].strip()}")
    return "\n".join(lines) or "nothing to evaluate: give --dataset_dir, --general_prompts, or drop --skip_mc"


if __name__ == "__main__":
    sys.exit(main())
