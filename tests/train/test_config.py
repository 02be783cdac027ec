"""Training config: validation errors name the field, command-line overrides, the shipped
configs (tiny and the Qwen3.5 shapes) are valid, and the CLI reports bad values."""

from pathlib import Path

import pytest

from flare_jax.cli import main
from flare_jax.train import TrainConfigError, apply_overrides, load_config_file, validate
from flare_jax.train.config import model_config_from
from flare_jax.train.metrics import matmul_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _tiny():
    cfg = load_config_file(CONFIGS / "tiny_cpu.py")
    cfg.data.tokenizer_dir = "tok"
    return cfg


@pytest.mark.parametrize("field, value, message", [
    ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate: expected a number > 0"),
    ("noise.per", "token", "config.noise.per: expected 'block' or 'sequence'"),
    ("model.dtype", "float64", "config.model.dtype"),
    ("data.paths", (), "config.data.paths: expected a non-empty list"),
    ("train.grad_accum", 3, "config.train.grad_accum: 3 does not divide"),
    ("mesh.tensor", 0, "config.mesh.tensor"),
    ("loss.ar_weight", -0.5, "config.loss.ar_weight"),
    ("checkpoint.keep", 0, "config.checkpoint.keep"),
    ("train.token_chunk", -4, "config.train.token_chunk: expected an int >= 0"),
    ("train.logits_dtype", "float16", "config.train.logits_dtype: expected one of"),
    ("train.logits_dtype", "bfloat16", "config.train.logits_dtype: bfloat16 logits need "
                                       "train.token_chunk"),
    ("workdir", "", "config.workdir"),
])
def test_bad_values_name_the_field(field, value, message):
    cfg = _tiny()
    section, _, key = field.rpartition(".")
    node = cfg[section] if section else cfg
    node[key] = value
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(")):
        validate(cfg)


def test_cross_field_errors():
    cfg = _tiny()
    cfg.mesh.data, cfg.mesh.fsdp = -1, -1
    with pytest.raises(TrainConfigError, match="config.mesh: at most one"):
        validate(cfg)
    cfg = _tiny()
    cfg.loss.ar_weight, cfg.loss.diffusion_weight = 0.0, 0.0
    with pytest.raises(TrainConfigError, match="config.loss.diffusion_weight: .* both 0"):
        validate(cfg)
    cfg = _tiny()
    cfg.model.mask_token_id = 64
    with pytest.raises(TrainConfigError, match="config.model.mask_token_id: 64 is outside"):
        model_config_from(cfg, None)
    cfg = _tiny()
    cfg.model.hf_config.num_key_value_heads = 3
    with pytest.raises(TrainConfigError, match="config.model.hf_config: .*num_key_value_heads"):
        model_config_from(cfg, None)


def test_unknown_fields_are_rejected():
    cfg = _tiny()
    cfg.optimizer.unlock()
    cfg.optimizer.lr = 1.0
    with pytest.raises(TrainConfigError, match="config.optimizer.lr: unknown field"):
        validate(cfg)


def test_overrides():
    cfg = _tiny()
    apply_overrides(cfg, ["--config.train.steps=5", "--config.optimizer.learning_rate=1",
                          "--config.data.paths=('a.jsonl', 'b.jsonl')", "--config.workdir=runs/x",
                          "--config.model.remat=selective"])
    assert cfg.train.steps == 5 and cfg.optimizer.learning_rate == 1.0
    assert cfg.data.paths == ("a.jsonl", "b.jsonl") and cfg.workdir == "runs/x"
    assert cfg.model.remat == "selective"
    apply_overrides(cfg, ["--config.model.remat=True"])  # the old bool spelling
    with pytest.raises(TrainConfigError, match="config.model.remat: expected one of"):
        validate(cfg)
    with pytest.raises(TrainConfigError, match="config.train.steps: expected a int"):
        apply_overrides(cfg, ["--config.train.steps=many"])
    with pytest.raises(TrainConfigError, match="config.train.stepz: unknown field"):
        apply_overrides(cfg, ["--config.train.stepz=1"])


@pytest.mark.parametrize("name, billions", [
    ("qwen3_5_0p8b", (0.7, 0.95)), ("qwen3_5_2b", (1.7, 2.4)), ("qwen3_5_4b", (3.6, 4.8)),
    ("qwen3_5_9b", (8.0, 10.0))])
def test_qwen_configs_are_valid(name, billions):
    cfg = load_config_file(CONFIGS / f"{name}.py")
    cfg.data.paths = ("corpus.jsonl",)
    cfg.data.tokenizer_dir = "tok"
    cfg.workdir = "runs/x"
    cfg.model.mask_token_id = 248_000
    validate(cfg)
    config = model_config_from(cfg, None)
    embed = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    total = (matmul_params(config) + embed) / 1e9  # matmul weights + untied embedding ~ params
    assert billions[0] <= total <= billions[1]
    assert config.layer_types.count("full_attention") == config.num_hidden_layers // 4


def test_cli_reports_bad_values(capsys):
    code = main(["train", "--config", str(CONFIGS / "tiny_cpu.py"),
                 "--config.optimizer.learning_rate=-1"])
    assert code == 2
    assert "config.optimizer.learning_rate" in capsys.readouterr().err
