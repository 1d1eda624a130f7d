"""minilora/trainers.py: an injected model inside transformers' Trainer, TRL's SFTTrainer and
Accelerate, with the real libraries (the runs are tests/trainers_worker.py).

Trainer runs go to fresh interpreters with USE_TORCH_XLA=0: transformers and accelerate read it
when imported, and with torch_xla installed (as here) they would otherwise put the model on XLA's
CPU device even with use_cpu=True (test_with_torch_xla_installed_...). One interpreter runs every
single-process scenario (their imports take most of the time), torchrun runs the two-process one.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import minilora
from conftest import ROOT, randomize_adapters, run_python, run_xla, tiny_llama
from minilora import trainers
from test_scaling import torchrun

WORKER = os.path.join(ROOT, "tests", "trainers_worker.py")
NO_XLA = {"USE_TORCH_XLA": "0"}
PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def worker(out, tokenizer_dir, *scenarios, env=None, xla=False) -> dict:
    code = (f"import runpy, sys; sys.argv = [{WORKER!r}, {str(out)!r}, {str(tokenizer_dir)!r}, *{list(scenarios)!r}]; "
            f"runpy.run_path({WORKER!r}, run_name='__main__')")
    return (run_xla if xla else run_python)(code, env=env, timeout=900)


def scenario(results: dict, name: str) -> dict:
    result = results[name]
    assert "error" not in result, result.get("error")
    return result


def close(a: dict, b: dict) -> None:
    """Two adapters (name -> nested lists) equal up to float32 rounding of a few updates."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(torch.tensor(a[name]), torch.tensor(b[name]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> tuple:
    out = tmp_path_factory.mktemp("trainers")
    return out, worker(out, tiny_model_dir, "trainer", "sft", "accelerate", "one_process", env=NO_XLA)


# -- transformers' Trainer ------------------------------------------------------------------------

def test_trainer_checkpoints_and_save_model_write_the_adapter_in_peft_format(runs):
    out, results = runs
    run = scenario(results, "trainer")["checkpointed"]
    assert run["device"] == "cpu" and run["optim"].endswith("ADAMW_TORCH_FUSED")  # Trainer's defaults, unchanged
    checkpoint = out / "trainer" / "checkpointed" / "checkpoint-2"
    assert set(PEFT_FILES) <= set(os.listdir(checkpoint))
    # Besides PEFT's files, a checkpoint holds what Trainer resumes a non-PEFT model from: the
    # trained tensors alone, under the model's own keys (nothing of the frozen base).
    resume = load_file(checkpoint / "model.safetensors")
    assert set(resume) == set(trainers.trainable_state(minilora.inject(tiny_llama(), r=4)))
    saved = out / "trainer" / "checkpointed" / "saved"
    assert sorted(f for f in os.listdir(saved) if f != "training_args.bin") == PEFT_FILES  # what push_to_hub uploads
    model = minilora.load_adapter(tiny_llama(), str(saved))
    close({n: p.tolist() for n, p in minilora.lora_parameters(model)}, run["final"])


def test_resume_from_checkpoint_continues_with_the_losses_of_the_uninterrupted_run(runs):
    # LoRA dropout, activation checkpointing and evaluation on: the RNG state, optimizer, scheduler
    # and adapter all come back from checkpoint-2, so updates 3-6 repeat exactly.
    _, results = runs
    result = scenario(results, "trainer")
    whole, resumed = result["checkpointed"], result["resumed"]
    assert len(resumed["losses"]) == len(whole["losses"]) == 6
    assert resumed["losses"] == whole["losses"]
    close(resumed["final"], whole["final"])


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(runs):
    out, results = runs
    run = scenario(results, "trainer")["checkpointed"]
    # greater_is_better=True in the worker: the best evaluation is the highest loss.
    best_step = 2 * (1 + max(range(len(run["eval_losses"])), key=run["eval_losses"].__getitem__))
    assert run["best"].endswith(f"checkpoint-{best_step}") and best_step != 6
    folder = out / "trainer" / "checkpointed"
    best = load_file(folder / f"checkpoint-{best_step}" / "model.safetensors")
    last = load_file(folder / "checkpoint-6" / "model.safetensors")
    close(run["final"], {name: best[name].tolist() for name in run["final"]})
    assert any(not torch.equal(best[name], last[name]) for name in best)


def test_activation_checkpointing_trains_the_same_adapter_as_without(runs):
    _, results = runs
    result = scenario(results, "trainer")
    assert result["checkpointed"]["checkpointing"] and not result["plain"]["checkpointing"]
    assert result["checkpointed"]["losses"] == result["plain"]["losses"]
    assert result["checkpointed"]["eval_losses"] == result["plain"]["eval_losses"]
    close(result["checkpointed"]["final"], result["plain"]["final"])


# -- TRL's SFTTrainer -----------------------------------------------------------------------------

def test_sfttrainer_on_a_chat_dataset_takes_the_loss_on_completions_only(runs):
    out, results = runs
    result = scenario(results, "sft")
    assert result["trained"] and result["checkpointing"]  # TRL turns activation checkpointing on by default
    # Its evaluation loss is the mean NLL of the completion tokens, recomputed by hand in the worker.
    assert result["eval_loss"] == pytest.approx(result["completion_nll"], rel=1e-5)
    saved = out / "sft" / "saved"
    assert set(PEFT_FILES) <= set(os.listdir(saved)) and "model.safetensors" not in os.listdir(saved)
    assert "model.safetensors" in os.listdir(out / "sft" / "checkpoint-2")


def test_sfttrainer_with_a_peft_config_on_top_of_an_injected_model_is_refused(runs):
    _, results = runs
    assert "PEFT has added its own on top" in (scenario(results, "sft")["peft_config"] or "(trained without a word)")


def test_trls_fused_lm_head_over_an_adapted_lm_head_is_refused():
    # SFTTrainer computes its loss through trl's add_fused_lm_head, which multiplies by
    # lm_head.weight and never calls lm_head: an adapter there would silently never train.
    from trl.trainer.utils import add_fused_lm_head

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for fields in ({"target_modules": ["q_proj", "lm_head"]}, {"modules_to_save": ["lm_head"]}):
        model = minilora.inject(tiny_llama(), r=4, **fields)
        add_fused_lm_head(model)
        with pytest.raises(ValueError, match="TRL's fused LM head .* lm_head.weight directly"):
            model(input_ids=ids, labels=ids, fused_lm_head=True)
    model = randomize_adapters(minilora.inject(tiny_llama(), r=4))  # adapters elsewhere: nothing to refuse
    expected = model(input_ids=ids, labels=ids).loss
    add_fused_lm_head(model)
    assert model(input_ids=ids, labels=ids, fused_lm_head=True).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_peft_adapters_on_top_of_minilora_ones_are_refused_at_the_first_forward():
    # What SFTTrainer(model=injected, peft_config=LoraConfig(...)) does: get_peft_model on the
    # injected model. PEFT itself refuses targets minilora already adapted ("LoRALinear is not
    # supported"); other targets it adds silently, and two LoRA implementations would train apart.
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="is not supported"):
        get_peft_model(minilora.inject(tiny_llama(), r=4), LoraConfig(r=4, target_modules=["q_proj"]))
    wrapped = get_peft_model(minilora.inject(tiny_llama(), r=4, target_modules=["q_proj"]),
                             LoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="PEFT has added its own on top"):
        wrapped(input_ids=ids)


# -- Accelerate, torchrun ---------------------------------------------------------------------------

def test_an_accelerate_loop_resumes_exactly_from_save_state_and_saves_the_adapter(runs):
    _, results = runs
    result = scenario(results, "accelerate")
    assert result["resumed"] == result["whole"][2:]
    close(result["resumed_final"], result["final"])
    assert result["saved"] == PEFT_FILES


def test_torchrun_ddp_on_gloo_equals_one_process_and_resumes_exactly(runs, tmp_path, tiny_model_dir):
    _, results = runs
    one = scenario(results, "one_process")
    proc = torchrun([WORKER, str(tmp_path), tiny_model_dir, "ddp", "fsdp2"], env={"PYTHONPATH": ROOT, **NO_XLA},
                    timeout=300)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    ddp = scenario(results, "ddp")
    assert ddp["world_size"] == 2
    # 2 ranks x 2 rows against 1 process x 4 rows: the same rows per update, reduced in another order.
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(one["losses"]), rtol=1e-6, atol=0)
    close(ddp["final"], one["final"])
    assert ddp["resumed_losses"] == ddp["losses"]
    close(ddp["resumed_final"], ddp["final"])
    assert sorted(f for f in os.listdir(tmp_path / "ddp" / "first" / "saved") if f != "training_args.bin") == PEFT_FILES
    # FSDP2 (what Trainer's FSDP applies on GPUs) with a modules_to_save copy of lm_head: trained
    # and saved from the gathered state dict as in one process.
    fsdp = scenario(results, "fsdp2")
    assert fsdp["copy_moved"] > 1e-3
    close(fsdp["saved"], fsdp["one"])


# -- torch_xla installed ----------------------------------------------------------------------------

def test_with_torch_xla_installed_trainer_runs_on_xla_and_the_documented_workarounds_hold(tmp_path, tiny_model_dir):
    # Upstream behaviour (docs/trainers.md, "torch_xla"): transformers/accelerate choose XLA's device
    # whenever torch_xla imports, use_cpu=True or not; Trainer's default fused AdamW and
    # torch.utils.checkpoint both fail there. What minilora must do there, it does.
    result = scenario(worker(tmp_path, tiny_model_dir, "xla", env={"USE_TORCH_XLA": "1"}, xla=True), "xla")
    assert {r["device"] for r in result.values()} == {"xla:0"}
    assert "`fused=True` requires" in result["default_optimizer"]["error"]
    assert "has no attribute 'xla'" in result["trainer_checkpointing"]["error"]
    losses = result["adamw_torch"]["losses"]
    assert len(losses) == 4 and result["resumed"]["losses"] == losses
    torch.testing.assert_close(torch.tensor(result["xla_checkpointing"]["losses"]), torch.tensor(losses[:2]),
                               rtol=1e-5, atol=0)


# -- the pieces, in this process ----------------------------------------------------------------------

def test_only_a_trainer_checkpoint_folder_gets_the_resume_file(tmp_path):
    model = randomize_adapters(minilora.inject(tiny_llama(attention_bias=True), r=4, bias="lora_only"))
    model.save_pretrained(tmp_path / "checkpoint-12")
    model.save_pretrained(tmp_path / "medical-lora")
    assert sorted(os.listdir(tmp_path / "medical-lora")) == PEFT_FILES
    resume = load_file(tmp_path / "checkpoint-12" / "model.safetensors")
    state = trainers.trainable_state(model)
    assert any(name.endswith("q_proj.bias") for name in state)  # biases that train are resumed too
    assert set(resume) == set(state) and all(torch.equal(resume[k], state[k]) for k in state)
    fresh = minilora.inject(tiny_llama(attention_bias=True), r=4, bias="lora_only")
    assert fresh.load_state_dict(resume, False) == ([], [])  # Trainer's call: nothing reported missing
    for name, param in trainers.trainable_state(fresh).items():
        assert torch.equal(param, resume[name])


def test_load_state_dict_keeps_torchs_rules_for_any_other_state_dict():
    model = minilora.inject(tiny_llama(), r=4)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.load_state_dict(full) == ([], [])
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({"lm_head.weight": full["lm_head.weight"]})
    minilora.merge_and_unload(model)
    assert "load_state_dict" not in model.__dict__ and "save_pretrained" not in model.__dict__


def test_a_save_that_deepspeed_zero3_left_without_values_is_refused(tmp_path):
    model = randomize_adapters(minilora.inject(tiny_llama(), r=4))
    # Trainer.save_model passes state_dict={} under ZeRO-3 without stage3_gather_16bit_weights_on_model_save.
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        model.save_pretrained(tmp_path / "a", state_dict={})
    assert not (tmp_path / "a").exists()
    model.save_pretrained(tmp_path / "b", state_dict={}, is_main_process=False)  # other ranks: nothing to write
    assert not (tmp_path / "b").exists()
    # Parameters ZeRO-3 partitioned carry DeepSpeed's ds_id (no DeepSpeed here: the mark alone).
    full = model.state_dict()
    for _, param in minilora.lora_parameters(model):
        param.ds_id = 0
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3"):
        model.save_pretrained(tmp_path / "c")
    model.save_pretrained(tmp_path / "d", state_dict=full)
    assert sorted(os.listdir(tmp_path / "d")) == PEFT_FILES
