"""The committed generated code must be what protoc makes of the committed .proto files."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "protoc generated nothing"
    committed = ROOT / "protos"
    stale = [str(p) for p in fresh if not (committed / p).exists() or not filecmp.cmp(tmp_path / p, committed / p, shallow=False)]
    assert not stale, f"regenerate with `python protos/generate.py`: stale {stale}"
