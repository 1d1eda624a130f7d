"""Scaling out (train/distributed.py): SPMD with FSDPv2 on 4 XLA CPU devices, DDP under torchrun
with 2 gloo processes. Each scaled-out run is a fresh interpreter: the PJRT device count, SPMD
mode and a process group are per-process settings that must precede torch_xla's start.

Multi-process ``torch_xla.launch`` is not tested: its collectives hang on XLA's CPU client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import minilora
from conftest import ROOT, run_xla, train_argv
from minilora_train import distributed
from minilora_train.config import UsageError, parse_args
from minilora_train.loop import run, train_and_report

TESTS = os.path.dirname(os.path.abspath(__file__))
SPMD_ENV = {"CPU_NUM_DEVICES": "4", "PYTHONPATH": TESTS}
# Short runs: 3 updates of a global batch of 8 windows, validation capped, no general-text eval.
SHORT = ("--max_steps", "3", "--general_eval_dataset", "none", "--max_eval_samples", "4")


def train_losses(out) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]


@pytest.fixture(scope="module")
def single_device(tiny_model_dir, tiny_text_file, tmp_path_factory):
    """The reference: one device (eager CPU) with the whole global batch of 8 windows."""
    out = tmp_path_factory.mktemp("single")
    run(parse_args(train_argv(tiny_model_dir, tiny_text_file, out, *SHORT, "--per_device_train_batch_size", "8")))
    return out


SPMD_RUN = """
import json, torch, torch_xla
from transformers import AutoModelForCausalLM, AutoTokenizer
from conftest import train_argv
from minilora_train.config import parse_args
from minilora_train.device import Device
from minilora_train.loop import run, train_and_report

model = AutoModelForCausalLM.from_pretrained({model!r})  # ours, so the trained model can be read after the run
tokenizer = AutoTokenizer.from_pretrained({model!r})
args = parse_args(train_argv({model!r}, {data!r}, {out!r}, "--device", "xla", *{extra!r}))
device = Device.start(args)
summary = run(args, model=model, tokenizer=tokenizer, device=device)
layout = device.layout
result = {{"xla": summary["xla"], "kind": layout.kind, "ways": layout.ways}}
{after}
print(json.dumps(result))
"""

# The trained model's logits, computed sharded on the 4 devices (reloaded and compared in the test).
LOGITS = """
ids = torch.randint(3, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(model(input_ids=ids.to(torch_xla.device())).logits.cpu(), {out!r} + "/logits.pt")
torch.save(ids, {out!r} + "/ids.pt")
"""


def spmd_run(model_dir, data, out, *extra, after: str = "", env: dict | None = None) -> dict:
    code = SPMD_RUN.format(model=model_dir, data=data, out=str(out), extra=list(map(str, extra)),
                           after=after.format(out=str(out)))
    return run_xla(code, env={**SPMD_ENV, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def spmd(tiny_model_dir, tiny_text_file, tmp_path_factory):
    """Data-parallel SPMD over 4 devices: 2 windows per device, so a global batch of 8; a
    checkpoint after every update (their gathers must not recompile); the persistent cache on."""
    out = tmp_path_factory.mktemp("spmd")
    cache = tmp_path_factory.mktemp("xla-cache")
    result = spmd_run(tiny_model_dir, tiny_text_file, out, *SHORT, "--per_device_train_batch_size", "2",
                      "--save_epoch_percentage", "0.03", "--save_total_limit", "0", "--xla_cache_dir", cache,
                      after=LOGITS)
    return SimpleNamespace(out=out, cache=cache, **result)


def test_spmd_on_4_devices_matches_one_device_and_saves_a_plain_adapter(spmd, single_device, tiny_model_dir):
    assert (spmd.kind, spmd.ways) == ("spmd", 4)
    # Same global batch and seed: the same losses as one device with all 8 windows.
    assert train_losses(spmd.out) == pytest.approx(train_losses(single_device), rel=1e-4)
    assert spmd.xla["compiles_after_warmup"] == 0, spmd.xla

    # The adapter was saved from the unwrapped model: PEFT's key names, no wrapper prefix.
    keys = list(load_file(spmd.out / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys), keys[:3]
    assert not any("_orig_module" in k or ".module." in k for k in keys)

    # Loaded into an unsharded model on the CPU, it gives the sharded model's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids, sharded = torch.load(spmd.out / "ids.pt"), torch.load(spmd.out / "logits.pt")
    plain = minilora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(spmd.out))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(spmd.out))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, sharded, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, sharded, atol=1e-4, rtol=1e-4)


FSDP_CHECKS = """
layers = model.model.layers
result["layer_wrapper"] = type(layers[0]).__name__
result["checkpointing_before_wrap"] = all(layer.module.gradient_checkpointing for layer in layers)
specs, shards = {{}}, {{}}
for name, p in model.named_parameters():
    name = name.replace("._orig_module", "")
    specs[name] = torch_xla._XLAC._get_xla_sharding_spec(p)
    shards[name] = [list(shard.shape) for shard, _ in torch_xla._XLAC._get_local_shards([p])[0]]
result["specs"], result["shards"] = specs, shards
"""


def test_fsdp_v2_shards_the_base_across_devices_and_still_matches_one_device(tiny_model_dir, tiny_text_file,
                                                                            single_device, tmp_path):
    # FSDPv2 with gradient checkpointing and accumulation: 1 window per device x 4 devices x 2
    # micro-batches is the same update of 8 windows as the single-device run.
    out = tmp_path / "fsdp"
    result = spmd_run(tiny_model_dir, tiny_text_file, out, *SHORT, "--per_device_train_batch_size", "1",
                      "--gradient_accumulation_steps", "2", "--gradient_checkpointing", after=FSDP_CHECKS)
    assert result["layer_wrapper"] == "SpmdFullyShardedDataParallel"
    assert result["checkpointing_before_wrap"]
    specs, shards = result["specs"], result["shards"]
    base = {n: s for n, s in specs.items() if "lora_" not in n}
    assert "model.layers.0.self_attn.q_proj.weight" in base and "lm_head.weight" in base
    for name, spec in specs.items():  # frozen base and adapters alike, every parameter
        assert spec.startswith("{devices=[") and spec.endswith("0,1,2,3}"), (name, spec)
    # Each device holds a quarter of each weight: q_proj (64, 64) is four (16, 64) shards.
    assert shards["model.layers.0.self_attn.q_proj.weight"] == [[16, 64]] * 4
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]  # 300: the embedding splits along its longest side
    assert shards["model.embed_tokens.weight"] == [[vocab // 4, 64]] * 4
    assert train_losses(out) == pytest.approx(train_losses(single_device), rel=1e-4)
    assert result["xla"]["compiles_after_warmup"] == 0, result["xla"]


RESUME_CHECKS = """
import torch_xla.debug.metrics as met
result["restored_specs"] = sorted({{torch_xla._XLAC._get_xla_sharding_spec(p) for p in model.parameters()
                                   if p.requires_grad}})
result["cache"] = {{name: met.counter_value(name) or 0 for name in
                   ("PersistentCacheMiss", "PersistentCacheHit", "PersistentCacheDeserializeFailure")}}
"""


def test_spmd_resume_continues_exactly_and_finds_its_graphs_in_the_persistent_cache(spmd, tiny_model_dir,
                                                                                     tiny_text_file, tmp_path):
    # A new process continues the run above from its first checkpoint, with the same cache.
    out = tmp_path / "resumed"
    result = spmd_run(tiny_model_dir, tiny_text_file, out, *SHORT, "--per_device_train_batch_size", "2",
                      "--resume_from_checkpoint", spmd.out / "checkpoint-1", "--xla_cache_dir", spmd.cache,
                      after=RESUME_CHECKS)
    straight, resumed = load_file(spmd.out / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for key in straight:  # sharded optimizer state and RNG went through the checkpoint intact
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)
    assert train_losses(out) == pytest.approx(train_losses(spmd.out)[1:], rel=1e-5)
    # Weights copied in from the checkpoint are sharded like fresh ones, not left replicated.
    assert all(spec.startswith("{devices=[") for spec in result["restored_specs"]), result["restored_specs"]
    # The restarted process looked up each graph in the cache before compiling it, and found all
    # but one: its first update, whose inputs come from the checkpoint (one output fewer).
    # torch_xla 2.9 cannot load what it finds (pytorch/xla#9094, "Deserializing serialized
    # executable not supported", on CPU, TPU and GPU alike) and compiles anyway; once that is
    # fixed upstream, the deserialize failures below become hits.
    cache = result["cache"]
    assert cache["PersistentCacheMiss"] <= 1, cache
    assert cache["PersistentCacheHit"] + cache["PersistentCacheDeserializeFailure"] >= 3, cache


# -- torchrun ----------------------------------------------------------------------------------

# Loaded by every worker (sitecustomize): logs each file a rank creates, renames or removes in the
# output directory, through Python's audit events.
AUDIT = """
import os, sys
if "RANK" in os.environ:
    _root = os.path.realpath(os.environ["AUDIT_ROOT"]) + os.sep
    _log = os.path.join(os.environ["AUDIT_LOGS"], "rank" + os.environ["RANK"])

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        elif event in ("os.rename", "os.remove"):
            path, writes = args[1] if event == "os.rename" else args[0], True
        else:
            return
        if writes and isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(_root):
            with open(_log, "a") as f:
                f.write(os.path.relpath(os.path.realpath(path), _root) + "\\n")

    sys.addaudithook(_hook)
"""


def torchrun(argv: list[str], env: dict, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *argv]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Workers run in sessions of their own: killing torchrun would leave them behind. On
            # SIGTERM it passes the signal on and kills the workers still there 30 s later.
            popen.terminate()
            stdout, stderr = popen.communicate()
            raise AssertionError(f"torchrun did not finish in {timeout} s (ranks waiting in a collective?):\n"
                                 f"STDOUT:\n{stdout[-4000:]}\nSTDERR:\n{stderr[-6000:]}") from None
    proc = subprocess.CompletedProcess(command, popen.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def one_process_and_torchrun(model_dir, data, tmp_path, common, *distributed_flags):
    """One process with 8 windows per micro-batch, then torchrun with 2 ranks x 4 under the write
    audit: (one process's output, torchrun's output, the torchrun process, files each rank wrote)."""
    one = tmp_path / "one"
    train_and_report(parse_args(train_argv(model_dir, data, one, *common,
                                           "--per_device_train_batch_size", "8")))  # what the CLI runs
    out, audit = tmp_path / "torchrun", tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    proc = torchrun(["-m", "minilora_train", *train_argv(model_dir, data, out, *common, *distributed_flags,
                                                "--per_device_train_batch_size", "4")],
                    env={"PYTHONPATH": f"{audit}{os.pathsep}{ROOT}", "AUDIT_ROOT": str(out), "AUDIT_LOGS": str(audit)})
    written = {rank: (audit / f"rank{rank}").read_text().split() if (audit / f"rank{rank}").exists() else []
               for rank in (0, 1)}
    return one, out, proc, written


def test_torchrun_ddp_equals_one_process_with_the_global_batch_and_only_rank_0_writes(
        tiny_model_dir, tiny_text_file, tmp_path):
    # 2 ranks x 4 windows x 2 micro-batches against 1 process x 8 windows x 2 micro-batches.
    # A smaller learning rate than the other tests: AdamW turns float rounding in near-zero
    # gradients into steps of up to lr, and two batch splits differ by that much even in one process.
    common = (*SHORT, "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3")
    one, out, proc, written = one_process_and_torchrun(tiny_model_dir, tiny_text_file, tmp_path, common)

    ddp_adapter, one_adapter = load_file(out / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert set(ddp_adapter) == set(one_adapter)  # no 'module.' prefix from the DDP wrapper
    for key in one_adapter:
        torch.testing.assert_close(ddp_adapter[key], one_adapter[key], atol=1e-5, rtol=0)
    assert train_losses(out) == pytest.approx(train_losses(one), rel=1e-5)  # losses summed over ranks

    # Only rank 0 wrote: rank 1 touched nothing but its own start-up write probe.
    assert [p for p in written[1] if not p.startswith(".minilora-write-test-")] == []
    assert {"adapter_model.safetensors", "metrics.jsonl", "train_summary.json"} <= set(written[0])
    assert sorted(os.listdir(out)) == sorted(os.listdir(one))
    assert proc.stdout.count("update 1/3 |") == 1  # one log line per update, from rank 0
    assert proc.stdout.count("done: 3 updates in") == 1  # the end-of-run summary, from rank 0 alone


def test_torchrun_fsdp_equals_one_process_gathers_plain_files_on_rank_0_and_loads_unsharded(
        tiny_model_dir, tiny_text_file, tmp_path):
    # As the DDP test, with FSDP2 sharding every weight across the 2 ranks. A checkpoint after
    # each update (--save_epoch_percentage 5) makes the ranks also gather the optimizer state.
    common = (*SHORT, "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--save_epoch_percentage", "5")
    one, out, proc, written = one_process_and_torchrun(tiny_model_dir, tiny_text_file, tmp_path, common, "--fsdp")
    assert "FSDP2 over 2 process(es)" in proc.stdout

    sharded, whole = load_file(out / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert set(sharded) == set(whole)  # PEFT names: no wrapper prefix, whole tensors (shapes checked below)
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], atol=1e-5, rtol=0)
    assert train_losses(out) == pytest.approx(train_losses(one), rel=1e-5)  # gradients summed, not averaged
    assert sorted(os.listdir(out)) == sorted(os.listdir(one))  # the same checkpoints, too
    # The checkpoint's optimizer state is gathered whole: the single process's, moment for moment.
    ckpt = sorted(n for n in os.listdir(one) if n.startswith("checkpoint-"))[-1]
    states = [torch.load(d / ckpt / "optimizer.pt", weights_only=True)["state"] for d in (out, one)]
    for index, state in states[1].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(states[0][index][name], state[name], atol=1e-5, rtol=1e-3)

    assert [p for p in written[1] if not p.startswith(".minilora-write-test-")] == []
    assert {"adapter_model.safetensors", "metrics.jsonl", "train_summary.json"} <= set(written[0])

    # The adapter serves an ordinary, unsharded model.
    from transformers import AutoModelForCausalLM

    model = minilora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    loaded = minilora.lora_state_dict(model)
    assert set(loaded) == set(sharded)
    for key in sharded:
        torch.testing.assert_close(loaded[key], sharded[key], atol=0, rtol=0)


def test_fsdp_is_refused_without_torchrun_on_xla_and_with_a_resume():
    flags = dict(spmd=False, xla_cache_dir=None, fsdp=True, resume_from_checkpoint=None)
    with pytest.raises(UsageError, match="--fsdp shards the model across torchrun's processes"):
        distributed.setup(SimpleNamespace(**flags), "cpu")
    with pytest.raises(UsageError, match="--fsdp is for torchrun"):
        distributed.setup(SimpleNamespace(**flags), "xla")
    with pytest.raises(UsageError, match="--resume_from_checkpoint does not work with --fsdp"):
        distributed.setup(SimpleNamespace(**{**flags, "resume_from_checkpoint": "latest"}), "cpu")


# Every worker of the dropout runs below runs the CLI with two additions: it notes a hash of the
# first dropout mask it draws in $MASKS/rank<r>, and the rank named by $SIGTERM_RANK alone sends
# itself SIGTERM in the first micro-batch of update 3, as a scheduler preempting one worker would.
DDP_DROPOUT_WORKER = """
import hashlib, os, signal, sys
import minilora.dropout
import minilora_train.loop as loop
from minilora_train.cli import main

rank = os.environ["RANK"]
draw, load = minilora.dropout.dropout_mask, loop.load_model_and_tokenizer

def noted_mask(x, p, *site):
    keep = draw(x, p, *site)
    if "MASKS" in os.environ and not os.path.exists(os.path.join(os.environ["MASKS"], "rank" + rank)):
        with open(os.path.join(os.environ["MASKS"], "rank" + rank), "w") as f:
            f.write(hashlib.sha256(keep.numpy().tobytes()).hexdigest())
    return keep

def load_and_arm(args):
    model, tokenizer = load(args)
    forwards = [0]

    def preempt(module, inputs, output):
        if module.training:
            forwards[0] += 1
            if forwards[0] == 5 and rank == os.environ.get("SIGTERM_RANK"):  # update 3, micro-batch 1 of 2
                os.kill(os.getpid(), signal.SIGTERM)

    # the decoder, not the whole model: the chunked loss calls the decoder and the LM head itself
    model.get_decoder().register_forward_hook(preempt)
    return model, tokenizer

minilora.dropout.dropout_mask = noted_mask  # what every adapter's LoRADropout calls
loop.load_model_and_tokenizer = load_and_arm
status = main(sys.argv[1:])
import torch.distributed as dist
print(f"rank {rank} exits with its process group ended: {not dist.is_initialized()}")
sys.exit(status)
"""


def test_torchrun_ranks_draw_their_own_dropout_masks_stop_together_on_sigterm_and_resume_exactly(
        tiny_model_dir, tiny_text_file, tmp_path):
    # 6 updates of 2 ranks x 1 window x 2 micro-batches, with adapter dropout: each rank's RNG matters.
    worker, masks = tmp_path / "worker.py", tmp_path / "masks"
    worker.write_text(textwrap.dedent(DDP_DROPOUT_WORKER))
    masks.mkdir()
    flags = ("--max_steps", "6", "--general_eval_dataset", "none", "--max_eval_samples", "4", "--lora_dropout", "0.1",
             "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2")

    def launch(out, *extra, **env):
        proc = torchrun([str(worker), *train_argv(tiny_model_dir, tiny_text_file, out, *flags, *extra)],
                        env={"PYTHONPATH": ROOT, **env}, timeout=150)  # generous: ranks that disagree hang
        # The command line ends the process group itself, after a barrier, rather than leaving it
        # to the exit handler: a rank whose gloo threads outlived it once aborted at exit.
        assert proc.stdout.count("exits with its process group ended: True") == 2
        return proc

    straight = tmp_path / "straight"
    launch(straight, MASKS=str(masks))
    # The same shapes, so the same seed would give the same mask: rank 1 drew its own.
    first = {rank: (masks / f"rank{rank}").read_text() for rank in (0, 1)}
    assert len(first[0]) == len(first[1]) == 64 and first[0] != first[1]

    # SIGTERM reaches rank 1 only, mid-update 3. Rank 0 learns of it at the end of that update,
    # and both stop there: exit 0, one checkpoint, written by rank 0, holding both ranks' RNG.
    out = tmp_path / "preempted"
    proc = launch(out, SIGTERM_RANK="1")  # torchrun() asserts that torchrun and both workers exited 0
    assert proc.stderr.count("SIGTERM received") == 1
    assert proc.stdout.count(f"stopped by SIGTERM after update 3; checkpoint saved. Resume with: minilora-train ... "
                             f"--output_dir {out} --resume_from_checkpoint latest") == 1
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["update"], state["micro"]) == (3, 6)
    assert not (out / "train_summary.json").exists()
    ranks = torch.load(out / "checkpoint-3" / "rng.pt", weights_only=True)["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])

    # Each rank resumes from its own RNG state: the adapter of the uninterrupted run.
    launch(out, "--resume_from_checkpoint", "latest")
    assert json.loads((out / "train_summary.json").read_text())["updates"] == 6
    resumed, expected = load_file(out / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert sorted(resumed) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0)


DDP_GRADIENTS = """
import json, torch
from types import SimpleNamespace
from minilora_train import distributed

layout = distributed.setup(SimpleNamespace(spmd=False, xla_cache_dir=None), "cpu")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
model[0].weight.requires_grad_(False)  # frozen, like a base weight
reference = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
reference.load_state_dict(model.state_dict())
ddp = layout.wrap(model)
x = torch.randn(2, layout.global_batch(3), 6, generator=torch.Generator().manual_seed(1))  # 2 micro-batches
denom = x.shape[0] * x.shape[1]  # the whole update's count, as the loop divides by
for i, (rows,) in enumerate(layout.process_rows([(x[0],), (x[1],)])):
    with layout.no_backward_sync(ddp, enabled=i == 0):
        (ddp(rows).square().sum() / denom).backward()
(reference(x.flatten(0, 1)).square().sum() / denom).backward()
diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())
           if p.requires_grad)
if layout.is_main:
    print(json.dumps({"diff": diff, "frozen_has_no_grad": model[0].weight.grad is None}))
"""


def test_ddp_reduces_adapter_gradients_to_the_single_process_gradient(tmp_path):
    # The sum over ranks, not DDP's default mean: AdamW hides a constant factor in the gradient,
    # so the end-to-end test above could not tell the two apart.
    script = tmp_path / "ddp_gradients.py"
    script.write_text(textwrap.dedent(DDP_GRADIENTS))
    proc = torchrun([str(script)], env={"PYTHONPATH": ROOT})
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["diff"] < 1e-6, result
    assert result["frozen_has_no_grad"]


# -- the layout's arithmetic and its refusals (in this process) -----------------------------

def test_each_process_takes_its_block_of_rows_and_per_batch_values_whole():
    layout = distributed.Layout("ddp", ways=2, processes=2, index=1)
    ids = torch.arange(8).view(4, 2)
    denom = torch.tensor([7.0])
    (rows, same), = list(layout.process_rows([(ids, denom)]))
    assert rows.tolist() == [[4, 5], [6, 7]] and same is denom
    assert layout.global_batch(4) == 8
    assert not layout.is_main


def test_a_resumed_rank_takes_its_own_rng_state_and_none_saved_by_another_process_count():
    single = distributed.Layout()
    assert single.own_entry(["single"]) == "single"  # one process: the one state, as before
    assert single.any_process(True) and not single.any_process(False)  # no process group needed
    layout = distributed.Layout("ddp", ways=2, processes=2, index=1)
    assert layout.own_entry(["rank 0", "rank 1"]) == "rank 1"
    assert layout.own_entry(["single"]) is None and layout.own_entry(["a", "b", "c"]) is None


def test_spmd_and_the_xla_cache_are_refused_off_xla():
    with pytest.raises(UsageError, match="--spmd applies to XLA only"):
        distributed.setup(SimpleNamespace(spmd=True, xla_cache_dir=None), "cpu")
    with pytest.raises(UsageError, match="--xla_cache_dir applies to XLA only"):
        distributed.setup(SimpleNamespace(spmd=False, xla_cache_dir="/tmp/x"), "cuda")
    assert distributed.setup(SimpleNamespace(spmd=False, xla_cache_dir=None), "cpu").kind == "single"
