"""`import tirl` stays light; `tirl.algorithms` needs torch only (DESIGN.md section 2)."""

from __future__ import annotations

import subprocess
import sys


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_tirl_is_light():
    mods = _loaded_after("import tirl, tirl.types, tirl.registry")
    for heavy in ("torch", "transformers", "vllm", "ray", "mcp", "peft"):
        assert heavy not in mods


def test_algorithms_need_only_torch():
    mods = _loaded_after("import tirl.algorithms")
    assert "torch" in mods
    for other in ("transformers", "peft", "pydantic", "tirl.tools", "tirl.chat", "tirl.trainer"):
        assert other not in mods


def test_tools_do_not_import_torch():
    assert "torch" not in _loaded_after("import tirl.tools")
