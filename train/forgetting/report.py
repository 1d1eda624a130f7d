"""The forgetting report of a run (report.json, report.md, report.png): base against adapted on
the run's own (medical) validation text, on general English, as an assistant (chat drift) and on
the medical multiple-choice questions; with --compare_full_finetune, LoRA beside full fine-tuning,
and which forgot less only where the two adapted comparably."""

from __future__ import annotations

from typing import Optional

from ..outputs import RunDir
from .check import guard_line


def _method_row(summary: dict) -> dict:
    base, final = summary["base"], summary["final"]
    row = {"method": "LoRA" if summary["use_lora"] else "full fine-tuning",
           "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
           "checkpoint_bytes": summary["adapter_bytes"] if summary["use_lora"] else summary["model_bytes"],
           "seconds_per_update": 1 / summary["steps_per_second"] if summary.get("steps_per_second") else None,
           "peak_memory_bytes": summary.get("peak_memory_bytes"),
           "optimizer_state_bytes": summary.get("optimizer_state_bytes"), "updates": summary["updates"],
           "learning_rate": summary.get("learning_rate")}
    chat = summary.get("chat_drift") or {}
    if "drift" in chat:
        row["chat_drift"] = chat["drift"]
    elif chat.get("not_measured"):
        row["chat_drift_note"] = chat["not_measured"]
    for name, label in (("validation", "medical"), ("general", "general")):
        if name in final:
            b, f = base[name]["perplexity"], final[name]["perplexity"]
            row[f"{label}_perplexity_base"] = b
            row[f"{label}_perplexity"] = f
            row[f"{label}_change_percent"] = 100 * (f - b) / b
    choice = summary.get("medical_mc") or {}
    if "text" in choice:
        row["medical_mc_base"], row["medical_mc"] = choice["base"], choice["adapted"]
        row["medical_mc_n"], row["medical_mc_note"] = choice["n"], choice["text"]
    elif choice.get("not_measured"):
        row["medical_mc_note"] = f"Medical multiple choice: {choice['not_measured']}."
    guard = summary.get("forgetting_guard")
    if guard is not None:
        row["guard_share"] = guard.get("share", 0.0)
        row["guard_note"] = guard_line(guard)
    return row


def _mc_cell(value: dict) -> str:
    lo, hi = value["interval"]
    return f"{value['correct']} right ({100 * value['accuracy']:.0f}%; 95% interval {100 * lo:.0f}-{100 * hi:.0f}%)"


# How report.md writes each kind of value
CELL = {"ppl": "{:,.2f}".format, "pct": "{:+.1f}%".format, "bytes": lambda v: f"{v / 1e6:,.2f} MB",
        "lr": "{:.2g}".format, "nats": "{:+.3f}".format, "s": "{:.3f} s".format, "int": "{:,d}".format,
        "share": lambda v: f"{100 * v:.0f}% of the windows" if v else "off", "mc": _mc_cell}


def write_report(run_dir: RunDir, summary: dict, full: Optional[dict] = None) -> dict:
    """report.json, report.md and report.png: base vs adapted perplexity on the run's own
    (medical) validation text and on general English, for LoRA and, if run, full fine-tuning."""
    rows = [_method_row(summary)] + ([_method_row(full)] if full else [])
    paragraphs = _verdict(rows)
    report = {"methods": rows, "note": " ".join(paragraphs)}
    run_dir.write_json("report.json", report)

    def fmt(value, kind):
        return "n/a" if value is None else CELL[kind](value)

    lines = ["# Forgetting report", "",
             "Perplexity of the base model and of the adapted model on the run's validation text (medical) "
             "and on general English held out from all training. Lower is better; a rise on general text is "
             "forgetting. Chat drift (instruct bases): how much less likely the adapted model finds the base's "
             "own answers to everyday requests, in nats per answer token; 0 is unchanged, larger is further away. "
             "Medical multiple choice: questions answered right out of the shipped set, with a 95% interval. "
             "The forgetting guard (instruct bases): the share of training windows that were the base's own "
             "answers to everyday instructions.", "",
             "| | " + " | ".join(r["method"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    table = [("medical perplexity, base", "medical_perplexity_base", "ppl"),
             ("medical perplexity, adapted", "medical_perplexity", "ppl"),
             ("medical change", "medical_change_percent", "pct"),
             ("general perplexity, base", "general_perplexity_base", "ppl"),
             ("general perplexity, adapted", "general_perplexity", "ppl"),
             ("general change (forgetting)", "general_change_percent", "pct"),
             ("chat drift on everyday prompts (nats/token)", "chat_drift", "nats"),
             ("medical multiple choice, base", "medical_mc_base", "mc"),
             ("medical multiple choice, adapted", "medical_mc", "mc"),
             ("forgetting guard (the base's own answers)", "guard_share", "share"),
             ("trainable parameters", "trainable_params", "int"),
             ("checkpoint size", "checkpoint_bytes", "bytes"),
             ("optimizer state", "optimizer_state_bytes", "bytes"),
             ("time per update", "seconds_per_update", "s"),
             ("peak accelerator memory", "peak_memory_bytes", "bytes"),
             ("optimizer updates", "updates", "int"),
             ("peak learning rate", "learning_rate", "lr")]
    for label, key, kind in table:
        if any(key in r for r in rows):
            lines.append(f"| {label} | " + " | ".join(fmt(r.get(key), kind) for r in rows) + " |")
    for paragraph in paragraphs:
        lines += ["", paragraph]
    lines.append("")
    with open(run_dir.path("report.md"), "w") as f:
        f.write("\n".join(lines))
    run_dir.publish("report.md")
    _report_plot(run_dir, rows)
    return report


def _verdict(rows: list[dict]) -> list[str]:
    """The report's sentences, one paragraph each: perplexity, drift, multiple choice, the guard,
    and with two methods which forgot less."""
    parts = []
    for r in rows:
        if "general_change_percent" in r:
            change = r["general_change_percent"]
            word = "rose" if change > 0 else "fell"
            parts.append(f"With {r['method']}, general-English perplexity {word} by {abs(change):.1f}% "
                         f"while medical perplexity changed by {r.get('medical_change_percent', float('nan')):+.1f}%.")
    if not parts:
        parts.append("No general-English evaluation was run (--general_eval_dataset none).")
    if rows[0].get("chat_drift_note"):
        parts.append(f"Chat drift: {rows[0]['chat_drift_note']}.")
    for r in rows:
        for key in ("medical_mc_note", "guard_note"):
            if r.get(key):
                parts.append((f"{r['method']}: " if len(rows) == 2 else "") + r[key][0].upper() + r[key][1:]
                             + ("" if r[key].endswith(".") else "."))
    if len(rows) == 2:
        parts.append(_comparison(*rows))
    return parts


# Medical perplexity changes (percentage points) within which two runs count as adapted comparably
COMPARABLE_POINTS = 5.0


def _comparison(lora: dict, full: dict) -> str:
    """Which forgot less, said only when both reached about the same medical gain: at different
    gains the one that learned more is expected to have moved more, which settles nothing."""
    medical = (lora.get("medical_change_percent"), full.get("medical_change_percent"))
    if None in medical:
        return "No medical change was measured, so the two cannot be compared."
    if abs(medical[0] - medical[1]) > COMPARABLE_POINTS:
        more = "LoRA" if medical[0] < medical[1] else "full fine-tuning"
        return (f"The two did not adapt comparably (medical perplexity {medical[0]:+.1f}% with LoRA, "
                f"{medical[1]:+.1f}% with full fine-tuning; {more} learned more), so this run does not say which "
                "forgets less: compare at matched medical gain, e.g. rerun with another --learning_rate or "
                "--full_finetune_learning_rate until the two medical changes are within "
                f"{COMPARABLE_POINTS:g} points.")
    verdicts = [f"The two adapted comparably (medical perplexity {medical[0]:+.1f}% vs {medical[1]:+.1f}%)."]
    if "chat_drift" in lora and "chat_drift" in full:
        less = lora["chat_drift"] < full["chat_drift"]
        verdicts.append(f"As an assistant (chat drift), LoRA moved {'less' if less else 'NOT less'} than full "
                        f"fine-tuning ({lora['chat_drift']:+.3f} vs {full['chat_drift']:+.3f} nats per answer token).")
    if "general_change_percent" in lora and "general_change_percent" in full:
        less = lora["general_change_percent"] < full["general_change_percent"]
        verdicts.append(f"On general English, LoRA {'forgot less' if less else 'did NOT forget less'} than full "
                        f"fine-tuning (perplexity {lora['general_change_percent']:+.1f}% vs "
                        f"{full['general_change_percent']:+.1f}%).")
    return " ".join(verdicts)


def _report_plot(run_dir: RunDir, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("medical", "general") if f"{g}_perplexity" in rows[0]]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        labels = ["base"] + [r["method"] for r in rows]
        values = [rows[0][f"{group}_perplexity_base"]] + [r[f"{group}_perplexity"] for r in rows]
        ax.bar(labels, values, color=["tab:gray", "tab:blue", "tab:red"][:len(values)])
        ax.set_title(f"{group} perplexity (lower is better)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir.path("report.png"), dpi=100)
    plt.close(fig)
    run_dir.publish("report.png")
