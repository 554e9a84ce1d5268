"""README.md's "Python API" example runs as written and prints what its comments say."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def api_example() -> str:
    """The first ```python block of the "## Python API" section."""
    text = README.read_text()
    section = text[text.index("\n## Python API\n"):]
    section = section[:section.index("\n## ", 1)]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Python API section has no python block"
    return match.group(1)


def test_readme_api_example_prints_what_it_says():
    code = api_example()
    expected = [m.group(1) for m in re.finditer(r"^\s*print\(.*\)\s+# (.+)$", code, re.M)]
    assert len(expected) >= 5, "the example's print lines say what they print"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected
