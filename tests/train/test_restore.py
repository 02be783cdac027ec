"""Orbax checkpoints and preemption: a `flare train` job killed (SIGKILL) mid-step and mid-save
resumes from its last complete checkpoint (restore across meshes: test_launch.py)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import WORKERS, job_logs, launch, launch_command, worker_env
from workers import LOOP_STEPS, TINY_CONFIG, write_corpus


def _checkpoint_dirs(workdir: Path) -> tuple[list[int], list[str]]:
    """Committed steps and leftover temporary directories."""
    entries = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    return sorted(int(e) for e in entries if e.isdigit()), [e for e in entries if "tmp" in e]


def _train_args(root: Path) -> list[str]:
    """`flare train` of the tiny config for ``LOOP_STEPS`` steps, a checkpoint every 2."""
    corpus, tokenizer = write_corpus(root)
    return ["--config", str(TINY_CONFIG), f"--config.workdir={root / 'run'}",
            f"--config.data.paths=('{corpus}',)", f"--config.data.tokenizer_dir={tokenizer}",
            f"--config.train.steps={LOOP_STEPS}", "--config.checkpoint.every=2",
            "--config.train.progress=False"]


def test_preempted_run_resumes_from_the_last_complete_checkpoint(tmp_path, compile_cache):
    train_args = _train_args(tmp_path)
    workdir = tmp_path / "run"
    marker = tmp_path / "save_started"

    def job(kill_at: int, hold_save: int, logs: str, wait_for_marker: bool = False):
        args = [str(WORKERS), "train_cli", str(marker), str(kill_at), str(int(signal.SIGKILL)),
                str(hold_save), *train_args]
        if not wait_for_marker:
            return launch(1, 4, args, compile_cache, tmp_path / logs, timeout=300)
        proc = subprocess.Popen(launch_command(1, 4, args, tmp_path / logs, timeout=300),
                                env=worker_env(4, compile_cache))
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), job_logs(tmp_path / logs)
        trainer = int((tmp_path / logs / "pids").read_text().split()[0])
        os.kill(trainer, signal.SIGKILL)  # mid-save: the save of `hold_save` is in progress
        proc.wait(timeout=60)
        return proc

    # 1. Killed right after dispatching the step that ends at 5 (saves of 2 and 4 started,
    #    the one of 4 asynchronous: maybe still in flight).
    first = job(kill_at=5, hold_save=0, logs="logs_a")
    assert first.returncode == 128 + signal.SIGKILL, job_logs(tmp_path / "logs_a")
    committed, _ = _checkpoint_dirs(workdir)
    assert committed and set(committed) <= {2, 4}
    resume_from = committed[-1]
    # 2. Resumed, killed while the save of step 6 is being written.
    second = job(kill_at=0, hold_save=6, logs="logs_b", wait_for_marker=True)
    assert second.returncode == 128 + signal.SIGKILL
    committed, leftovers = _checkpoint_dirs(workdir)
    assert 6 not in committed and any(t.startswith("6.") for t in leftovers), (committed, leftovers)
    assert committed[-1] == 4
    # 3. Resumed from 4 (the incomplete save of 6 is ignored and cleaned up), runs to the end.
    third = job(kill_at=0, hold_save=0, logs="logs_c")
    assert third.returncode == 0, job_logs(tmp_path / "logs_c")
    committed, leftovers = _checkpoint_dirs(workdir)
    assert committed[-1] == LOOP_STEPS and not leftovers
    assert (workdir / "export" / "params").is_dir()

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    # Run 1 logged 1..4, run 2 resumed after `resume_from`, run 3 after 4; every step recomputed
    # after a resume gives the same loss, bit for bit.
    assert steps == [*range(1, 5), *range(resume_from + 1, 7), *range(5, LOOP_STEPS + 1)]
    by_step: dict[int, set[float]] = {}
    for r in rows:
        by_step.setdefault(r["step"], set()).add(r["loss"])
    assert all(len(losses) == 1 for losses in by_step.values()), by_step


def test_sigterm_checkpoints_and_stops(tmp_path, compile_cache):
    # SIGTERM (a scheduler's notice) after the step ending at 3 is dispatched: JAX's preemption
    # service makes the run save at the step all processes agree on (>= 3), stop there without
    # exporting, and exit 0 (seen: step 4).
    args = [str(WORKERS), "train_cli", str(tmp_path / "unused"), "3", str(int(signal.SIGTERM)),
            "0", *_train_args(tmp_path)]
    proc = launch(1, 4, args, compile_cache, tmp_path / "logs", timeout=300)
    assert proc.returncode == 0, job_logs(tmp_path / "logs")
    committed, leftovers = _checkpoint_dirs(tmp_path / "run")
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert 3 <= committed[-1] < LOOP_STEPS and not leftovers
    assert logged[-1] == committed[-1]  # stopped right after that checkpoint
    assert not (tmp_path / "run" / "export").exists()
