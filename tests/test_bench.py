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

import pytest
import torch

import minilora
from conftest import assert_close_to_rounding, make_tokenizer, medical_sentences, tiny_llama, write_jsonl
from test_layer import OpRecorder
from minilora_bench import cli
from minilora_bench.inference import bench_switching
from minilora_bench.models import MASK_PATHS, Settings, mask_path
from minilora_bench.xla import bench_xla

# 3 x 7 = 21 token rows: no activation is shaped like any weight of the tiny Llama (64, 32, 128 wide).
IDS = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))


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


@pytest.mark.parametrize("vectorised_bernoulli", [False, True])
def test_dropout_mask_keeps_each_element_with_probability_one_minus_p(vectorised_bernoulli, monkeypatch):
    # both ways of drawing it: 16-bit uniforms from random words, and bernoulli_ (Intel CPUs, devices)
    monkeypatch.setattr(minilora.layer, "_cpu_bernoulli_is_vectorised", lambda: vectorised_bernoulli)
    x = torch.zeros(1000, 1000)
    for p in (0.05, 0.1, 0.5):
        keep = minilora.layer.dropout_mask(x, p)
        assert keep.dtype == torch.bool and keep.shape == x.shape
        # a binomial over 10^6 elements: 5 standard deviations (p's 16-bit rounding, <= 2^-17, is
        # 150 times smaller than one)
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / 1e6) ** 0.5
    # elements are independent: no pattern within a 64-bit word (the random-word path gives four
    # elements one word) nor between neighbouring words
    keep = minilora.layer.dropout_mask(torch.zeros(400_000), 0.5).float().view(-1, 8)
    pairs = (keep[:, :-1] * keep[:, 1:]).mean(0)  # P(both kept) for neighbours 0-1, ..., 6-7
    assert (pairs - 0.25).abs().max() < 5 * (0.25 * 0.75 / 50_000) ** 0.5
    torch.manual_seed(3)
    first = minilora.layer.dropout_mask(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(first, minilora.layer.dropout_mask(x, 0.1))  # torch's generator drives it
    assert not torch.equal(first, minilora.layer.dropout_mask(x, 0.1))


def test_dropout_mask_is_one_byte_per_element_on_cpus_and_gpus():
    # "meta" stands in for a GPU here (any device but CPU and XLA); scripts/gpu_check.py checks
    # the values and gradients on CUDA itself. XLA keeps x's dtype (its compiler fuses the mask).
    assert minilora.layer.dropout_mask(torch.zeros(8, 16, device="meta", dtype=torch.bfloat16), 0.1).dtype == torch.bool
    assert minilora.layer.dropout_mask(torch.zeros(8, 16, dtype=torch.bfloat16), 0.1).dtype == torch.bool


# Each CPU path is tested on every machine: bernoulli_ (ATen's MKL kernel on Intel CPUs) and the
# random-word draw (elsewhere); bool is the mask CPUs and GPUs draw, float the one XLA draws.
# x_grad False: the input needs no gradient (the first layer's projections over a frozen
# embedding), so backward applies the mask to x alone, writing into its converted copy.
@pytest.mark.parametrize("vectorised_bernoulli", [False, True])
@pytest.mark.parametrize("mask_dtype,dtype,x_grad", [("float", torch.float32, True), ("bool", torch.float32, True),
                                                     ("bool", torch.float32, False), ("bool", torch.bfloat16, True)])
def test_dropout_trains_exactly_as_composed_torch_ops_with_the_same_mask(mask_dtype, dtype, x_grad,
                                                                       vectorised_bernoulli, monkeypatch):
    from torch import nn

    monkeypatch.setattr(minilora.layer, "_cpu_bernoulli_is_vectorised", lambda: vectorised_bernoulli)
    if mask_dtype == "float":
        draw = minilora.layer.dropout_mask
        monkeypatch.setattr(minilora.layer, "dropout_mask", lambda x, p, site=0: draw(x, p).to(x.dtype))

    torch.manual_seed(0)
    layer = minilora.LoRALinear(nn.Linear(48, 80).to(dtype))
    layer.weight.requires_grad_(False)
    adapter = layer.add_adapter("default", 4, 8.0, dropout=0.25)
    layer.active_adapter = "default"
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(2, 5, 48, dtype=dtype, requires_grad=x_grad)
    torch.manual_seed(7)
    layer.train()(x).float().square().sum().backward()
    got = (adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone()) + ((x.grad.clone(),) if x_grad else ())

    torch.manual_seed(7)
    keep = minilora.layer.dropout_mask(x, 0.25)  # the same draw the layer made
    assert keep.dtype == (torch.bool if mask_dtype == "bool" else x.dtype)
    x.grad = adapter.lora_A.grad = adapter.lora_B.grad = None
    a, b = adapter.lora_A, adapter.lora_B
    xf = x.float()  # the reference in float32, from the same (rounded) inputs
    y = nn.functional.linear(xf, layer.weight.float(), layer.bias.float()) + (xf * keep / 0.75) @ a.T @ b.T * adapter.scaling
    y.square().sum().backward()
    for ours, reference in zip(got, (a.grad, b.grad) + ((x.grad,) if x_grad else ())):
        if dtype == torch.float32:
            # The same arithmetic in another order: the fused node adds the adapter inside the base
            # GEMM. Its longest sums run over the 48 inputs plus the 80 outputs (x's gradient).
            assert_close_to_rounding(ours, reference, reduction=48 + 80)
        else:
            # bfloat16 GEMMs accumulate in float32 and round their results: the fused node rounds
            # each intermediate (the r-wide product, the output, the gradients' products) to
            # bfloat16 once, at most 6 roundings along any path, each within bfloat16's eps of the
            # largest value. A wrong mask moves a quarter of the terms.
            eps = torch.finfo(dtype).eps
            scale = reference.abs().max().item()
            torch.testing.assert_close(ours.float(), reference.float(), rtol=6 * eps, atol=6 * eps * scale)


@pytest.mark.parametrize("vectorised_bernoulli", [False, True])
def test_the_mask_converts_through_its_bytes_to_exactly_its_float_and_bfloat16_values(vectorised_bernoulli,
                                                                                      monkeypatch):
    # _multiplier reads the bool mask's bytes as int8 (vectorised); that is the mask only if every
    # byte either draw writes is 0 or 1, on both CPU paths.
    monkeypatch.setattr(minilora.layer, "_cpu_bernoulli_is_vectorised", lambda: vectorised_bernoulli)
    x = torch.zeros(300, 257)  # an odd element count: the random-word draw's last word is cut
    for p in (0.05, 0.5, 0.999):
        keep = minilora.layer.dropout_mask(x, p)
        assert set(keep.view(torch.int8).unique().tolist()) <= {0, 1}
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(minilora.layer._multiplier(keep, x.to(dtype)), keep.to(dtype))


@pytest.mark.parametrize("p", [1e-6, 0.05, 0.1, 0.5, 0.99999])
def test_the_random_word_mask_drops_exactly_the_16_bit_uniforms_below_p(p, monkeypatch):
    # The word path's threshold: element i is dropped when its 16-bit uniform (the words' bytes
    # read as int16) is below round(p * 2^16) - 2^15, so p' = round(p * 2^16) / 2^16 (at most
    # 2^16 - 1 of them), within 2^-17 of p.
    monkeypatch.setattr(minilora.layer, "_cpu_bernoulli_is_vectorised", lambda: False)
    x = torch.zeros(1000, 77)
    torch.manual_seed(5)
    keep = minilora.layer.dropout_mask(x, p)
    torch.manual_seed(5)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)
    uniform = words.view(torch.int16)[:x.numel()].view(x.shape).to(torch.int32)
    assert torch.equal(keep, uniform >= min(round(p * 2**16), 2**16 - 1) - 2**15)


@pytest.mark.parametrize("path", MASK_PATHS)
def test_the_benchmarks_mask_path_rows_draw_by_the_path_they_name(path):
    # The training section times minilora's dropout by both CPU paths on any machine: within
    # mask_path("bernoulli") the mask is bernoulli_'s draw, within "words" it is not, and the
    # machine's own choice is back afterwards.
    own = minilora.layer._cpu_bernoulli_is_vectorised
    x = torch.zeros(64, 48)
    with mask_path(path):
        torch.manual_seed(1)
        drawn = minilora.layer.dropout_mask(x, 0.25)
    torch.manual_seed(1)
    by_bernoulli = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.75)
    assert torch.equal(drawn, by_bernoulli) == (path == "bernoulli")
    assert minilora.layer._cpu_bernoulli_is_vectorised is own
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


def test_bench_multi_times_the_three_contenders_and_checks_minilora_against_peft(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["--quick", "--only", "multi", "--threads", "1", "--json", str(out), "--multi-shape",
                     "layers=1,hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=256"]) == 0
    multi = json.loads(out.read_text())["multi"]
    assert [(r["adapters"], r["rows"]) for r in multi["rows"]] == [(1, 32), (4, 32), (16, 32)]
    for row in multi["rows"]:
        assert row["max_abs_logit_diff_vs_peft"] < 1e-5  # the same 16 adapters give PEFT's logits
        for phase in ("decode", "prefill"):
            assert {"minilora", "PEFT", "one adapter"} <= set(row[phase])
            assert row[phase]["minilora_vs_peft"] > 0 and row[phase]["minilora_vs_one_adapter"] > 0
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

