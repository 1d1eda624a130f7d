"""scripts/lab/forgetting_sweep.py: the choice of best points, the matched-gain comparison and the
published JSON agreeing with itself. The sweep's runs go through minilora_train.loop.run, tested elsewhere."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("forgetting_sweep", os.path.join(ROOT, "scripts", "lab", "forgetting_sweep.py"))
sweep = importlib.util.module_from_spec(spec)
sys.modules["forgetting_sweep"] = sweep  # dataclasses look their module up
spec.loader.exec_module(sweep)


def fake_run(method, lr, medical, general, drift, seed=0, remedy="none"):
    point = sweep.Point(method, lr, seed, remedy)
    return {"id": point.id, "method": method, "lr": lr, "seed": seed, "remedy": remedy,
            "base": {"medical": 10.0, "general": 100.0},
            "final": {"medical": 10.0 * (1 + medical / 100), "general": 100.0 * (1 + general / 100)},
            "chat_drift": drift}


def test_the_best_point_meets_the_target_with_least_drift_else_learns_most():
    runs = [fake_run("full", 1e-5, -15, 0, 0.05), fake_run("full", 3e-5, -25, 2, 0.20),
            fake_run("full", 1e-4, -40, 4, 0.10), fake_run("full", 3e-4, -50, 9, 0.01),
            fake_run("full", 1e-4, -60, 0, 0.0, seed=1)]  # other seeds do not choose
    assert sweep.best_point(runs, "full") == sweep.Point("full", 1e-4)
    runs = [fake_run("lora-r8-attn", 3e-4, -5, 0, 0.01), fake_run("lora-r8-attn", 1e-3, -12, 0, 0.02)]
    assert sweep.best_point(runs, "lora-r8-attn") == sweep.Point("lora-r8-attn", 1e-3)
    assert sweep.best_point(runs, "full") is None


def test_matched_gain_interpolates_each_curve_at_full_fine_tunings_gains():
    runs = [fake_run("full", 1e-5, -20, 1, 0.10), fake_run("full", 3e-5, -40, 3, 0.30),
            fake_run("lora-r16-all", 3e-4, -10, 0, 0.00), fake_run("lora-r16-all", 1e-3, -30, 2, 0.10),
            fake_run("lora-r16-all", 3e-3, -50, 6, 0.50),
            fake_run("full", 1e-5, -22, 1, 0.12, seed=1), fake_run("full", 1e-5, -18, 1, 0.08, seed=2)]
    summary = sweep.summarize(runs)
    matched = {row["medical"]: row for row in summary["matched"]}
    assert set(matched) == {-40.0, -20.0}
    assert matched[-20.0]["lora-r16-all"]["drift"] == pytest.approx(0.05)  # halfway between -10% and -30%
    assert matched[-40.0]["lora-r16-all"]["general"] == pytest.approx(4.0)
    assert matched[-20.0]["full"]["drift"] == pytest.approx(0.10)
    full = summary["methods"]["full"]
    assert full["best_lr"] == 1e-5 and full["seeds"] == [0, 1, 2]
    assert full["best_medical_mean"] == pytest.approx(-20.0) and full["best_medical_std"] == pytest.approx(2.0)
    curve = [{"medical": m, "drift": d, "general": 0.0} for m, d in ((-10, 0.1), (-30, 0.3), (-20, 0.6))]
    assert sweep.at_medical(curve, -40) is None  # never extrapolated
    assert sweep.at_medical(curve, -25)["drift"] == pytest.approx(0.25)  # the lower of two crossings (0.25, 0.45)


def test_remedies_are_reported_beside_the_same_run_without_them():
    runs = [fake_run("full", 1e-5, -20, 1, 0.10), fake_run("full", 1e-5, -18, -1, 0.04, remedy="self-distill-25")]
    remedy, = sweep.summarize(runs)["remedies"]
    assert remedy["remedy"] == "self-distill-25" and remedy["without"]["drift"] == 0.10 and remedy["drift"] == 0.04


def test_points_are_named_and_parsed_both_ways():
    point = sweep.Point("lora-r64-attn", 3e-3, 2, "replay-general-10")
    assert sweep.Point.parse(point.id) == point
    with pytest.raises(SystemExit, match="methods are"):
        sweep.Point.parse("lora-r32-all lr=1e-3 seed=0")
    with pytest.raises(SystemExit, match="expected"):
        sweep.Point.parse("full lr=x")


def test_the_published_sweep_agrees_with_its_own_runs():
    path = sweep.DEFAULT_JSON
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: run scripts/lab/forgetting_sweep.py")
    with open(path) as f:
        published = json.load(f)
    assert published["summary"] == json.loads(json.dumps(sweep.summarize(published["runs"])))
    ids = [r["id"] for r in published["runs"]]
    assert len(ids) == len(set(ids))
    assert {p.id for p in sweep.grid()} <= set(ids)  # the whole grid was run


def test_the_doc_shows_the_published_tables():
    with open(sweep.DEFAULT_JSON) as f:
        published = json.load(f)
    with open(os.path.join(ROOT, "docs", "forgetting.md")) as f:
        doc = f.read()
    missing = [line for line in sweep.tables(published).splitlines() if line and line not in doc]
    assert not missing, f"docs/forgetting.md lacks {len(missing)} table line(s), e.g. {missing[0]!r}"
    with open(os.path.join(ROOT, "docs", "measurements", "forgetting-long.json")) as f:
        longer = json.load(f)  # the 10x runs, with and without the remedy
    assert {r["remedy"] for r in longer["runs"]} == {"none", "self-distill-25"}
    missing = [line for line in sweep.long_table(longer).splitlines() if line and line not in doc]
    assert not missing, f"docs/forgetting.md lacks {len(missing)} line(s) of the 10x runs, e.g. {missing[0]!r}"


def test_plotting_a_file_without_runs_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "quiet_start", lambda device: None)  # it would set this session's environment
    missing = tmp_path / "none.json"
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--plot_only", "--json", str(missing)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"{missing} holds no runs to plot")
    assert list(tmp_path.iterdir()) == []
