"""``minilora-bench`` (``python -m minilora_bench``): minilora against PEFT and full fine-tuning.

Everything is measured in one run on one machine. Contenders alternate step by step (the order
rotating each round), so drift from other processes or the machine's state falls on all of them
alike; every figure is a median of those alternated samples, and every ratio is taken within the
run. Sections (``--only`` / ``--skip`` pick them):

    training    step time (forward, backward, AdamW) and peak memory: minilora LoRA, PEFT LoRA and
                full fine-tuning, LoRA at dropout 0 and 0.05 (on a CPU by both of minilora's
                mask paths); eager CPU, and CUDA when present
    speed       minilora's step at float32, bfloat16 autocast and bfloat16 weights, on all
                layers and on the top 8 (eager CPU)
    inference   base forward vs minilora unmerged vs merged
    switching   set_adapter on a Llama-3.2-1B-shaped adapter set (random weights)
    loop        the training app's own loop (minilora_train.loop.run, eager CPU) vs a bare loop at the same shape:
                update time and peak RSS, the app with full logits and with its chunked loss
    xla         the training app's own loop on the XLA CPU device: compiles during and after
                warm-up, host fallbacks, steady-state update time vs the same loop on eager CPU
    packing     real tokens / all tokens of the data pipeline on ../shared/data/medquad.jsonl

Modules: models (shapes, contenders, the step), timing (alternation, peak memory), one module per
section (training and speed, inference and switching, loop, xla, packing), report (targets, markdown), cli.

It prints markdown (also ``--markdown PATH``) and writes every number to ``--json PATH``.
docs/benchmarks.md holds the latest full run.
"""
