"""The medical multiple-choice questions in every run: the base's accuracy and the adapted model's,
each with a 95% interval, and whether the questions can tell the two apart at all.

The shipped set (assets/medical_mc.jsonl) holds 40 questions. Forty is few: an accuracy of 50% on
40 questions has a 95% interval about 30 points wide, and two models that differ on a handful of
questions are within chance of each other. The report says so instead of ranking them:

- each accuracy gets Wilson's score interval (binomial, 95%);
- the two are compared question by question (the same questions, so the test is paired): the
  exact McNemar test on the questions one got right and the other wrong. Below p = 0.05 the
  difference is reported as real; otherwise the report says plainly that these questions cannot
  tell the two models apart.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..evaluate import DEFAULT_MC_FILE, load_multiple_choice, score_multiple_choice

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
SIGNIFICANCE = 0.05


def items_for(mc_file: str | None) -> list[dict] | None:
    """The questions a run scores: --mc_file, by default the shipped medical set; None for 'none'."""
    if mc_file == "none":
        return None
    return load_multiple_choice(mc_file or DEFAULT_MC_FILE)


def score(model, tokenizer, items: Sequence[dict]) -> dict:
    """{"correct": [bool per question], "n", "accuracy"}: summed log-likelihood of each choice
    after the question (evaluate.score_multiple_choice, as minilora-eval scores)."""
    result = score_multiple_choice(model, tokenizer, items)
    correct = [bool(r["correct"]) for r in result["items"]]
    return {"correct": correct, "n": len(correct), "accuracy": sum(correct) / len(correct)}


def is_score(value) -> bool:
    """Whether ``value`` is what ``score`` returned (as a resumed run reads it back)."""
    return (isinstance(value, dict) and set(value) == {"correct", "n", "accuracy"}
            and isinstance(value["correct"], list) and all(isinstance(c, bool) for c in value["correct"])
            and value["n"] == len(value["correct"]) > 0 and isinstance(value["accuracy"], (int, float)))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for k successes in n trials (95% by default), as fractions."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one trial, got n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: under no difference, each of the ``gained + lost``
    discordant questions is equally likely to fall either way (binomial, p = 1/2)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(base: dict, adapted: dict) -> dict:
    """Base against adapted on the same questions: accuracies with 95% intervals, the questions
    gained and lost, McNemar's p, and a sentence that says whether the set can tell them apart."""
    if base["n"] != adapted["n"]:
        raise ValueError(f"base and adapted were scored on different question sets ({base['n']} vs {adapted['n']})")
    n = base["n"]
    gained = sum(1 for b, a in zip(base["correct"], adapted["correct"]) if a and not b)
    lost = sum(1 for b, a in zip(base["correct"], adapted["correct"]) if b and not a)
    p = mcnemar_p(gained, lost)
    out = {"n": n, "gained": gained, "lost": lost, "p_value": p, "distinguishable": p < SIGNIFICANCE}
    for who, result in (("base", base), ("adapted", adapted)):
        k = sum(result["correct"])
        out[who] = {"correct": k, "accuracy": k / n, "interval": list(wilson(k, n))}
    out["text"] = describe(out)
    return out


def _acc(side: dict, n: int) -> str:
    lo, hi = side["interval"]
    return f"{side['correct']}/{n} ({100 * side['accuracy']:.0f}%, 95% interval {100 * lo:.0f}-{100 * hi:.0f}%)"


def describe(c: dict) -> str:
    n = c["n"]
    head = (f"Medical multiple choice: the base answered {_acc(c['base'], n)}, the adapted model "
            f"{_acc(c['adapted'], n)}; {c['gained']} question(s) went from wrong to right and {c['lost']} from "
            f"right to wrong (exact McNemar p = {c['p_value']:.2f}).")
    if c["distinguishable"]:
        better = "adapted model" if c["gained"] > c["lost"] else "base"
        return head + f" The {better} is better on these questions beyond chance (p < {SIGNIFICANCE:g})."
    return head + (f" {n} questions cannot tell these two models apart: a difference this size is within chance "
                   "(a real difference of a few points would need hundreds of questions to show).")
