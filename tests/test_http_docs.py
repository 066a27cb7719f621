"""docs/rest.md's examples, run against a real inferd: each ```bash block with curl (and each
```python block) runs as written, with localhost:8000 pointed at the test server, and its output
must equal the ```json (as JSON) or ```text (as text) block that follows it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.harness import ROOT

DOC = ROOT / "docs" / "rest.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def examples() -> list[tuple[str, str, str, str | None, str | None]]:
    """(id, language, code, expected kind, expected text) for each runnable block."""
    blocks = [(m.group(1), m.group(2)) for m in _FENCE.finditer(DOC.read_text())]
    found = []
    for i, (lang, code) in enumerate(blocks):
        if lang not in ("bash", "python"):
            continue
        after = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
        kind, expected = after if after[0] in ("json", "text") else (None, None)
        found.append((f"{lang}-{len(found)}", lang, code, kind, expected))
    return found


EXAMPLES = examples()


def test_the_doc_has_tested_curl_examples():
    assert sum(1 for _, _, code, kind, _ in EXAMPLES if "curl" in code and kind) >= 6


@pytest.mark.parametrize(
    "lang, code, kind, expected", [e[1:] for e in EXAMPLES], ids=[e[0] for e in EXAMPLES]
)
def test_example(server, tmp_path, lang, code, kind, expected):
    assert shutil.which("curl"), "the documented examples are run with curl: install it (apt install curl)"
    code = code.replace("localhost:8000", server.http_url)
    if lang == "bash":
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    else:
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the example printed nothing"
    if kind == "json":
        assert json.loads(run.stdout) == json.loads(expected)
    elif kind == "text":
        assert run.stdout.strip() == expected.strip()
