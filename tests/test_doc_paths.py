"""What README.md and spec/*.md name exists: every ``kho.x.y`` module path (and the object
it may end in) imports, and every repository file or folder they cite is there."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "spec").glob("*.md"))]
#: ``kho.memory.intervals.usable``, ``kho.Machine.boot``: not inside a longer name or path.
DOTTED = re.compile(r"(?<![\w./-])kho(?:\.[A-Za-z_]\w*)+")
#: ``kho/encodings/maple.py``, ``tests/fuzz/``, ``bench/results/dump.md``: a file with an
#: extension or a folder with its slash (kernel paths such as ``include/linux/kho/...`` and
#: debugfs names such as ``kho/out`` are neither, or do not start the path).
REPO_PATH = re.compile(r"(?<![\w./-])(?:kho|tests|bench|spec)/[\w./-]*(?:\.[a-z]+|/)(?![\w.{])")


def mentions(pattern: re.Pattern) -> list[tuple[str, str]]:
    return sorted({(doc.name if doc.parent == ROOT else f"spec/{doc.name}", m.group(0))
                   for doc in DOCS for m in pattern.finditer(doc.read_text())})


def resolve(dotted: str):
    """The object ``dotted`` names: the longest prefix that is a module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if not (err.name and f"{name}.".startswith(f"{err.name}.")):
                raise  # a module that exists failed to import: report that
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_docs_name_module_paths():
    assert len(mentions(DOTTED)) > 20 and len(mentions(REPO_PATH)) > 20


@pytest.mark.parametrize("doc,dotted", mentions(DOTTED))
def test_module_path_imports(doc, dotted):
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"{doc} names {dotted}, which does not exist: {err}")


@pytest.mark.parametrize("doc,path", mentions(REPO_PATH))
def test_repository_path_exists(doc, path):
    assert (ROOT / path).exists(), f"{doc} cites {path}, which is not in the repository"
