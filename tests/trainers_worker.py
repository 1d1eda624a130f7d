"""Runs for tests/test_trainers.py, each in a fresh interpreter: transformers' Trainer, TRL's
SFTTrainer and Accelerate over a minilora-injected tiny Llama, with the real libraries.

    python tests/trainers_worker.py OUT_DIR TOKENIZER_DIR SCENARIO [SCENARIO ...]

prints one JSON object, {scenario: result}; a scenario that raises gives {"error": traceback}
so that each test reports its own failure. Run with USE_TORCH_XLA=0 (see test_trainers.py) except
for the "xla" scenario. Under torchrun ("ddp") only rank 0 prints.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import minilora  # noqa: E402
from conftest import tiny_llama  # noqa: E402

# A chat template for the tiny tokenizer (conftest.make_tokenizer has none): one turn a line pair.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def token_rows(n: int = 48, length: int = 16):
    from datasets import Dataset

    ids = torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def injected(**fields):
    model = tiny_llama()
    minilora.inject(model, r=4, **fields)
    return model


def arguments(out: str, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=out, max_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                    learning_rate=5e-2, logging_steps=1, save_steps=2, use_cpu=True, report_to=[], disable_tqdm=True,
                    seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def adapter(model) -> dict:
    return {name: p.detach().tolist() for name, p in minilora.lora_parameters(model)}


def history(trainer, key: str) -> list:
    return [h[key] for h in trainer.state.log_history if key in h]


# -- scenarios -----------------------------------------------------------------------------------

def trainer_runs(out: str) -> dict:
    """One run with evaluation, checkpoints, load_best_model_at_end, activation checkpointing and
    LoRA dropout; the same run resumed from its first checkpoint; the same run without activation
    checkpointing."""
    from transformers import Trainer

    data = token_rows()
    evaluation = data.select(range(8))
    # greater_is_better=True makes the "best" checkpoint the one with the highest evaluation loss:
    # an early one, as training lowers it, so the model loaded at the end differs from the last.
    common = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                  greater_is_better=True)
    result = {}
    for name, extra in (("checkpointed", dict(activation_checkpointing=True)), ("plain", {})):
        trainer = Trainer(injected(dropout=0.1), arguments(f"{out}/{name}", **common, **extra), train_dataset=data,
                          eval_dataset=evaluation)
        result[name] = {"device": str(trainer.args.device), "optim": str(trainer.args.optim)}
        trainer.train()
        result[name].update(losses=history(trainer, "loss"), eval_losses=history(trainer, "eval_loss"),
                            best=trainer.state.best_model_checkpoint, final=adapter(trainer.model),
                            checkpointing=bool(trainer.model.is_activation_checkpointing))
        trainer.save_model(f"{out}/{name}/saved")
    resumed = Trainer(injected(dropout=0.1), arguments(f"{out}/resumed", **common, activation_checkpointing=True),
                      train_dataset=data, eval_dataset=evaluation)
    resumed.train(resume_from_checkpoint=f"{out}/checkpointed/checkpoint-2")
    result["resumed"] = {"losses": history(resumed, "loss"), "best": resumed.state.best_model_checkpoint,
                         "final": adapter(resumed.model)}
    return result


def sft(out: str, tokenizer_dir: str) -> dict:
    """SFTTrainer on a conversational prompt-completion dataset (loss on completions only),
    TRL's defaults otherwise (activation checkpointing on), evaluation at the end."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from conftest import medical_sentences

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    minilora.inject(model, r=4)
    sentences = medical_sentences(48)
    rows = [{"prompt": [{"role": "user", "content": sentences[i]}],
             "completion": [{"role": "assistant", "content": sentences[i + 1]}]} for i in range(0, 48, 2)]
    config = SFTConfig(output_dir=out, max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                       learning_rate=1e-2, logging_steps=1, save_steps=2, eval_strategy="steps", eval_steps=4,
                       use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(rows[:4]), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(f"{out}/saved")
    # The evaluation loss recomputed here: mean NLL of the completion tokens alone (one batch of 4).
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows[:4]:
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
            whole = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
            ids = torch.tensor([whole])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            nll = -logprobs.gather(-1, targets[:, None])[:, 0]
            total += nll[len(prompt) - 1:].sum().item()
            count += len(whole) - len(prompt)
    # The same trainer given a PEFT config on top of the injected model (targets minilora left alone).
    from peft import LoraConfig

    doubled = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    minilora.inject(doubled, r=4, target_modules=["q_proj"])
    try:
        SFTTrainer(model=doubled, args=config, train_dataset=Dataset.from_list(rows),
                   eval_dataset=Dataset.from_list(rows[:4]), processing_class=tokenizer,
                   peft_config=LoraConfig(r=4, target_modules=["v_proj"])).train()
        refusal = None
    except ValueError as e:
        refusal = str(e)
    return {"eval_loss": history(trainer, "eval_loss")[-1], "completion_nll": total / count, "peft_config": refusal,
            "checkpointing": bool(model.is_activation_checkpointing),
            "trained": any(p.abs().sum().item() > 0 for n, p in minilora.lora_parameters(model) if "lora_B" in n),
            "final": adapter(model)}


def accelerate_loop(out: str) -> dict:
    """A plain Accelerate loop: save_state after 2 of 4 updates, then a fresh model resumed from it
    with load_state; the adapter saved from the unwrapped model."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    data = token_rows(32).with_format("torch")

    def run(steps: range, state_dir=None, save_at=None) -> tuple:
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = injected(dropout=0.1).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if state_dir is not None:
            accelerator.load_state(state_dir)
            loader = accelerator.skip_first_batches(loader, steps.start)
        losses = []
        for step, batch in zip(steps, loader):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if save_at == step + 1:
                accelerator.save_state(f"{out}/state")
        return accelerator, model, losses

    accelerator, model, whole = run(range(4), save_at=2)
    bare = accelerator.unwrap_model(model)
    bare.save_pretrained(f"{out}/saved", is_main_process=accelerator.is_main_process,
                         state_dict=accelerator.get_state_dict(model))
    _, resumed, rest = run(range(2, 4), state_dir=f"{out}/state")
    return {"whole": whole, "resumed": rest, "final": adapter(bare), "resumed_final": adapter(resumed),
            "saved": sorted(os.listdir(f"{out}/saved"))}


def one_process(out: str) -> dict:
    """The reference for "ddp": the same 4 updates in one process, each on the global batch of 4."""
    from transformers import Trainer

    trainer = Trainer(injected(), arguments(out, max_steps=4, per_device_train_batch_size=4),
                      train_dataset=token_rows())
    trainer.train()
    return {"losses": history(trainer, "loss"), "final": adapter(trainer.model)}


def ddp(out: str) -> dict:
    """Under torchrun: 2 processes x 2 rows (DDP over gloo), 4 updates with a checkpoint at 2,
    then the run resumed from that checkpoint."""
    from transformers import Trainer

    def trainer(name):
        return Trainer(injected(), arguments(f"{out}/{name}", max_steps=4, per_device_train_batch_size=2),
                       train_dataset=token_rows())

    first = trainer("first")
    first.train()
    first.save_model(f"{out}/first/saved")
    again = trainer("resumed")
    again.train(resume_from_checkpoint=f"{out}/first/checkpoint-2")
    return {"world_size": first.args.world_size, "losses": history(first, "loss"), "final": adapter(first.model),
            "resumed_losses": history(again, "loss"), "resumed_final": adapter(again.model)}


def fsdp2(out: str) -> dict:
    """Under torchrun: FSDP2 as accelerate applies it for Trainer(fsdp=...) on GPUs (fully_shard
    on each decoder layer, then the root; the full state dict gathered for saving), here on gloo,
    with an lm_head copy in modules_to_save; beside the same updates in one process."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))

    def train(model, rows):
        # SGD: an update moves by lr x gradient, so rounding differences stay at rounding size
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        for _ in range(3):
            model(input_ids=ids[rows], labels=ids[rows]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model

    one = train(injected(modules_to_save=["lm_head"]).train(), slice(None))
    sharded = injected(modules_to_save=["lm_head"]).train()
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    train(sharded, slice(4 * rank, 4 * rank + 4))
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sharded.save_pretrained(f"{out}/saved", state_dict=full, is_main_process=rank == 0)
    one.save_pretrained(f"{out}/one", is_main_process=rank == 0)
    dist.barrier()
    from safetensors.torch import load_file

    saved, reference = load_file(f"{out}/saved/adapter_model.safetensors"), load_file(f"{out}/one/adapter_model.safetensors")
    return {"saved": {k: v.tolist() for k, v in saved.items()}, "one": {k: v.tolist() for k, v in reference.items()},
            "copy_moved": (saved["base_model.model.lm_head.weight"] - one.lm_head.original.weight).abs().max().item()}


def xla(out: str) -> dict:
    """torch_xla installed, USE_TORCH_XLA unset: what Trainer does with use_cpu=True, and the
    workarounds for a run that is meant for XLA (a TPU)."""
    from transformers import Trainer

    def run(name, model=None, resume=None, **overrides) -> dict:
        trainer = Trainer(model or injected(), arguments(f"{out}/{name}", **{"max_steps": 4, **overrides}),
                          train_dataset=token_rows())
        result = {"device": str(next(trainer.model.parameters()).device)}
        try:
            trainer.train(resume_from_checkpoint=resume)
        except Exception as e:  # the upstream failures this scenario documents
            return {**result, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        return {**result, "losses": history(trainer, "loss")}

    from torch_xla.utils.checkpoint import checkpoint

    checkpointed = injected()
    checkpointed._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=functools.partial(
        checkpoint, use_reentrant=True))
    return {"default_optimizer": run("default"),
            "trainer_checkpointing": run("trainer_checkpointing", optim="adamw_torch", activation_checkpointing=True),
            "adamw_torch": run("adamw_torch", optim="adamw_torch"),
            "resumed": run("resumed", resume=f"{out}/adamw_torch/checkpoint-2", optim="adamw_torch"),
            "xla_checkpointing": run("xla_checkpointing", model=checkpointed, optim="adamw_torch", max_steps=2)}


SCENARIOS = {"trainer": trainer_runs, "sft": sft, "accelerate": accelerate_loop, "one_process": one_process,
             "ddp": ddp, "fsdp2": fsdp2, "xla": xla}


def main(argv: list[str]) -> None:
    out, tokenizer_dir, names = argv[0], argv[1], argv[2:]
    results = {}
    for name in names:
        folder = os.path.join(out, name)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            function = SCENARIOS[name]
            results[name] = function(folder, tokenizer_dir) if name == "sft" else function(folder)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
