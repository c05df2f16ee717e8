"""`pgen run`: builds the default tiny model on a fresh cache, reuses it, rebuilds it when damaged."""

from __future__ import annotations

from pgen.cli import main
from pgen.tiny import TinyConfig


def test_pgen_run_builds_reuses_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PGEN_CACHE_DIR", str(tmp_path))
    assert main(["run", "--max-tokens", "8"]) == 0
    first = capsys.readouterr().out
    assert "[1/2] writing the ONNX graph" in first and "[2/2] compiling" in first
    for needle in ("prompt 3:", "KV cache", "sharing", "prefix", "tokens/s"):
        assert needle in first, first
    package = tmp_path / "models" / f"{TinyConfig().name}.pgenpkg"
    assert main(["run", "--max-tokens", "4", "-n", "2"]) == 0
    assert "reusing" in capsys.readouterr().out
    (package / "manifest.json").write_text("{")
    assert main(["run", "--max-tokens", "4"]) == 0
    assert "rebuilding" in capsys.readouterr().out
