"""The train loop end to end on a tiny model: loss decreases, resume is bit-exact, the export is
a loadable flare-jax checkpoint; malformed data fails naming the file and line."""

import json

import pytest
from workers import tiny_cfg

from flare_jax.data import RecordError
from flare_jax.train import train


@pytest.fixture(scope="module")
def loop_result(run_worker) -> dict:
    return run_worker("loop", 4)  # the tiny config shards over all devices (fsdp = -1)


def test_loss_decreases(loop_result):
    losses = loop_result["full_losses"]
    assert len(losses) == 8
    assert losses[-1] < 0.75 * losses[0]
    assert {"ar_loss", "ar_tokens", "diffusion_loss", "diffusion_tokens", "grad_norm", "lr",
            "step_time_s", "tokens_per_s"} <= set(loop_result["metrics_keys"])


def test_resume_is_bit_exact(loop_result):
    # 8 steps in one run == 3 steps (stopped, checkpointed) + a resumed run of 5: same data
    # order, same noise, same losses and parameters, bit for bit.
    assert loop_result["resumed_steps"] == loop_result["full_steps"]
    assert loop_result["resumed_losses"] == loop_result["full_losses"]
    assert loop_result["params_equal"]
    assert loop_result["first_export"] == "None"  # a stopped run does not export


def test_init_from_a_checkpoint(loop_result):
    # A run initialised from the export starts at the trained loss (random init: ~4.2).
    assert loop_result["init_from_loss"] < 0.8 * loop_result["full_losses"][0]


def test_export_is_a_loadable_checkpoint(loop_result):
    assert loop_result["export_logits_shape"] == [4, 64]
    assert loop_result["export_logits_finite"]


def test_malformed_record_names_file_and_line(tmp_path):
    cfg = tiny_cfg(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    lines[2] = json.dumps({"txt": "no text field"})
    corpus.write_text("\n".join(lines) + "\n")
    cfg.workdir = str(tmp_path / "run")
    cfg.data.shuffle = False
    with pytest.raises(RecordError, match=r"corpus\.jsonl:3"):
        train(cfg)
