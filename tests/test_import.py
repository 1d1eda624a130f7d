"""`import minilora` stays light (torch and safetensors only), exports the public API, installs under
names that cannot clash, and no package module imports in a circle or reaches for another's private names."""

import pytest
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


# -- the import graph: read from the source (AST), every import counted, at module level or inside
# a function, since an import in a function still makes the lower module know the higher one --------

PACKAGES = {"minilora": "minilora", "minilora_train": "train", "minilora_bench": "bench"}  # import name: folder


def package_modules() -> dict:
    """{dotted module name: path} of the three packages (a package's __init__.py under its own name)."""
    import pathlib

    from conftest import ROOT

    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((pathlib.Path(ROOT) / folder).rglob("*.py")):
            parts = [package, *path.relative_to(pathlib.Path(ROOT) / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path, modules: dict) -> set:
    """The modules of ``modules`` that module ``name`` imports (``from . import x`` counts as x)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            submodules = [f"{source}.{alias.name}" for alias in node.names]
            targets = [m for m in submodules if m in modules]
            if len(targets) < len(submodules):  # names defined in the module itself
                targets.append(source)
        else:
            continue
        for target in targets:  # the deepest of our modules the dotted name reaches
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts:
                found.add(".".join(parts))
    return found - {name}


def test_no_package_module_imports_itself_back_through_a_circle():
    # minilora, minilora_train (its forgetting package too) and minilora_bench: lower layers never
    # know higher ones. Sorting the modules into layers, each importing only layers below it,
    # fails exactly when there is a circle; the message names one.
    modules = package_modules()
    assert {"minilora.layer", "minilora_train.loop", "minilora_train.forgetting.check", "minilora_bench.cli"} <= set(modules)
    imports = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    placed, left = set(), dict(imports)
    while left:
        ready = {m for m, needs in left.items() if needs <= placed}
        if not ready:  # every module left waits for another one left: follow the waits round a circle
            path = [min(left)]
            while path[-1] not in path[:-1]:
                path.append(min(left[path[-1]] - placed))
            pytest.fail("import circle: " + " -> ".join(path[path.index(path[-1]):]))
        placed |= ready
        for m in ready:
            del left[m]


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    # The circle test above is only as good as its reader: a lazy import inside a function, a
    # parent-relative import and ``from . import x`` all count.
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("")
    modules = {"pkg.a": pkg / "a.py", "pkg.sub": pkg / "sub" / "__init__.py",
               "pkg.sub.b": pkg / "sub" / "b.py", "pkg.sub.c": pkg / "sub" / "c.py"}
    assert imported_modules("pkg.a", modules["pkg.a"], modules) == {"pkg.sub.b"}
    assert imported_modules("pkg.sub.b", modules["pkg.sub.b"], modules) == {"pkg.a", "pkg.sub.c"}


def test_no_private_name_crosses_a_module_boundary():
    # A leading underscore says "this module's own": another of our modules neither imports such a
    # name nor reaches for it through the module (``minilora.dropout._x``). Tests may.
    import ast

    modules = package_modules()
    crossings = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        ours = set()  # local names bound to our modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
                crossings += [f"{name}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                              for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
                ours |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                ours |= {(alias.asname or alias.name).split(".")[0] for alias in node.names
                         if alias.name.split(".")[0] in PACKAGES}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in ours:
                    crossings.append(f"{name}: {ast.unparse(node)}")
    assert crossings == []


def test_no_script_changes_sys_path():
    # The lab scripts import minilora, minilora_train and minilora_bench as installed (scripts/venv.sh
    # installs the repository editable); the tests that load one do so by its file path.
    import pathlib

    from conftest import ROOT

    scripts = sorted((pathlib.Path(ROOT) / "scripts").rglob("*.py"))
    assert scripts and [str(p) for p in scripts if "sys.path" in p.read_text()] == []
