"""train/demo_assets.py: the embedded default's text readers, tokenizer and cache."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest

from train import demo_assets
from train.demo_assets import (DemoAssets, DemoSettings, cache_dir, prepare_assets,
                               read_fortune_file, read_fortunes, read_icd10cm, read_jsonl,
                               split_holdout, train_tokenizer)

# An XML/HTML tag: "<desc>", "</note>", "<extension char='A'/>". Plain "<2 years" is real text.
TAG = re.compile(r"</?[A-Za-z][\w.-]*(\s[^<>]*)?/?>")

# Small enough that every build in these tests takes well under a second of model work.
TINY = DemoSettings(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, seq_len=32, pretrain_steps=1)


@pytest.fixture(scope="module")
def icd_documents():
    return read_icd10cm()


@pytest.fixture(scope="module")
def fortunes():
    return read_fortunes()


def offensive_fortune_files() -> list[Path]:
    dist = importlib.metadata.distribution(demo_assets.FORTUNES_PACKAGE)
    return [Path(dist.locate_file(f)) for f in dist.files
            if Path(str(f)).parent.name == "fortune" and str(f).endswith("-o")]


# ---- ICD-10-CM --------------------------------------------------------------------------------

def test_icd10cm_documents_carry_descriptions_and_notes_without_markup(icd_documents):
    import simple_icd_10_cm as cm

    by_code = {doc.split(" ", 1)[0]: doc for doc in icd_documents}
    # The description comes from the package's own API; the literal is CDC's text for A00.0.
    assert cm.get_description("A00.0") == "Cholera due to Vibrio cholerae 01, biovar cholerae"
    assert by_code["A00.0"].startswith("A00.0 Cholera due to Vibrio cholerae 01, biovar cholerae\n")
    assert "Inclusion terms: Classical cholera" in by_code["A00.0"]
    assert by_code["E11.9"].startswith("E11.9 Type 2 diabetes mellitus without complications")
    assert "Excludes2: old myocardial infarction (I25.2);" in by_code["I21"]
    # A multi-line "use additional code" note reads as one sentence after its colon.
    assert "Use additional code: code, if applicable, to identify: exposure to" in by_code["I21"]
    assert "7th characters: A initial encounter for closed fracture;" in by_code["S72"]
    for label in ("Includes:", "Excludes1:", "Excludes2:", "Note:", "Code first:", "Code also:"):
        assert any(f"\n{label} " in doc for doc in icd_documents), label
    assert not any(TAG.search(doc) for doc in icd_documents)
    assert not any("\t" in doc for doc in icd_documents)


def test_icd10cm_keeps_every_code_but_the_generated_seventh_character_ones(icd_documents):
    import simple_icd_10_cm as cm

    codes = [doc.split(" ", 1)[0] for doc in icd_documents]
    expected = [c for c in cm.get_all_codes() if not cm.is_extended_subcategory(c)]
    assert [c for c in codes if c != "Chapter"] == [c for c in expected if not cm.is_chapter(c)]
    assert "S72.001A" not in codes
    # B10 is both a block and its only category: both documents are there, block first.
    b10 = [doc for doc in icd_documents if doc.startswith("B10 ")]
    assert [d.split("\n")[0] for d in b10] == [
        f"B10 {cm.get_description('B10', prioritize_blocks=True)}",
        f"B10 {cm.get_description('B10')}"]


# ---- fortunes ---------------------------------------------------------------------------------

def test_fortunes_leave_out_the_offensive_files(fortunes):
    offensive = offensive_fortune_files()
    assert {p.name for p in offensive} == {"fortunes-o", "murphy-o"}
    assert not any(p.name.endswith("-o") for p in demo_assets.fortune_files())
    offensive_records = {r for p in offensive for r in read_fortune_file(p)}
    assert len(offensive_records) > 2000
    assert offensive_records.isdisjoint(fortunes)
    assert len(fortunes) == sum(len(read_fortune_file(p)) for p in demo_assets.fortune_files())


def test_fortune_attribution_stays_inside_its_record(tmp_path, fortunes):
    path = tmp_path / "sample"
    path.write_text("%% $FreeBSD$\n%\nLine one\n\tindented\n\t\t-- Author, \"Book\"\n%\n"
                    "Second\n%% a comment inside\n%\n\n%\n")
    assert read_fortune_file(path) == [
        'Line one\n        indented\n                -- Author, "Book"', "Second"]

    # The same on the real file: the first record whose last line is a tab-indented attribution.
    main = next(p for p in demo_assets.fortune_files() if p.name == "fortunes")
    raw = next(r for r in main.read_text().split("\n%\n")
               if r.split("\n")[-1].startswith("\t\t-- "))
    assert raw.expandtabs(8) in fortunes
    assert not any("\t" in r for r in fortunes)
    # No tab-indented attribution became a record of its own (zippy has one "-- ... --" record).
    assert not any(re.fullmatch(r" {8,}-- .*", r) for r in fortunes)
    assert not any("$FreeBSD$" in r for r in fortunes)


# ---- split and tokenizer ----------------------------------------------------------------------

def test_split_holdout_is_deterministic_and_disjoint():
    texts = [f"text {i}" for i in range(100)]
    train, val = split_holdout(texts, 0.1, seed=3)
    assert (train, val) == split_holdout(texts, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == sorted(texts)
    assert split_holdout(texts, 0.1, seed=4)[1] != val
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(texts, 1.0, seed=0)


def test_tokenizer_round_trips_and_loads_with_auto_tokenizer(tmp_path, fortunes):
    from transformers import AutoTokenizer

    tokenizer = train_tokenizer(fortunes[:2000], 512, tmp_path / "tok")
    text = "A00.0 Cholera due to Vibrio cholerae\n        -- Ünïcode, tabs\tand  spaces 😀"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == 512

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(text)["input_ids"] == ids
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")
    assert len({loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id}) == 3


# ---- the cache --------------------------------------------------------------------------------

@pytest.fixture
def small_sources(monkeypatch, fortunes, icd_documents):
    """Real text, but a slice of it, so each build takes about a second."""
    monkeypatch.setattr(demo_assets, "read_fortunes", lambda: fortunes[:400])
    monkeypatch.setattr(demo_assets, "read_icd10cm", lambda: icd_documents[:400])


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_prepare_assets_builds_everything_and_the_base_loads(tmp_path, small_sources):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = prepare_assets(TINY, cache_root=tmp_path)
    assert assets.root == cache_dir(TINY, tmp_path) == tmp_path / f"demo-{TINY.cache_key()}"
    assert [p.name for p in tmp_path.iterdir()] == [assets.root.name]  # no temporary left behind

    general_val = read_jsonl(assets.general_validation)
    medical_val = read_jsonl(assets.medical_validation)
    assert (len(read_jsonl(assets.general_train)), len(general_val)) == (380, 20)
    assert (len(read_jsonl(assets.medical_train)), len(medical_val)) == (380, 20)
    assert set(medical_val) <= set(demo_assets.read_icd10cm())
    manifest = json.loads(assets.manifest.read_text())
    assert manifest["documents"]["medical_validation"] == 20

    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.untrained_dir)
    assert model.config.vocab_size == len(tokenizer) == TINY.vocab_size
    assert model.get_input_embeddings().weight.shape == (TINY.vocab_size, TINY.hidden_size)
    assert model.config.num_key_value_heads == TINY.num_kv_heads
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with_model = AutoTokenizer.from_pretrained(assets.untrained_dir)
    assert with_model("x")["input_ids"] == tokenizer("x")["input_ids"]

    assert not assets.is_pretrained()
    assets.mark_pretrained({"validation_perplexity": 123.0})
    assert DemoAssets(assets.root, TINY).is_pretrained()
    assert assets.pretrained_info()["validation_perplexity"] == 123.0


def test_prepare_assets_reuses_rebuilds_and_keys_by_settings(tmp_path, small_sources):
    first = prepare_assets(TINY, cache_root=tmp_path)
    before = mtimes(first.root)

    again = prepare_assets(TINY, cache_root=tmp_path)
    assert again.root == first.root and mtimes(again.root) == before

    other = prepare_assets(DemoSettings(**{**TINY.__dict__, "seed": 1}), cache_root=tmp_path)
    assert other.root != first.root and mtimes(first.root) == before

    first.mark_pretrained()
    rebuilt = prepare_assets(TINY, cache_root=tmp_path, rebuild=True)
    assert rebuilt.root == first.root and not rebuilt.is_pretrained()
    after = mtimes(rebuilt.root)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.root.name, other.root.name])


def test_prepare_assets_uses_the_copy_of_a_run_that_finished_first(tmp_path, small_sources,
                                                                    monkeypatch):
    build = demo_assets._build

    def build_while_another_run_finishes(assets):
        # The other run completes between our start and our rename.
        monkeypatch.setattr(demo_assets, "_build", build)
        winner.append(prepare_assets(TINY, cache_root=tmp_path))
        build(assets)

    winner = []
    monkeypatch.setattr(demo_assets, "_build", build_while_another_run_finishes)
    assets = prepare_assets(TINY, cache_root=tmp_path)
    assert assets.root == winner[0].root
    assert [p.name for p in tmp_path.iterdir()] == [assets.root.name]


def test_default_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir(TINY).parent == tmp_path / "minilora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir(TINY).parent == tmp_path / "home" / ".cache" / "minilora"
    assert DemoSettings().cache_key() == DemoSettings().cache_key() != TINY.cache_key()
