"""docs/guide.md: every command of its bash blocks runs, in order, on a tiny model (the training
command gets extra overrides that make it two small steps)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import lm_eval.tasks
from eval_helpers import ALPHABET, FIELDS, TASK

from flare_jax.cli import main
from flare_jax.convert.synthetic import write_char_tokenizer
from flare_jax.eval import lm_eval_adapter

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
# appended to the guide's commands (argparse and the config overrides keep the last value)
SMALL = {"train": ["--config.data.seq_len=64", "--config.data.global_batch_size=2",
                   "--config.train.steps=2", "--config.train.progress=False",
                   "--config.model.dtype=float32", "--config.model.remat=none",
                   "--config.checkpoint.async_save=False"],
         "sample": ["--max-new-tokens", "8"], "eval": ["--max-new-tokens", "8"]}


def guide_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def run_command(argv: list[str], monkeypatch) -> str:
    """Run one guide command in this process; returns its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if argv[0] == "flare":
            extra = SMALL.get(argv[1], []) if argv[1:3] != ["eval", "likelihood"] else []
            assert main(argv[1:] + extra) == 0, argv
        elif argv[:2] == ["python", "-c"]:
            monkeypatch.setattr(sys, "argv", ["-c", *argv[3:]])
            exec(argv[2], {"__name__": "__main__"})
        elif argv[:3] == ["python", "-m", "flare_jax.eval.lm_eval_adapter"]:
            monkeypatch.setattr(sys, "argv", ["lm_eval", *argv[3:]])
            lm_eval_adapter.main()
        else:
            raise AssertionError(f"the guide test does not know how to run {argv}")
    return out.getvalue()


def test_every_guide_command_runs(hf_checkpoint, tmp_path, monkeypatch):
    source, _ = hf_checkpoint("guide", seed=3, num_hidden_layers=2, mask_token_id=2,
                              layer_types=["linear_attention", "full_attention"])
    # the harness indexes its thousands of bundled task yamls (~15 s); the local yaml needs none
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    env = {"HF_DIR": tmp_path / "hf", "CKPT": tmp_path / "ckpt", "RUN": tmp_path / "run",
           "DATA": tmp_path / "train.jsonl", "HELDOUT": tmp_path / "heldout.jsonl",
           "TASK": tmp_path / "task.jsonl", "MASK_ID": 2, "TASKS": tmp_path / "mc.yaml"}
    shutil.copytree(source, env["HF_DIR"])
    write_char_tokenizer(env["HF_DIR"], ALPHABET)
    env["DATA"].write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}."}) + "\n"
                                   for i in range(40)))
    env["HELDOUT"].write_text('{"prompt": "7 + 7 =", "response": "14"}\n{"text": "3 + 3 = 6."}\n')
    env["TASK"].write_text('{"prompt": "2 + 2 =", "answer": "4"}\n')
    docs = [{"question": "1 + 1 =", "choices": ["2", "3"], "label": 0}]
    (tmp_path / "mc.jsonl").write_text(json.dumps(docs[0]) + "\n")
    env["TASKS"].write_text(TASK.format(name="guide_mc", data=tmp_path / "mc.jsonl",
                                        cache=tmp_path / "hf_cache",
                                        output_type="multiple_choice",
                                        fields=FIELDS["multiple_choice"]))
    outputs = []
    for line in guide_commands():
        argv = shlex.split(re.sub(r"\$([A-Z_]+)", lambda m: str(env[m.group(1)]), line))
        outputs.append((argv, run_command(argv, monkeypatch)))
    ran = [" ".join(argv[:3]) for argv, _ in outputs]
    for expected in ("flare convert hf-to-jax", "flare train --config", "flare sample",
                     "flare eval likelihood", "flare eval task",
                     "python -m flare_jax.eval.lm_eval_adapter", "flare convert jax-to-hf"):
        assert any(r.startswith(expected) for r in ran), expected
    by_command = {" ".join(argv[:3]): out for argv, out in outputs}
    assert (env["RUN"] / "export" / "tokenizer.json").is_file()
    assert (env["RUN"] / "metrics.jsonl").is_file()
    sizes = [int(out) for argv, out in outputs if argv[:2] == ["python", "-c"]]
    assert sizes == [96, 96]
    for argv, out in outputs:
        if argv[1:3] == ["eval", "likelihood"]:
            report = json.loads(out)
            assert report["documents"] == 2 and report["nll"] > 0
        if argv[1:3] == ["eval", "task"]:
            assert 0.0 <= json.loads(out)["accuracy"] <= 1.0
        if argv[1] == "sample":
            assert json.loads(out)["tokens_per_forward"] > 0
    assert "guide_mc" in by_command["python -m flare_jax.eval.lm_eval_adapter"]
    assert list((env["RUN"] / "lm_eval").rglob("results_*.json"))
    assert (env["RUN"] / "hf" / "config.json").is_file()


def test_guide_mentions_every_lm_eval_model_argument():
    """The guide's list of model arguments matches the adapter's constructor."""
    import inspect

    text = GUIDE.read_text()
    names = [p for p in inspect.signature(lm_eval_adapter.FlareJaxLM).parameters
             if p not in ("batch_size", "device", "max_batch_size", "backend")]
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, missing


