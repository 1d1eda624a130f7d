"""train/device.py: the device choice, and what the app does so that transformers' newer habits
(Hub kernels, torch_xla imported through accelerate) do not break or slow a run."""

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, run_xla, train_argv
from minilora_train import device


def kernels_installed() -> bool:
    from transformers.utils import is_kernels_available

    return is_kernels_available()


def test_a_loaded_model_trains_on_xla(tiny_llama_dir):
    # transformers >= 5.25 kernelizes every model it loads, and again on every train()/eval() for
    # the device the model is on then; kernels refuses 'xla' ("Unsupported device type 'xla'").
    # move_model must hand XLA a model that train() and eval() leave alone.
    result = run_xla(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        from minilora_train.device import move_model, torch_device
        model = AutoModelForCausalLM.from_pretrained({tiny_llama_dir!r})
        loaded_with_kernels = bool(getattr(model, "use_kernels", False))
        model = move_model(model, torch_device("xla")).train()
        ids = torch.arange(12).reshape(2, 6).to(torch_device("xla"))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.eval()
        print(json.dumps({{"loss": loss.item(), "kernelized_at_load": loaded_with_kernels,
                          "device": str(next(model.parameters()).device)}}))
    """)
    assert result["device"].startswith("xla")
    assert result["loss"] > 0
    if kernels_installed():  # the case the fix is for: it must have been there to be undone
        assert result["kernelized_at_load"]


def test_after_move_model_no_train_or_eval_kernelizes_again(tiny_llama_dir, monkeypatch):
    # On CUDA, kernelizing at train() would fetch RMSNorm and RoPE code from the Hub at that moment
    # (or fail offline); the app runs transformers' torch layers on every device. The CPU stands in
    # for CUDA here: what matters is that nothing calls kernelize after the move.
    from transformers import AutoModelForCausalLM, modeling_utils

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    calls = []
    if hasattr(modeling_utils, "kernelize"):
        original = modeling_utils.kernelize
        monkeypatch.setattr(modeling_utils, "kernelize", lambda *a, **k: calls.append(k) or original(*a, **k))
    device.move_model(model, "cpu")
    calls.clear()  # undoing the load's kernelization is one call; none may follow
    model.train()
    model.eval()
    model.train()
    assert calls == []
    assert not getattr(model, "use_kernels", False)
    norm = model.model.norm
    assert norm.forward.__func__ is type(norm).forward  # transformers' own torch layer


def test_use_torch_layers_leaves_a_plain_module_alone():
    layer = torch.nn.Linear(3, 3)
    device.use_torch_layers(layer)
    assert layer(torch.ones(1, 3)).shape == (1, 3)


def fake_pci(root, devices):
    for i, (vendor, dev) in enumerate(devices):
        folder = root / f"0000:00:0{i}.0"
        folder.mkdir(parents=True)
        (folder / "vendor").write_text(vendor + "\n")
        (folder / "device").write_text(dev + "\n")
    return str(root)


def test_tpu_present_reads_the_pci_bus_without_importing_torch_xla(tmp_path, monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    gvnic = ("0x1ae0", "0x0042")  # Google's virtual NIC: Google's vendor id, not a TPU
    assert not device.tpu_present(fake_pci(tmp_path / "a", [("0x8086", "0x1234"), gvnic]))
    assert device.tpu_present(fake_pci(tmp_path / "b", [gvnic, ("0x1ae0", "0x006f")]))  # a v6e chip
    assert not device.tpu_present(str(tmp_path / "missing"))
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert device.tpu_present(str(tmp_path / "missing"))


def test_bf16_only_where_the_cpu_computes_it_natively():
    flags = "flags\t\t: fpu vme sse2 avx2 avx512f {}\n"
    assert device.cpu_has_native_bf16(flags.format("avx512_bf16"))        # AMD Zen 4, Intel Cooper Lake
    assert device.cpu_has_native_bf16(flags.format("amx_bf16 amx_tile"))  # Intel Sapphire Rapids
    assert not device.cpu_has_native_bf16(flags.format("avx512_vnni"))    # emulated: slower than float32
    assert not device.cpu_has_native_bf16("")


def test_device_auto_is_a_tpu_then_cuda_then_the_eager_cpu(monkeypatch):
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: object())  # torch_xla installed
    for tpu, cuda, expected in ((True, True, "xla"), (False, True, "cuda"), (False, False, "cpu")):
        monkeypatch.setattr(device, "tpu_present", lambda: tpu)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert device.resolve("auto") == expected
    assert device.resolve("xla") == "xla"  # XLA's CPU device: only when asked for


def test_the_demo_takes_bf16_where_the_device_computes_it_natively(monkeypatch):
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: object())  # torch_xla installed
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.native_bf16("cpu") and device.native_bf16("xla")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert not device.native_bf16("cpu")


def test_will_use_xla_follows_the_request(monkeypatch):
    monkeypatch.setattr(device, "tpu_present", lambda: False)
    assert device.will_use_xla("xla") and device.will_use_xla("xla:0")
    assert not device.will_use_xla("cpu") and not device.will_use_xla("cuda:1")
    assert not device.will_use_xla("auto")
    monkeypatch.setattr(device, "tpu_present", lambda: True)
    assert device.will_use_xla("auto") == (device.importlib.util.find_spec("torch_xla") is not None)
    assert not device.will_use_xla("auto", auto_picks_xla=False)


def test_inference_runs_where_training_ran_but_never_on_xla_unless_named(monkeypatch):
    """One device rule for generation and evaluation (inference_device) and for the demo's answers
    after training (generation_device_after); on a TPU VM "auto" trains on XLA but generates on the CPU."""
    monkeypatch.setattr(device, "tpu_present", lambda: True)
    monkeypatch.setattr(device, "resolve", lambda requested, auto_picks_xla=True: (
        "xla" if requested == "auto" and auto_picks_xla else "cpu" if requested == "auto" else requested))
    monkeypatch.setattr(device, "torch_device", lambda name: name)  # no torch_xla start-up for a name
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: object())  # torch_xla "installed"
    assert device.inference_device() == "cpu" and device.inference_device("xla") == "xla"
    assert device.inference_device(torch.device("cpu")) == torch.device("cpu")
    assert device.generation_device_after("auto") == "cpu"  # training picked XLA: answers leave it
    assert device.generation_device_after("xla") == "cpu"
    assert device.generation_device_after("cuda:1") == "cuda:1"  # not the default CUDA device


def test_an_eager_cpu_run_never_imports_torch_xla_and_prints_only_our_lines(tiny_model_dir, tiny_text_file, tmp_path):
    # What a new user sees first is minilora's output: no "Defaulting to PJRT_DEVICE=CPU" from a
    # torch_xla that accelerate imported, no progress bars of transformers' loads.
    code = (f"import json, sys; from minilora_train.cli import main; "
            f"code = main({train_argv(tiny_model_dir, tiny_text_file, tmp_path / 'out', '--max_steps', 2)!r}); "
            f"print(json.dumps({{'code': code, 'xla': 'torch_xla' in sys.modules, "
            f"'accelerate_xla': sys.modules.get('accelerate.utils.imports') is not None and "
            f"sys.modules['accelerate.utils.imports']._torch_xla_available}}))")
    env = {k: v for k, v in os.environ.items() if k not in ("USE_TORCH_XLA", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "xla": False, "accelerate_xla": False}
    assert "PJRT_DEVICE" not in proc.stderr
    assert "it/s]" not in proc.stderr and "Loading weights" not in proc.stderr, proc.stderr[-2000:]


def test_a_run_on_xla_keeps_torch_xla_visible_to_transformers(monkeypatch):
    from minilora_train.command import quiet_start

    for name in ("USE_TORCH_XLA", "HF_HUB_DISABLE_PROGRESS_BARS"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    quiet_start("xla")
    assert "USE_TORCH_XLA" not in os.environ
    quiet_start("cpu")
    assert os.environ["USE_TORCH_XLA"] == "0"
    monkeypatch.setenv("USE_TORCH_XLA", "1")  # the user's own setting wins
    quiet_start("cpu")
    assert os.environ["USE_TORCH_XLA"] == "1"
