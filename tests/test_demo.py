"""`flare demo` end to end at a reduced size (the full run's numbers are in the README), and the
generated task it trains on."""

import json

import numpy as np

from flare_jax.cli import main
from flare_jax.data.records import parse_record
from flare_jax.data.tokenize import DocumentTokenizer
from flare_jax.demo.task import ADD_THREE, CHAT_TEMPLATE, SORT, write_relabelled, write_task_files
from flare_jax.eval.generation import read_task


def test_task_answers_and_files(tmp_path):
    pairs = ADD_THREE.sample(np.random.default_rng(0), 50)
    for prompt, answer in pairs:
        assert len(prompt) == 7 and answer == "".join(str((int(d) + 3) % 10) for d in prompt)
    files = write_task_files(tmp_path, ADD_THREE, train=30, heldout=5, evaluation=7, seed=1)
    assert len(files.train.read_text().splitlines()) == 30
    assert len(files.heldout.read_text().splitlines()) == 5
    examples = read_task(files.evaluation)
    assert len(examples) == 7 and all(len(e.answer) == 7 for e in examples)
    prompts = [json.loads(line)["prompt"] for line in files.prompts.read_text().splitlines()]
    assert prompts == [json.loads(line)["prompt"] for line in files.train.read_text().splitlines()]
    relabelled = write_relabelled(tmp_path / "sorted.jsonl", files.prompts, SORT)
    records = [json.loads(line) for line in relabelled.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert all(r["response"] == "".join(sorted(r["prompt"])) for r in records)


def test_chat_template_trains_only_the_answer(tmp_path):
    from flare_jax.convert.synthetic import write_char_tokenizer
    from flare_jax.demo.task import ALPHABET

    write_char_tokenizer(tmp_path, ALPHABET)
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tokenizer = DocumentTokenizer.from_dir(str(tmp_path))
    doc = tokenizer(parse_record({"prompt": "0123456", "response": "3456789"}, "test"))
    text = tokenizer.tokenizer.decode(doc["tokens"].tolist(), skip_special_tokens=False)
    assert text == "0123456=3456789<eos>"
    # prompt digits and "=" are context only; the answer digits and EOS are trained
    assert doc["loss_mask"].tolist() == [False] * 8 + [True] * 8


def test_demo_runs_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--seed-steps", "3", "--flare-steps", "3",
                 "--train-examples", "200", "--eval-examples", "8", "--ablation"]) == 0
    out = capsys.readouterr().out
    assert "exact match" in out and "diffusion t=0.9" in out
    results = json.loads((workdir / "results.json").read_text())
    rows = {(r["model"], r["mode"]): r for r in results["rows"]}
    assert list(rows) == [("seed", "AR"), ("FLARE", "AR"), ("FLARE", "verified"),
                          ("FLARE", "diffusion t=0.9"), ("FLARE", "diffusion t=0.6"),
                          ("FLARE, sort data", "AR")]
    # verified decoding equals AR token for token whatever the model learned
    assert rows["FLARE", "verified"]["same_as_ar"] == 1.0
    assert rows["seed", "AR"]["heldout_nll"] > 0 and rows["FLARE", "AR"]["heldout_nll"] > 0
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["tokens_per_forward"] > 0
    assert [r["step"] for r in results["flare_history"]][-1] == 3
    assert (workdir / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "seed_hf" / "config.json").is_file()
    distilled = [json.loads(line) for line in
                 (workdir / "data" / "self_distilled.jsonl").read_text().splitlines()]
    assert len(distilled) == 200 and all(r["generation"]["mode"] == "ar" for r in distilled)
