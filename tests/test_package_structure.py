"""The package's structure: every module imports on its own, imports stay at module level
(except optional dependencies), and no module imports a package above it in the data flow."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import kho

ROOT = Path(kho.__file__).parent
#: Imports allowed inside functions: optional dependencies, loaded only when used.
OPTIONAL = {"matplotlib", "atheris", "drgn"}
#: The data flow, bottom to top: a module may import its own layer and the layers before it.
LAYERS = ["version", "errors", "sizes", "files", "abi", "memory", "currentkernel", "devicetree", "encodings", "subsystems",
          "handover", "dumps", "kexec", "nextkernel", "simulation", "benchmark", "cli"]


def all_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(ROOT)], prefix="kho."):
        names.append(info.name)
    return sorted(names)


def module_path(name: str) -> Path:
    parts = name.split(".")[1:]
    path = ROOT.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_every_module_imports_on_its_own():
    code = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {all_modules()!r}:\n"
        "    for mod in [m for m in sys.modules if m == 'kho' or m.startswith('kho.')]:\n"
        "        del sys.modules[mod]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {err!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return LAYERS.index(top) if top in LAYERS else -1


def test_imports_at_module_level_and_never_up_the_data_flow():
    problems = []
    for name in all_modules():
        tree = ast.parse(module_path(name).read_text())
        own = _layer(name)
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.level:
                problems.append(f"{name}: relative import")
            for target in targets:
                root = target.split(".")[0]
                if id(node) not in top_level and root not in OPTIONAL and not _in_type_checking(tree, node):
                    problems.append(f"{name}: imports {target} inside a function")
                if root == "kho":
                    if target == "kho":
                        problems.append(f"{name}: imports the package kho itself")
                    elif own >= 0 and _layer(target) > own:
                        problems.append(f"{name}: imports {target}, later in the data flow")
                    elif (name.rsplit(".", 1)[0] == target and module_path(name).name != "__init__.py"
                          and not all(_is_module(f"{target}.{a.name}") for a in node.names)):
                        problems.append(f"{name}: imports its own package's __init__")
    assert not problems, "\n".join(problems)


def _is_module(name: str) -> bool:
    return module_path(name).exists()


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for parent in ast.walk(tree):
        if isinstance(parent, ast.If) and getattr(parent.test, "id", None) == "TYPE_CHECKING":
            if any(child is node for child in ast.walk(parent)):
                return True
    return False


def test_every_top_level_folder_has_a_layer():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    files = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert folders | files <= set(LAYERS), (folders | files) - set(LAYERS)
