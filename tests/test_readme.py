"""The README's quickstart runs as written against a live daemon (its `...` placeholder aside)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    text = README.read_text()
    found = re.search(r"## Quickstart: the client library\n\n```python\n(.*?)```", text, re.S)
    assert found, "the README has no quickstart block under its heading"
    return "\n".join(line for line in found.group(1).splitlines() if line.strip() != "...")


def test_the_quickstart_runs(djinnd):
    env = dict(os.environ, DJINN_SOCKET=djinnd.path)
    out = subprocess.run([sys.executable, "-c", quickstart()], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("torch.Size(")  # its first print: the logits' shape and the position
