"""The report: each target with what this run measured, the machine, and the markdown tables."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from .loop import LOOP_ROWS


def targets(results: dict) -> list[dict]:
    """Each target of the issue with the figure this run measured (None: not measured)."""
    rows = []

    def add(name, value, limit, better="lower", note=""):
        met = None if value is None else (value <= limit if better == "lower" else value >= limit)
        rows.append({"target": name, "value": value, "limit": limit, "better": better, "met": met, "note": note})

    # The training targets once per device measured (eager CPU, and CUDA where present); on a CPU the
    # dropout targets once per mask path of minilora's (each row says which it took).
    for device, training in (results.get("training") or {"cpu": {}}).items():
        on = "" if device == "cpu" else f" ({device})"
        steps = training.get("rows", [])
        peft = {r["dropout"]: r for r in steps if r["kind"] == "peft"}
        plain = next((r for r in steps if r["kind"] == "minilora" and r["dropout"] == 0), None)
        dropouts = results.get("settings", {}).get("dropouts", ())
        for p in dropouts:
            ours = [r for r in steps if r["kind"] == "minilora" and r["dropout"] == p] or [None]
            for row in ours:
                path = f", {row['mask']} mask" if row and row.get("mask") else ""
                theirs = peft.get(p)
                add(f"minilora / PEFT training step, dropout {p:g}{path}{on}",
                    row and theirs and row["median"] / theirs["median"], 1.00 if p == 0 else 0.85)
                if p > 0:
                    add(f"minilora step with dropout {p:g} / without{path}{on}",
                        row and plain and row["median"] / plain["median"], 1.15)
        # LoRA cannot beat the ratio of the two steps' model FLOPs (forward, input gradients and the
        # frozen weights' products are shared): the target is the step-time ratio over that floor.
        full = next((r for r in steps if r["kind"] == "full"), None)
        floor = plain and full and plain["model_gflop_per_step"] / full["model_gflop_per_step"]
        add(f"(minilora LoRA / full fine-tune step) / model-FLOPs ratio{on}",
            plain and full and plain["median"] / full["median"] / floor, 1.10 if device == "cpu" else 1.15,
            note=floor and f"LoRA / full {plain['median'] / full['median']:.3f}; model FLOPs ratio {floor:.3f}")
        for p in dropouts:
            ours = next((r for r in steps if r["kind"] == "minilora" and r["dropout"] == p
                         and (r.get("mask") is None or r.get("native_mask"))), None)  # this machine's own path
            theirs = peft.get(p)
            value = ours and theirs and "peak_memory_bytes" in ours and ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
            add(f"minilora / PEFT peak training memory, dropout {p:g}{on}", value or None, 1.00)
    inference = results.get("inference", {}).get("rows")
    add("merged inference / base forward", inference and inference["merged"]["vs_base"], 1.02,
        note=inference and f"unmerged / base {inference['unmerged']['vs_base']:.3f}")
    switching = results.get("switching")
    add("adapter switch, 1B-shaped set (ms)", switching and switching["set_adapter"]["median"] * 1e3, 1.0,
        note=switching and (f"the pointer swap alone {switching['pointer_swap']['median'] * 1e3:.3f} ms, one "
                            f"module-tree walk {switching['module_walk']['median'] * 1e3:.3f} ms; "
                            f"{switching['tensor_ops_during_switch']} tensor ops"))
    for key in ["multi"] + [k for k in results if k.startswith("multi_")]:  # the CPU's listed even when not measured
        _multi_targets(add, results.get(key) or {})
    _loop_targets(add, results.get("loop") or {})  # the CPU's targets are listed even when not measured
    if "loop_cuda" in results:
        _loop_targets(add, results["loop_cuda"])
    xla = results.get("xla") or {}
    add("XLA compiles after warm-up", xla.get("compiles_after_warmup"), 0)
    add("XLA aten:: fallbacks in the step", None if "fallbacks_in_step" not in xla else sum(xla["fallbacks_in_step"].values()), 0)
    packing = (results.get("packing") or {}).get("rows")
    add("packing: real tokens / all tokens", packing and min(r["efficiency"] for r in packing), 0.99, better="higher")
    return rows


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "torch_xla"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Run {results['started']} · `{results['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
             + f" · torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
               f"peft {m['versions']['peft']}, torch_xla {m['versions']['torch_xla']}",
             f"Load average (1 min) at start {results['load_start']:.2f}, at end {results['load_end']:.2f}; "
             f"wall time {results['wall_seconds']:.0f} s", ""]
    for key, training in results.get("training", {}).items():
        s = results["settings"]["shape"]
        lines += [f"### Training step, {training['device']} ({training['dtype']}, {training['threads']} threads)", "",
                  f"Llama {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, {s['heads']} heads, "
                  f"{s['kv_heads']} KV heads, vocab {s['vocab']}; batch {s['batch']} x {s['seq']} tokens; "
                  f"LoRA r={s['r']}, alpha={s['alpha']} on the seven projections; AdamW. "
                  f"Median of {results['settings']['rounds']} alternated steps per contender.", "",
                  "| contender | step (s) | min–max (s) | vs PEFT (same dropout) | vs full FT | tokens/s | model GFLOP/step "
                  "| peak memory (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {(r["kind"], r["dropout"]): r for r in training["rows"]}
        full = by.get(("full", 0.0))
        for r in training["rows"]:
            peft_row = by.get(("peft", r["dropout"])) if r["kind"] != "full" else None
            vs_peft = f"{r['median'] / peft_row['median']:.3f}" if peft_row else "—"
            vs_full = f"{r['median'] / full['median']:.3f}" if full else "—"
            lines.append(f"| {r['label']} | {r['median']:.3f} | {r['min']:.3f}–{r['max']:.3f} | {vs_peft} | {vs_full} "
                         f"| {r['tokens_per_second']:,.0f} | {r['model_gflop_per_step']:.1f} "
                         f"| {_mib(r.get('peak_memory_bytes'))} |")
        if "mfu_peak_tflops" in training:
            lines += ["", "Model FLOPs utilisation (peak %.0f TFLOPS): " % training["mfu_peak_tflops"] + ", ".join(
                f"{r['label']} {100 * r['mfu']:.1f}%" for r in training["rows"])]
        if training.get("note"):
            lines += ["", training["note"]]
        method = next((r.get("memory_method") for r in training["rows"] if r.get("memory_method")), None)
        if method:
            lines += ["", f"Peak memory: {method}."]
        lines.append("")
    if "speed" in results:
        sp, s = results["speed"], results["settings"]["shape"]
        lines += ["### minilora's step by precision and depth (eager CPU)", "",
                  f"Llama {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}; batch {s['batch']} x {s['seq']}; "
                  f"LoRA r={s['r']} on the seven projections, dropout 0, float32 adapters; AdamW; {sp['threads']} "
                  f"threads; median of {results['settings']['rounds']} alternated steps. Native bfloat16 on this CPU: "
                  f"{'yes' if sp['bf16_native'] else 'no (bfloat16 is emulated)'}.", "",
                  "| base weights, adapted layers | step (s) | min–max (s) | vs float32, all layers |", "|---|---|---|---|"]
        for r in sp["rows"]:
            lines.append(f"| {r['label']} | {r['median']:.3f} | {r['min']:.3f}–{r['max']:.3f} | "
                         f"{r['vs_float32_all_layers']:.3f} |")
        lines.append("")
    if "gguf" in results:
        gg, s = results["gguf"], results["settings"]["shape"]
        lines += ["### A GGUF file's own blocks as the base (--quantize gguf, eager CPU)", "",
                  f"{gg['file']} ({gg['file_tensor_bytes']:,d} bytes of tensors), computing in {gg['compute_dtype']}; "
                  f"batch {s['batch']} x {s['seq']}; LoRA r={s['r']} on the seven projections, dropout 0; AdamW; "
                  f"{gg['threads']} threads; median of {results['settings']['rounds']} alternated steps.", "",
                  "| base, adapted layers | weight bytes | step (s) | min–max (s) | vs plain weights |",
                  "|---|---|---|---|---|"]
        for r in gg["rows"]:
            lines.append(f"| {r['label']} | {r['weight_bytes']:,d} | {r['median']:.3f} | {r['min']:.3f}–{r['max']:.3f} | "
                         f"{r['vs_plain']:.3f} |")
        lines.append("")
    if "inference" in results:
        inf = results["inference"]["rows"]
        lines += ["### Inference (forward, eval, no grad)", "", "| path | forward (s) | vs base |", "|---|---|---|"]
        for name in ("base", "unmerged", "merged"):
            lines.append(f"| {name} | {inf[name]['median']:.3f} | {inf[name]['vs_base']:.3f} |")
        lines.append("")
    if "switching" in results:
        sw = results["switching"]
        lines += ["### Adapter switching (Llama-3.2-1B shape, base on the meta device)", "",
                  f"{sw['adapters']} adapters x {sw['params_per_adapter']:,d} parameters, {sw['lora_layers']} adapted "
                  f"Linears, {sw['modules']} modules in the tree.", "",
                  "| what | median (ms) |", "|---|---|",
                  f"| minilora.set_adapter(model, name) | {sw['set_adapter']['median'] * 1e3:.3f} |",
                  f"| one walk of model.modules() to find the adapted Linears | {sw['module_walk']['median'] * 1e3:.3f} |",
                  f"| the per-layer pointer swap alone | {sw['pointer_swap']['median'] * 1e3:.3f} |", "",
                  f"Tensor ops run while switching: {sw['tensor_ops_during_switch']}; parameter objects and storages "
                  f"unchanged: {sw['parameters_unchanged']}.", ""]
    for key in [k for k in results if k == "multi" or k.startswith("multi_")]:
        if isinstance(results[key], dict) and "rows" in results[key]:
            lines += _multi_table(results[key])
    for key in ("loop", "loop_cuda"):
        if key in results:
            lines += _loop_table(results[key])
    if "xla" in results:
        x = results["xla"]
        if "skipped" in x:
            lines += ["### XLA loop", "", x["skipped"], ""]
        else:
            eager = x.get("eager_update_seconds")
            eager_cells = "— | —" if eager is None else f"{eager:.3f} | {x['xla_vs_eager']:.2f}"
            lines += [f"### The training loop on XLA ({x['xla_device']}) vs eager CPU", "",
                      f"minilora_train.loop.run on {x.get('source', 'text')}: a 2-layer Llama (hidden 128), LoRA r=16 dropout 0.1, "
                      f"4 x 128 tokens, {x['updates']} updates (2 of them warm-up), loss logged every "
                      f"{x['logging_steps']}.", "",
                      "| compiles (total) | compiles after warm-up | host reads after warm-up (designed) | "
                      "aten:: fallbacks in the step | XLA s/update | eager s/update | XLA / eager | XLA tokens/s |",
                      "|---|---|---|---|---|---|---|---|",
                      f"| {x['compiles_total']} | {x['compiles_after_warmup']} | "
                      f"{x['host_fallbacks_after_warmup'].get('aten::_local_scalar_dense', 0)} "
                      f"({x['designed_host_reads_after_warmup']}) | {sum(x['fallbacks_in_step'].values())} | "
                      f"{x['xla_update_seconds']:.3f} | {eager_cells} | {x['xla_tokens_per_second']:,.0f} |", ""]
            if "xla_full_update_seconds" in x:
                lines += [f"Full fine-tuning through the same loop on XLA: {x['xla_full_update_seconds']:.3f} s/update; "
                          f"LoRA / full on XLA {x['xla_lora_vs_full']:.2f}.", ""]
    if "packing" in results:
        lines += [f"### Packing ({results['packing']['source']})", "",
                  "| max_seq_length | windows | real tokens | all tokens | real / all |", "|---|---|---|---|---|"]
        for r in results["packing"]["rows"]:
            lines.append(f"| {r['max_seq_length']} | {r['windows']:,d} | {r['real_tokens']:,d} | {r['all_tokens']:,d} "
                         f"| {100 * r['efficiency']:.3f}% |")
        lines.append("")
    lines += ["### Targets", "", "| target | measured | target | met | note |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        sign = "≤" if t["better"] == "lower" else "≥"
        met = "—" if t["met"] is None else "yes" if t["met"] else "**no**"
        lines.append(f"| {t['target']} | {value} | {sign} {t['limit']} | {met} | {t['note'] or ''} |")
    return "\n".join(lines) + "\n"


def _multi_targets(add, multi: dict) -> None:
    """The multi section's targets for one device's results ({}: not measured): minilora's mixed
    batch against PEFT's at 16 adapters, and the batch over the most adapters against one adapter."""
    rows = {r["adapters"]: r for r in multi.get("rows", [])}
    on = "" if multi.get("device", "cpu") == "cpu" else f" ({multi['device']})"
    most = max(rows, default=64)
    for phase in ("decode", "prefill"):
        at16 = rows.get(16, {}).get(phase, {})
        add(f"{phase}, 16 adapters in a batch of 32: minilora / PEFT time{on}", at16.get("minilora_vs_peft"), 0.33,
            note=at16.get("no_adapter_vs_peft") and f"the base alone, no adapter: {at16['no_adapter_vs_peft']:.3f}")
        spread = rows.get(most, {}).get(phase, {})
        add(f"{phase}, a batch over {most} adapters / the same batch through one adapter{on}",
            spread.get("minilora_vs_one_adapter"), 1.3,
            note=spread and f"{rows[most]['rows']} rows" + (f"; minilora / PEFT {spread['minilora_vs_peft']:.3f}"
                                                          if "minilora_vs_peft" in spread else ""))


def _multi_table(multi: dict) -> list[str]:
    """The multi section's markdown for one device's results."""
    s = multi["shape"]
    lines = [f"### Many adapters in one batch ({multi['device']}, {multi['dtype']})", "",
             f"Llama {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, vocab {s['vocab']}; "
             f"{multi['adapters_loaded']} adapters loaded, r={s['r']} on the seven projections; row i uses adapter "
             f"i mod n. Decode: one token a row over a KV cache of {multi['tokens']} tokens; prefill: {multi['tokens']} "
             "tokens a row. minilora: `mixed_batch` (stacked slots); PEFT: `adapter_names=`; one adapter: "
             "minilora with `set_adapter`, the same rows; no adapter: the base alone (`disable_adapters`), the floor of "
             "any adapter implementation. Medians of alternated calls; ratios are times.", "",
             "| adapters | rows | phase | PEFT (ms) | minilora (ms) | one adapter (ms) | no adapter (ms) | "
             "minilora / PEFT | no adapter / PEFT | minilora / one adapter | minilora tokens/s | PEFT tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in multi["rows"]:
        for phase in ("decode", "prefill"):
            t = r[phase]
            peft = t.get("PEFT")
            lines.append(f"| {r['adapters']} | {r['rows']} | {phase} | {_ms(peft)} | {_ms(t['minilora'])} | "
                         f"{_ms(t['one adapter'])} | {_ms(t.get('no adapter'))} | {_ratio(t.get('minilora_vs_peft'))} | "
                         f"{_ratio(t.get('no_adapter_vs_peft'))} | "
                         f"{_ratio(t['minilora_vs_one_adapter'])} | {t['tokens_per_second']['minilora']:,.0f} | "
                         f"{'—' if peft is None else format(t['tokens_per_second']['PEFT'], ',.0f')} |")
    lines.append("")
    diffs = [r["max_abs_logit_diff_vs_peft"] for r in multi["rows"] if "max_abs_logit_diff_vs_peft" in r]
    enter = ", ".join(f"{r['adapters']}: {r['mixed_batch_enter_seconds'] * 1e3:.1f}" for r in multi["rows"])
    lines += [(f"Largest |minilora − PEFT| prefill logit: {max(diffs):.2e}. " if diffs else "")
              + f"`mixed_batch` enter and exit (ms), by adapters: {enter}.", ""]
    return lines


def _ms(row) -> str:
    return "—" if row is None else f"{row['median'] * 1e3:.1f}"


def _compile_counts(row: dict) -> dict:
    """A --compile loop row's warm-up (median seconds over its runs) and compiles (the most any run
    made); {} for a row that did not compile."""
    runs = [r["compile"] for r in row.get("samples", []) if r.get("compile")]
    if not runs:
        return {}
    return {"warmup_seconds": sorted(r["warmup_seconds"] for r in runs)[len(runs) // 2],
            "compiles_during_warmup": max(r["compiles_during_warmup"] for r in runs),
            "compiles_after_warmup": max(r["compiles_after_warmup"] for r in runs)}


def _loop_targets(add, lp: dict) -> None:
    """The loop section's targets for one device's results (``lp``: bench_loop's; {} when it did
    not run): the app against the bare loop, the chunked loss against full logits, --compile."""
    loop = lp.get("rows") or {}
    cuda = lp.get("device") == "cuda"
    on = " (cuda)" if cuda else ""
    memory = "peak GPU memory" if cuda else "peak RSS"
    app, full = loop.get(LOOP_ROWS["app"][0]), loop.get(LOOP_ROWS["app-full"][0])
    add(f"the app's update / a bare loop's{on or ' (eager CPU)'}", app and app["time_vs_bare"], 1.05)
    add(f"the app's {memory} / a bare loop's{on}", app and app["memory_vs_bare"], 1.10)
    at = f" ({lp['batch']} x {lp['seq']}){on}" if lp else ""
    add(f"the app's {memory}, chunked loss / full logits{at}",
        app and full and app["peak_bytes"] / full["peak_bytes"], 0.80 if cuda else 0.85)
    add(f"the app's update, chunked loss / full logits{at}",
        app and full and app["update_seconds"] / full["update_seconds"], 1.02)
    compiled = loop.get(LOOP_ROWS["app-compile"][0])
    counts = compiled and _compile_counts(compiled)
    add(f"the app with --compile: compiles after warm-up{at}", counts and counts["compiles_after_warmup"], 0,
        note=counts and (f"update, --compile / eager {compiled['update_seconds'] / app['update_seconds']:.3f}; " if app else "")
        + f"warm-up {counts['warmup_seconds']:.0f} s, {counts['compiles_during_warmup']} compiles")


def _loop_table(lp: dict) -> list[str]:
    """The loop section's markdown for one device's results."""
    cuda = lp.get("device") == "cuda"
    where = "CUDA, bfloat16 base" if cuda else "eager CPU"
    lines = [f"### The training app's loop vs a bare loop ({where})", "",
             f"A Llama of the training shape with vocabulary {lp['vocab']:,d}, batch {lp['batch']} x {lp['seq']}, "
             f"LoRA r={lp['r']} dropout {lp['dropout']:g}, AdamW; {lp['updates']} updates (2 warm-up) per run, "
             f"each contender in a fresh process, {lp['rounds']} rounds in rotating order, medians. The bare "
             "loop is model(labels=).loss.backward(), AdamW.step(), zero_grad(); peak RSS is the whole "
             "process's (VmHWM); system CPU seconds and minor page faults are the whole process's "
             "(getrusage), start-up included." + (" Peak GPU memory is torch.cuda.max_memory_allocated()." if cuda else ""),
             ""]
    gpu_head, gpu_rule = ("peak GPU memory (MiB) | vs bare | ", "---|---|") if cuda else ("", "")
    lines += [f"| loop | s/update | vs bare | {gpu_head}peak RSS (MiB) | vs bare | system CPU s | minor faults |",
              f"|---|---|---|{gpu_rule}---|---|---|---|"]
    for name, row in lp["rows"].items():
        gpu = f"{_mib(row['peak_bytes'])} | {_ratio(row['memory_vs_bare'])} | " if cuda else ""
        lines.append(f"| {name} | {row['update_seconds']:.3f} | {_ratio(row['time_vs_bare'])} | {gpu}"
                     f"{_mib(row['peak_rss_bytes'])} | {_ratio(row['rss_vs_bare'])} | "
                     f"{row['system_seconds']:.1f} | {row['minor_faults']:,.0f} |")
    lines.append("")
    for name, row in lp["rows"].items():
        counts = _compile_counts(row)
        if counts:
            lines += [f"{name}: warm-up {counts['warmup_seconds']:.0f} s (the base evaluation and the first "
                      f"updates, {counts['compiles_during_warmup']} graphs compiled), "
                      f"{counts['compiles_after_warmup']} compiles after it (the worst run).", ""]
    return lines
