"""`import minilora` stays light (torch and safetensors only), exports the public API, and its modules
import each other in one direction only."""

from conftest import run_python

HEAVY = ["transformers", "peft", "torch_xla", "datasets"]


def test_import_minilora_loads_none_of_the_heavy_packages():
    # A fresh interpreter: this test process has imported transformers and peft already.
    result = run_python(f"""
        import json, sys
        import minilora
        print(json.dumps({{"loaded": [m for m in {HEAVY!r} if m in sys.modules],
                          "file": minilora.__file__}}))
    """)
    assert result["loaded"] == []
    assert result["file"].endswith("minilora/__init__.py")


def test_the_public_api_is_exported():
    import minilora

    # The names issue 2 asks for; __all__ may hold more, never fewer.
    wanted = {"LoRALinear", "LoRAConfig", "AdapterLoadError", "inject", "merge", "unmerge", "merge_and_unload",
              "lora_parameters", "mark_only_lora_trainable", "count_parameters", "print_trainable_parameters",
              "lora_state_dict", "save_adapter", "load_adapter", "set_adapter", "active_adapter",
              "delete_adapter", "disable_adapters", "enable_input_require_grads"}
    assert wanted <= set(minilora.__all__)
    assert all(hasattr(minilora, name) for name in minilora.__all__)
    assert issubclass(minilora.AdapterLoadError, ValueError)


def test_the_wheel_installs_only_names_that_cannot_clash(tmp_path):
    # train/ and bench/ install as minilora_train and minilora_bench: a top-level "train" in
    # site-packages would shadow, or be shadowed by, any other project's.
    import subprocess
    import sys
    import zipfile

    from conftest import ROOT

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), ROOT], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("minilora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"minilora", "minilora_train", "minilora_bench"}
    assert "minilora_train/assets/medquad.jsonl.gz" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("minilora-train = minilora_train.cli:main", "minilora-generate = minilora_train.inference:main",
                    "minilora-eval = minilora_train.evaluate:main", "minilora-bench = minilora_bench.cli:main"):
        assert command in scripts


def test_minilora_modules_import_each_other_in_one_direction_only():
    # Lower layers never know higher ones, not even through an import inside a function: the
    # modules sort into layers, each importing only the layers below it (weight, dropout and
    # config at the bottom; checkpoint and combine at the top).
    import ast
    import pathlib

    import minilora

    package = pathlib.Path(minilora.__file__).parent
    modules = {path.stem: path for path in package.glob("*.py") if path.stem != "__init__"}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").split(".")[0] == "minilora"):
                parts = (node.module or "").split(".")[0 if node.level else 1:]
                found |= {parts[0]} if parts and parts[0] else {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "minilora":  # "import minilora" loads every module
                        found |= {parts[1]} if len(parts) > 1 else set(modules)
        imports[name] = (found & set(modules)) - {name}
    placed, left = [], dict(imports)
    while left:
        ready = sorted(m for m, needs in left.items() if needs <= set(placed))
        assert ready, f"import circle: {', '.join(f'{m} -> {sorted(n - set(placed))}' for m, n in sorted(left.items()))}"
        placed += ready
        for m in ready:
            del left[m]
