"""The command line: convert both ways, sample in each mode, and clear errors."""

from __future__ import annotations

import json

import pytest

from flare_jax.cli import main


def test_convert_and_sample(hf_checkpoint, tmp_path, capsys):
    directory, _ = hf_checkpoint("base", seed=0)
    assert main(["convert", "hf-to-jax", str(directory), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "jax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "ckpt"), "--token-ids", "--prompt", "[5, 6, 7]",
                 "--prompt", "[8]", "--max-new-tokens", "5", "--cache-report"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("cache (float32 K/V")
    records = [json.loads(line) for line in lines[1:]]
    assert [r["prompt"] for r in records] == ["[5, 6, 7]", "[8]"]
    assert all(1 <= len(r["tokens"]) <= 5 for r in records)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["convert", "hf-to-jax", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "HF checkpoint directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample"])
