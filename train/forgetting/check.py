"""The forgetting check of one training run: what the loop calls at its named points.

    check = Check(args, run_dir, device, shared)
    train_data = check.before_adapting(model, tokenizer, train_data)  # the base as loaded
    check.before_training(model, tokenizer, eval_sets)  # the base on its device, before update 1
    extra = check.after_evaluation(model, tag)          # {"chat_drift": ...} for metrics.jsonl
    summary.update(check.after_training(model, tokenizer))

Before adapting, the forgetting guard (on instruct bases, unless --replay_self 0) mixes the base's
own answers to everyday instructions into the training windows, and --replay_general general text.
Before training, the base answers the chat-drift probe's prompts and the medical multiple-choice
questions; after each evaluation the adapted model scores the probe's answers again (chat drift);
after training it takes the multiple-choice questions too.

``shared``: a dict that runs in one process starting from the same base share (the
--compare_full_finetune run, a sweep): what the check and the loop measure of the base before
training is measured once and reused while the base, the evaluation windows and the probe are the
same (``base_key``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Optional

from .. import data
from ..config import UsageError
from ..demo_assets import default_general_validation
from ..outputs import MC_BASE_FILE, PROBE_FILE, SELF_ANSWERS_FILE, is_token_lists
from . import answers, drift, mc, replay

# Windows of general text evaluated for the forgetting check unless --max_eval_samples says otherwise.
DEFAULT_GENERAL_WINDOWS = 128


def general_eval_windows(args, tokenizer) -> Optional[data.Windows]:
    """General-English text for the forgetting check: --general_eval_dataset, or by default the
    embedded demo's held-out fortunes (never trained on, by the demo or anyone)."""
    if args.general_eval_dataset == "none":
        return None
    cap = args.max_eval_samples or DEFAULT_GENERAL_WINDOWS
    if args.general_eval_dataset:
        windows = data.load_windows(args.general_eval_dataset, tokenizer, args.max_seq_length, tmp_dir=args.tmp_dir)
    else:
        windows = data.Packer(tokenizer, args.max_seq_length).pack_texts(default_general_validation())
    return data.cap_windows(windows, cap)


class Check:
    def __init__(self, args, run_dir, device, shared: Optional[dict] = None):
        self.args, self.run_dir, self.device, self.shared = args, run_dir, device, shared
        try:  # a bad question file fails before any model is loaded
            self.mc_items = mc.items_for(args.mc_file)
        except (OSError, ValueError) as e:
            raise UsageError(f"--mc_file {args.mc_file}: {e}") from None
        # Greedy generation compiles a graph per length on XLA, and a sharded model generates only
        # with every process taking part in lockstep: the chat probe runs on one eager device. The
        # questions are fixed forward passes: every process scores them (a sharded model needs
        # every rank's part), on any eager layout; XLA would compile a graph per question length.
        self.eager = not device.is_xla and device.layout.kind == "single"
        self.scores_mc = not device.is_xla
        self.weights: Optional[str] = None  # answers.fingerprint of the base as loaded
        self.guard: dict = {}
        self.probe: Optional[drift.ChatProbe] = None
        self.no_drift: Optional[str] = None
        self.mc_base: Optional[dict] = None
        self.no_mc: Optional[str] = None
        self.final_chat: Optional[dict] = None
        self.key: Optional[tuple] = None

    # -- before adapting: the base as loaded ------------------------------------------------------

    def before_adapting(self, model, tokenizer, train_data: data.TrainData) -> data.TrainData:
        """The training windows with the guard's and --replay_general's windows mixed in; sets
        ``self.args.replay_self`` to the guard's share for this base. Call it on the base as
        loaded, before --quantize and LoRA: the guard replays the base's own answers."""
        share, off = replay.guard_share(self.args, tokenizer)
        self.args = copy.copy(self.args)  # copy.copy keeps parse_args' record of the flags given
        self.args.replay_self = share
        if answers.has_chat_template(tokenizer):
            self.weights = answers.fingerprint(model)
        pairs, generated = (self._guard_answers(model, tokenizer) if share else (None, None))
        mixed = replay.with_replay(self.args, train_data, tokenizer, pairs)
        if not share:
            self.guard = {"share": 0.0, "note": off}
        else:
            medical = len(train_data.train)
            shares = share + self.args.replay_general
            self.guard = {"share": share, "prompts": len(pairs), "medical_windows": medical,
                          "windows": replay.windows_added(medical, share, shares),
                          "answers_cached": generated is None, "answer_seconds": generated or 0.0,
                          "steps_fixed": self.args.max_steps > 0}
        return mixed

    def _guard_answers(self, model, tokenizer) -> tuple[list, Optional[float]]:
        """(the base's (prompt, answer) token pairs, seconds spent generating them in this run or
        None when they were read back: from this run's first start or the disk cache)."""
        if self.args.resume_from_checkpoint and self.run_dir.exists(SELF_ANSWERS_FILE):
            pairs = self.run_dir.read_json(SELF_ANSWERS_FILE,
                                           lambda v: isinstance(v, list) and all(is_token_lists(p, 2) for p in v),
                                           "a list of [prompt ids, answer ids] pairs")
            return pairs, None
        if self.device.is_main:
            print(f"forgetting guard: the base's own answers to everyday instructions, to train on beside the data "
                  f"(generated once per base, then read from {answers.cache_dir()})", flush=True)
        got = replay.self_distillation_answers(model, tokenizer, self.weights)
        if self.device.is_main:
            self.run_dir.write_json(SELF_ANSWERS_FILE, got.pairs)
        return got.pairs, None if got.cached else got.seconds

    # -- before training: the base on its device --------------------------------------------------

    def before_training(self, model, tokenizer, eval_sets: dict) -> None:
        """The chat-drift probe (the base's answers and its own score of them) and the base's
        multiple-choice answers, measured now or taken from ``shared``."""
        self.key = self.base_key(eval_sets)
        cached = self.shared.get(self.key) if self.shared is not None and not self.args.resume_from_checkpoint else None
        if cached is not None:
            self.probe, self.no_drift, self.mc_base, self.no_mc = (cached[k] for k in ("probe", "no_drift", "mc", "no_mc"))
            if self.device.is_main:  # for a resume of this run
                if self.probe is not None:
                    self.run_dir.write_json(PROBE_FILE, dataclasses.asdict(self.probe))
                if self.mc_base is not None:
                    self.run_dir.write_json(MC_BASE_FILE, self.mc_base)
            return
        self.probe, self.no_drift = self._probe(model, tokenizer)
        self.mc_base, self.no_mc = self._mc_base(model, tokenizer)

    def _probe(self, model, tokenizer) -> tuple[Optional[drift.ChatProbe], Optional[str]]:
        args = self.args
        if args.chat_drift_prompts == 0:
            return None, "off (--chat_drift_prompts 0)"
        if not answers.has_chat_template(tokenizer):
            return None, "not measured: the base has no chat template (not an instruct model)"
        if not self.eager:
            return None, "not measured: chat drift runs on a single eager device (CPU or one GPU)"
        if args.resume_from_checkpoint and self.run_dir.exists(PROBE_FILE):
            return drift.ChatProbe(**self.run_dir.read_json(PROBE_FILE, drift.is_probe,
                                                            "prompts, prompt_ids, answer_ids, base_nll")), None
        prompts = answers.load_prompts()[:args.chat_drift_prompts] if args.chat_drift_prompts else None
        # the model as it trains (quantized, with zero-initialised adapters) answers as the base did
        weights = f"{self.weights} quantize={args.quantize} embeddings={args.quantize_embeddings}"
        probe = drift.probe_base(model, tokenizer, prompts, weights=weights)
        if self.device.is_main:
            self.run_dir.write_json(PROBE_FILE, dataclasses.asdict(probe))
        return probe, None

    def _mc_base(self, model, tokenizer) -> tuple[Optional[dict], Optional[str]]:
        if self.mc_items is None:
            return None, "off (--mc_file none)"
        if not self.scores_mc:
            return None, "not measured: on XLA each question length would compile a graph of its own"
        if self.args.resume_from_checkpoint and self.run_dir.exists(MC_BASE_FILE):
            return self.run_dir.read_json(MC_BASE_FILE, mc.is_score, '{"correct": [true or false per question], '
                                          '"n", "accuracy"}'), None
        result = mc.score(model, tokenizer, self.mc_items)
        if self.device.is_main:
            self.run_dir.write_json(MC_BASE_FILE, result)
        return result, None

    def base_key(self, eval_sets: dict) -> tuple:
        """What the base's measurements before training depend on: the base as loaded (its
        weights' fingerprint where one was taken), the evaluation windows themselves (a digest of
        their tokens and labels), the probe's prompts and the multiple-choice questions."""
        digest = hashlib.sha256()
        for name in sorted(eval_sets):
            digest.update(name.encode())
            digest.update(eval_sets[name].input_ids.numpy().tobytes())
            digest.update(eval_sets[name].labels.numpy().tobytes())
        args = self.args
        return (self.weights or args.model_name, args.quantize, args.quantize_embeddings, args.bf16,
                args.chat_drift_prompts, args.mc_file, args.per_device_eval_batch_size, args.chunked_loss,
                digest.hexdigest())

    def base_evaluation(self) -> Optional[dict]:
        """The base's evaluation from ``shared``, where a run before this one measured it."""
        cached = self.shared.get(self.key) if self.shared is not None and not self.args.resume_from_checkpoint else None
        return None if cached is None else cached["eval"]

    def keep_base_evaluation(self, evaluation: dict) -> None:
        """Remember the base's measurements for the runs after this one (``shared``)."""
        if self.shared is not None and not self.args.resume_from_checkpoint:
            self.shared[self.key] = {"eval": evaluation, "probe": self.probe, "no_drift": self.no_drift,
                                     "mc": self.mc_base, "no_mc": self.no_mc}

    # -- after each evaluation, after training ---------------------------------------------------

    def after_evaluation(self, model, tag: str) -> dict:
        """{"chat_drift": nats per answer token} after an evaluation past the base's, else {}."""
        if self.probe is None or tag == "base":
            return {}
        chat = drift.chat_drift(model, self.probe)
        if tag == "final":
            self.final_chat = chat
        return {"chat_drift": chat["drift"]}

    def after_training(self, model, tokenizer) -> dict:
        """The run summary's forgetting entries: chat drift, the multiple-choice comparison, the
        guard and the replay shares; the main process prints them."""
        if self.probe is not None:
            chat = self.final_chat or drift.chat_drift(model, self.probe)
        else:
            chat = {"not_measured": self.no_drift}
        if self.mc_base is not None:
            choice = mc.compare(self.mc_base, mc.score(model, tokenizer, self.mc_items))
        else:
            choice = {"not_measured": self.no_mc}
        if self.device.is_main:
            if self.probe is not None:
                print(f"chat drift on {chat['prompts']} everyday prompts: {chat['drift']:+.3f} nats per answer token "
                      f"(base {chat['base_nll']:.3f} -> {chat['nll']:.3f})", flush=True)
            if "text" in choice:
                print(choice["text"], flush=True)
            print(guard_line(self.guard), flush=True)
        return {"chat_drift": chat, "medical_mc": choice, "forgetting_guard": self.guard,
                "replay": {"general": self.args.replay_general, "self": self.args.replay_self}}


def guard_line(guard: dict) -> str:
    """One sentence on the forgetting guard of a run: whether it ran, its share, what it cost."""
    if not guard.get("share"):
        return f"forgetting guard: {guard.get('note') or 'off'}"
    cost = ("the base's answers were read from the cache" if guard["answers_cached"]
            else f"generating the base's answers took {guard['answer_seconds']:.0f} s (cached for later runs)")
    length = ("the run kept its number of updates, the guard's windows taking the place of medical ones"
              if guard["steps_fixed"] else
              f"each epoch is {100 * guard['windows'] / guard['medical_windows']:.0f}% longer")
    return (f"forgetting guard: on, {100 * guard['share']:.0f}% of the training windows are the base's own answers "
            f"to {guard['prompts']} everyday instructions ({guard['windows']:,d} windows beside "
            f"{guard['medical_windows']:,d} medical ones); {cost}; {length}. --replay_self 0 turns it off")
