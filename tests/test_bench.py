"""The benchmark (the bench package) and the structural properties its figures rest on. These tests
time nothing: speed and memory are the benchmark's to report, never a test's to assert.

- the unmerged forward and backward never form an out x in tensor, in a whole Llama, with dropout;
- LoRA dropout 0 runs no dropout op, and dropout p > 0 draws one mask per adapted Linear;
- switching adapters runs no tensor op and allocates no parameter;
- the XLA training step reads nothing back to the host except on logging steps (and evaluations);
- ``minilora-bench --quick`` runs end to end and writes its JSON and markdown.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import minilora
from conftest import make_tokenizer, medical_sentences, tiny_llama, write_jsonl
from test_layer import OpRecorder
from minilora_bench import cli, timing
from minilora_bench.inference import bench_switching
from minilora_bench.models import MASK_PATHS, Settings, mask_path
from minilora_bench.xla import bench_xla

# 3 x 7 = 21 token rows: no activation is shaped like any weight of the tiny Llama (64, 32, 128 wide).
IDS = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def session_keeps_its_xla_setting(monkeypatch):
    """cli.main keeps its process off XLA by setting USE_TORCH_XLA; the session's later tests, and
    the subprocesses they start, must see the session's own value again."""
    before = os.environ.get("USE_TORCH_XLA")
    monkeypatch.setattr(timing, "_SET_USE_TORCH_XLA", False)
    yield
    if before is None:
        os.environ.pop("USE_TORCH_XLA", None)
    else:
        os.environ["USE_TORCH_XLA"] = before


def test_bench_keeps_its_process_off_xla_and_gives_children_the_users_setting(monkeypatch):
    monkeypatch.delenv("USE_TORCH_XLA", raising=False)
    timing.keep_off_xla()
    assert os.environ["USE_TORCH_XLA"] == "0"  # transformers here never imports torch_xla
    assert "USE_TORCH_XLA" not in timing.child_env()  # the xla section's children run XLA as the user set it
    monkeypatch.setattr(timing, "_SET_USE_TORCH_XLA", False)
    monkeypatch.setenv("USE_TORCH_XLA", "1")  # the user's own setting wins, here and in the children
    timing.keep_off_xla()
    assert os.environ["USE_TORCH_XLA"] == "1" and timing.child_env()["USE_TORCH_XLA"] == "1"


def llama(dropout: float, **fields):
    model = minilora.inject(tiny_llama(vocab_size=100), r=4, dropout=dropout, **fields)
    with torch.no_grad():
        for _, p in minilora.lora_parameters(model):
            p.normal_(std=0.05)  # a trained adapter: B is not zero
    return model.train()


def train_step_ops(model) -> OpRecorder:
    with OpRecorder() as recorder:
        model(input_ids=IDS, labels=IDS).loss.backward()
    return recorder


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_llama_training_step_never_forms_an_out_by_in_tensor(dropout):
    model = llama(dropout)
    recorder = train_step_ops(model)
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = set()
    for _, layer in minilora.lora_modules(model):
        weight_shapes |= {tuple(layer.weight.shape), tuple(layer.weight.shape[::-1])}
    formed = [(name, tuple(t.shape)) for name, t in recorder.ops
              if tuple(t.shape) in weight_shapes and t.untyped_storage().data_ptr() not in parameter_storages]
    assert formed == []
    assert all(p.grad is not None for _, p in minilora.lora_parameters(model))
    assert all(layer.weight.grad is None for _, layer in minilora.lora_modules(model))


def dropout_ops(recorder) -> list[str]:
    return [name for name, _ in recorder.ops if any(w in name for w in ("dropout", "bernoulli", "rand"))]


def test_dropout_zero_runs_no_dropout_op_and_p_draws_one_mask_per_adapted_linear():
    assert dropout_ops(train_step_ops(llama(0.0))) == []

    model = llama(0.1)
    adapted = len(list(minilora.lora_modules(model)))
    ops = dropout_ops(train_step_ops(model))
    # One mask per adapted Linear per step, drawn by minilora's own op (from random words, or by
    # bernoulli_ where MKL runs it); backward re-applies it, draws none.
    assert ops == ["minilora.dropout_mask.default"] * adapted
    model.eval()
    with OpRecorder() as recorder, torch.no_grad():
        model(input_ids=IDS)
    assert dropout_ops(recorder) == []


@pytest.mark.parametrize("path", MASK_PATHS)
def test_the_benchmarks_mask_path_rows_draw_by_the_path_they_name(path):
    # The training section times minilora's dropout by both CPU paths on any machine: within
    # mask_path("bernoulli") the mask is bernoulli_'s draw, within "words" it is not, and the
    # machine's own choice is back afterwards.
    own = minilora.dropout.cpu_bernoulli_is_vectorised
    x = torch.zeros(64, 48)
    with mask_path(path):
        torch.manual_seed(1)
        drawn = minilora.dropout.dropout_mask(x, 0.25)
    torch.manual_seed(1)
    by_bernoulli = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.75)
    assert torch.equal(drawn, by_bernoulli) == (path == "bernoulli")
    assert minilora.dropout.cpu_bernoulli_is_vectorised is own
    with pytest.raises(ValueError, match="unknown mask path"):
        with mask_path("mkl"):
            pass


def test_switching_adapters_runs_no_tensor_op_and_allocates_no_parameter():
    result = bench_switching(Settings(switch_adapters=2, switch_rounds=4))  # the 1B-shaped set
    assert result["tensor_ops_during_switch"] == 0
    assert result["parameters_unchanged"]
    assert result["params_per_adapter"] == 11_272_192  # PEFT's count for Llama-3.2-1B, r=16, seven projections

    model = llama(0.0, adapter_name="a")
    minilora.inject(model, r=4, adapter_name="b")
    before = [(n, id(p), p.data_ptr()) for n, p in model.named_parameters()]
    modules = [id(m) for m in model.modules()]
    with OpRecorder() as recorder:
        minilora.set_adapter(model, "a")
        minilora.set_adapter(model, "b")
    assert recorder.ops == []
    assert [(n, id(p), p.data_ptr()) for n, p in model.named_parameters()] == before
    assert [id(m) for m in model.modules()] == modules


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-text")
    sentences = medical_sentences(300)
    records = write_jsonl(path / "records.jsonl", [{"question": s.split(".")[0] + "?", "answer": s} for s in sentences])
    make_tokenizer(path / "tokenizer", sentences)
    return str(path / "tokenizer"), records


def test_the_xla_training_step_reads_back_only_on_logging_steps(text_and_tokenizer, tmp_path):
    from conftest import require_xla

    require_xla()
    tokenizer_dir, records = text_and_tokenizer
    result = bench_xla(Settings(xla_updates=9), str(tmp_path), 1, tokenizer_dir, records,
                             compare_eager=False, compare_full=False)
    assert result["compiles_after_warmup"] == 0, result
    assert result["fallbacks_in_step"] == {}, result  # the logged losses and the evaluation only
    assert result["host_fallbacks_after_warmup"] == {
        "aten::_local_scalar_dense": result["designed_host_reads_after_warmup"]}


def test_bench_quick_runs_end_to_end_and_writes_json_and_markdown(text_and_tokenizer, tmp_path, capsys):
    from minilora_bench.models import native_mask_path

    _, records = text_and_tokenizer
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = cli.main(["--quick", "--only", "training,speed,inference,loop,packing", "--rounds", "1", "--threads", "1",
                       "--shape", "layers=2,hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=256,seq=32",
                       "--medquad", records, "--json", str(out), "--markdown", str(md)])
    assert code == 0
    results = json.loads(out.read_text())
    own = native_mask_path()
    other = next(m for m in MASK_PATHS if m != own)
    kinds = [(r["kind"], r["dropout"], r["mask"]) for r in results["training"]["cpu"]["rows"]]
    assert kinds == [("minilora", 0.0, None), ("peft", 0.0, None), ("minilora", 0.05, own), ("minilora", 0.05, other),
                     ("peft", 0.05, None), ("full", 0.0, None)]
    for row in results["training"]["cpu"]["rows"]:
        assert len(row["samples"]) == 1 and row["median"] > 0 and row["peak_memory_bytes"] > 0
    speed = results["speed"]["rows"]
    assert [(r["weights"], r["autocast_bf16"], r["top_layers"]) for r in speed] == [
        ("float32", False, 2), ("float32", True, 2), ("bfloat16", False, 2),
        ("float32", False, 1), ("float32", True, 1), ("bfloat16", False, 1)]
    assert speed[0]["vs_float32_all_layers"] == 1 and all(r["median"] > 0 for r in speed)
    assert set(results["inference"]["rows"]) == {"base", "unmerged", "merged"}
    assert results["packing"]["rows"][0]["efficiency"] > 0.9
    loop = results["loop"]["rows"]
    assert set(loop) == {"app (the default: chunked loss)", "app, --no-chunked_loss (full logits)", "bare loop"}
    assert all(row["update_seconds"] > 0 and row["peak_rss_bytes"] > 0 for row in loop.values())
    targets = {t["target"]: t for t in results["targets"]}
    for path in MASK_PATHS:  # both CPU paths' dropout targets, measured in the same rounds
        assert targets[f"minilora / PEFT training step, dropout 0.05, {path} mask"]["value"] is not None
        assert targets[f"minilora step with dropout 0.05 / without, {path} mask"]["value"] is not None
    assert targets["the app's update / a bare loop's (eager CPU)"]["value"] is not None
    assert targets["the app's peak RSS, chunked loss / full logits (2 x 32)"]["value"] is not None
    assert targets["XLA compiles after warm-up"]["value"] is None  # not run here
    text = md.read_text()
    assert "### Targets" in text and "| minilora LoRA, dropout 0 |" in text and "| bfloat16 weights, top 1 layers |" in text
    assert text in capsys.readouterr().out


def test_bench_quick_loop_rows_and_no_memory_column(text_and_tokenizer, tmp_path):
    _, records = text_and_tokenizer
    out = tmp_path / "bench.json"
    code = cli.main(["--quick", "--only", "training,loop", "--rounds", "1", "--warmup", "0", "--memory-steps", "0",
                     "--loop-rows", "app,app-full", "--loop-updates", "4", "--threads", "1", "--shape",
                     "layers=1,hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=256,seq=32,batch=2",
                     "--medquad", records, "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert not any("peak_memory_bytes" in r for r in results["training"]["cpu"]["rows"])
    loop = results["loop"]["rows"]
    assert set(loop) == {"app (the default: chunked loss)", "app, --no-chunked_loss (full logits)"}
    assert all(row["time_vs_bare"] is None for row in loop.values())  # no bare loop ran: no ratio to it
    targets = {t["target"]: t for t in results["targets"]}
    assert targets["the app's update, chunked loss / full logits (2 x 32)"]["value"] > 0
    assert targets["the app's update / a bare loop's (eager CPU)"]["value"] is None


def test_bench_multi_times_the_four_contenders_and_checks_minilora_against_peft(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["--quick", "--only", "multi", "--threads", "1", "--json", str(out), "--multi-shape",
                     "layers=1,hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=256"]) == 0
    multi = json.loads(out.read_text())["multi"]
    assert [(r["adapters"], r["rows"]) for r in multi["rows"]] == [(1, 32), (4, 32), (16, 32)]
    for row in multi["rows"]:
        assert row["max_abs_logit_diff_vs_peft"] < 1e-5  # the same 16 adapters give PEFT's logits
        for phase in ("decode", "prefill"):
            assert {"minilora", "PEFT", "one adapter", "no adapter"} <= set(row[phase])
            assert row[phase]["minilora_vs_peft"] > 0 and row[phase]["minilora_vs_one_adapter"] > 0
            assert row[phase]["no_adapter_vs_peft"] > 0  # the floor under every adapter implementation
    notes = {t["target"]: t["note"] for t in json.loads(out.read_text())["targets"]}
    assert notes["decode, 16 adapters in a batch of 32: minilora / PEFT time"].startswith("the base alone, no adapter: ")
    targets = {t["target"]: t["value"] for t in json.loads(out.read_text())["targets"]}
    assert targets["decode, 16 adapters in a batch of 32: minilora / PEFT time"] is not None
    assert targets["prefill, a batch over 16 adapters / the same batch through one adapter"] is not None
    assert "### Many adapters in one batch (cpu, float32)" in capsys.readouterr().out


def test_bench_refuses_unknown_sections_and_bad_shapes(capsys):
    assert cli.main(["--only", "trainig"]) == 2
    assert "unknown section(s) trainig" in capsys.readouterr().err
    assert cli.main(["--shape", "layers=two"]) == 2
    assert "--shape layers=two" in capsys.readouterr().err
    assert cli.main(["--multi-shape", "smollm3"]) == 2
    assert "--multi-shape smollm3: unknown shape 'smollm3'" in capsys.readouterr().err
    assert cli.main(["--loop-rows", "app,bear"]) == 2
    assert "--loop-rows app,bear: choose from app, app-full, app-trim, app-mmap, app-compile, bare" in capsys.readouterr().err
    assert cli.main(["--loop-updates", "3"]) == 2
    assert "--loop-updates 3: give at least 4" in capsys.readouterr().err


def test_the_compile_loop_row_reports_its_warm_up_and_the_most_compiles_any_run_made_after_it():
    # The loop section's --compile row keeps each run's compile counts (minilora_train.loop.run's summary);
    # the report takes the median warm-up and the worst run's compiles after warm-up.
    from minilora_bench import report

    def runs(*counts):
        return [{"compile": {"warmup_seconds": w, "compiles_during_warmup": d, "compiles_after_warmup": a}}
                for w, d, a in counts]

    rows = {"app (the default: chunked loss)": {"update_seconds": 2.0, "time_vs_bare": None, "memory_vs_bare": None,
                                               "samples": [{}, {}]},
            "app, --compile": {"update_seconds": 1.5, "samples": runs((300.0, 2, 0), (280.0, 2, 1), (290.0, 2, 0))}}
    results = {"loop": {"rows": rows, "batch": 8, "seq": 128}}
    target = next(t for t in report.targets(results) if "--compile" in t["target"])
    assert (target["value"], target["met"]) == (1, False)
    assert target["note"] == "update, --compile / eager 0.750; warm-up 290 s, 2 compiles"
    assert report._compile_counts(rows["app (the default: chunked loss)"]) == {}


def test_the_loop_sections_cuda_results_are_judged_by_gpu_memory_against_the_gpu_target():
    # On CUDA the loop section's memory is the GPU's peak allocation (peak_bytes), its chunked-loss
    # target 0.80 rather than the CPU's 0.85, and its table gains the GPU columns; the CPU's rows
    # keep their RSS. (No GPU here: the rows are given, the report's reading of them is tested.)
    from minilora_bench import report
    from minilora_bench.loop import LOOP_ROWS

    def row(seconds, gpu, rss, bare=None):
        return {"update_seconds": seconds, "peak_bytes": gpu, "peak_rss_bytes": rss, "system_seconds": 1.0,
                "minor_faults": 10.0, "time_vs_bare": bare and seconds / bare[0],
                "memory_vs_bare": bare and gpu / bare[1], "rss_vs_bare": bare and rss / bare[2], "samples": [{}]}

    bare = (1.0, 100 * 2**20, 900 * 2**20)
    loop = {"rows": {LOOP_ROWS["app"][0]: row(0.98, 78 * 2**20, 1000 * 2**20, bare),
                     LOOP_ROWS["app-full"][0]: row(1.0, 100 * 2**20, 950 * 2**20, bare),
                     LOOP_ROWS["bare"][0]: row(*bare, bare)},
            "device": "cuda", "batch": 8, "seq": 2048, "vocab": 128256, "r": 16, "dropout": 0.05, "updates": 5,
            "rounds": 1}
    targets = {t["target"]: t for t in report.targets({"loop_cuda": loop})}
    chunked = targets["the app's peak GPU memory, chunked loss / full logits (8 x 2048) (cuda)"]
    assert (round(chunked["value"], 2), chunked["limit"], chunked["met"]) == (0.78, 0.80, True)
    assert targets["the app's peak GPU memory / a bare loop's (cuda)"]["value"] == 0.78
    assert targets["the app's peak RSS / a bare loop's"]["value"] is None  # the CPU's row: not measured
    table = "\n".join(report._loop_table(loop))
    assert "(CUDA, bfloat16 base)" in table and "| peak GPU memory (MiB) | vs bare | peak RSS (MiB) |" in table
    assert f"| {LOOP_ROWS['app'][0]} | 0.980 | 0.980 | 78 | 0.780 | 1,000 | 1.111 |" in table



def test_bench_gguf_section_times_the_block_base_against_plain_weights(tmp_path, smollm2, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(smollm2[0].parent))  # the session's conversion: config and tokenizer
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = cli.main(["--quick", "--only", "gguf", "--rounds", "1", "--warmup", "0", "--threads", "1",
                     "--shape", "batch=1,seq=8", "--json", str(out), "--markdown", str(md)])
    assert code == 0
    gguf = json.loads(out.read_text())["gguf"]
    assert [r["label"] for r in gguf["rows"]] == [
        "plain weights, all layers", "GGUF Q4_1 blocks, all layers", "plain weights, top 8 layers",
        "GGUF Q4_1 blocks, top 8 layers"]
    plain, blocks = gguf["rows"][:2]
    assert blocks["weight_bytes"] <= gguf["file_tensor_bytes"] < plain["weight_bytes"]
    assert plain["vs_plain"] == 1 and all(r["median"] > 0 for r in gguf["rows"])
    assert "GGUF Q4_1 blocks, top 8 layers" in md.read_text()


def test_the_decode_floor_script_times_its_five_contenders_and_refuses_bad_counts(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "scripts" / "lab" / "decode_floor.py"
    spec = importlib.util.spec_from_file_location("decode_floor", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.run(layers=1, adapters=2, rows=2, tokens=3, rounds=1)
    seconds = results["decode_seconds"]
    assert list(seconds) == ["transformers, no adapters", "minilora, adapters disabled", "minilora, one adapter",
                             "PEFT, adapters disabled", "PEFT, one adapter"]
    assert all(0 < r["min"] <= r["median"] for r in seconds.values())
    modules = results["modules"]  # the adapted models hold a module per adapter and layer beside the base's
    assert modules["minilora"] > modules["transformers"] and modules["PEFT"] > modules["transformers"]
    with pytest.raises(SystemExit) as exit_:
        script.main(["--rounds", "0"])
    assert exit_.value.code == 2 and "every count must be at least 1" in capsys.readouterr().err
