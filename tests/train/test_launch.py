"""Launchers: `launch/local.py` process jobs (1 x 8, 2 x 4 and 4 x 2 CPU devices) give the same
loss curves on data, fsdp and fsdp+tensor meshes (4 x 2: fsdp+tensor only); failure handling of
the launcher; the SLURM task helper and the TPU pod launcher compose the right `flare train`
command; the state the 1 x 8 job saved restores bit for bit onto other meshes, in one process and
in the 2 x 4 and 4 x 2 jobs."""

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import LAUNCHER, REPO
from workers import SAVED_STEP

# fp32 everywhere ('highest' matmul precision). Across process layouts the same mesh runs the same
# SPMD program; only the cross-process collectives (gloo instead of in-process) may sum in another
# order. Across meshes the sums are split differently (seen: grad norms differ by ~1e-7
# relative). Losses: 1e-5 relative; final states (params + AdamW moments after 3 steps; Adam
# divides by sqrt(v), amplifying rounding of near-zero gradients, see test_multidevice): 1e-4.
LOSS_RTOL = 1e-5
STATE_ATOL = 1e-4
MESHES = ("data", "fsdp", "fsdp_tensor")


def test_process_layouts_give_the_same_loss_curves(layout_runs):
    _, runs = layout_runs
    reference = runs["1x8"][0]["data"]
    assert reference["losses"][2] < reference["losses"][0]  # the steps really train
    for layout, processes in runs.items():
        count = int(layout.split("x")[0])
        assert len(processes) == count
        for result in processes:
            assert (result["process_count"], result["device_count"]) == (count, 8)
            assert "fsdp_tensor" in result
            for mesh in (m for m in MESHES if m in result):
                run = result[mesh]
                np_close(run["losses"], reference["losses"], LOSS_RTOL, f"{layout} {mesh}")
                np_close(run["grad_norms"], reference["grad_norms"], LOSS_RTOL, layout + mesh)
                assert run["tokens"] == reference["tokens"]
                if layout != "1x8":  # compared shard by shard with the 1 x 8 run's final state
                    assert run["state_max_diff"] <= STATE_ATOL, (layout, mesh)


def test_restore_onto_other_meshes_is_bitwise(layout_runs, run_worker):
    shared, runs = layout_runs
    result = run_worker("restore", 4, str(shared))
    assert result["device_count"] == 4 and result["latest"] == SAVED_STEP
    # Parameters and the AdamW state (count, mu, nu) after 3 steps: every byte equal.
    for name, specs in (("fsdp4", "'fsdp'"), ("fsdp2_tensor2", "'tensor'")):
        assert result[name]["mismatch"] == 0.0, name
        assert result[name]["opt_leaves"] > 20
        assert any(specs in s for s in result[name]["specs"]), result[name]["specs"]
    # The same checkpoint restored by the 2 x 4 and 4 x 2 process jobs on their fsdp+tensor mesh.
    for layout in ("2x4", "4x2"):
        assert all(r["restored_mismatch"] == 0.0 for r in runs[layout]), layout


def np_close(actual: list[float], desired: list[float], rtol: float, what: str) -> None:
    import numpy as np

    np.testing.assert_allclose(actual, desired, rtol=rtol, err_msg=what)


def _launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCHER), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_launcher_stops_the_job_when_a_process_fails(tmp_path):
    # Process 1 fails at once; process 0 would run for a minute: the job ends with process 1's
    # status within seconds and process 0 is gone.
    script = ("import os, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    proc = _launch("-n", "2", "--log-dir", str(tmp_path), "--exec", sys.executable, "--", "-c", script)
    assert proc.returncode == 3
    assert time.monotonic() - start < 30
    pid0 = int((tmp_path / "pids").read_text().split()[0])
    assert not Path(f"/proc/{pid0}").exists()


def test_launcher_process_environment(tmp_path):
    script = ("import os\n"
              "keys = ['JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',\n"
              "        'JAX_PLATFORMS', 'XLA_FLAGS', 'CUDA_VISIBLE_DEVICES']\n"
              "print({k: os.environ.get(k) for k in keys})\n")
    proc = _launch("-n", "2", "--gpus-per-process", "2", "--port", "4567", "--log-dir",
                   str(tmp_path), "--exec", sys.executable, "--", "-c", script)
    assert proc.returncode == 0, proc.stderr
    logs = [eval((tmp_path / f"process_{i}.log").read_text()) for i in range(2)]  # noqa: S307
    assert [e["JAX_PROCESS_ID"] for e in logs] == ["0", "1"]
    assert {e["JAX_COORDINATOR_ADDRESS"] for e in logs} == {"localhost:4567"}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in logs] == ["0,1", "2,3"]
    proc = _launch("-n", "1", "--cpu-devices", "3", "--log-dir", str(tmp_path), "--exec",
                   sys.executable, "--", "-c", script)
    env = eval((tmp_path / "process_0.log").read_text())  # noqa: S307
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_NUM_PROCESSES"] == "1"
    assert "--xla_force_host_platform_device_count=3" in env["XLA_FLAGS"]


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f"#!/usr/bin/env bash\n{body}\n")
    tool.chmod(0o755)


# A stand-in for the `flare` entry point: prints the JAX_* settings and its arguments.
SHOW = ("exec python3 -c 'import os, sys; print((sorted((k, v) for k, v in os.environ.items() "
        "if k.startswith(\"JAX_\")), sys.argv[1:]))' \"$@\"")


def test_slurm_task_sets_the_distributed_environment(tmp_path):
    # scontrol expands the node list; the task runs `flare train --distributed` with the JAX_*
    # settings of its rank (one GPU per task, or every GPU of the node).
    _fake_tool(tmp_path / "bin", "scontrol", "echo node007; echo node008")
    _fake_tool(tmp_path / "bin", "flare", SHOW)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4100", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[007-008]"}
    for key in [k for k in env if k.startswith("JAX_")] + ["CUDA_VISIBLE_DEVICES", "SLURM_STEP_NODELIST"]:
        env.pop(key, None)
    for mode, local_ids in (("gpu", [("JAX_LOCAL_DEVICE_IDS", "1")]), ("node", [])):
        out = subprocess.run(["bash", str(REPO / "launch" / "slurm_task.sh"), "--config", "c.py"],
                             env={**env, "FLARE_PROCESS_MODE": mode}, capture_output=True,
                             text=True, check=True).stdout
        values, argv = eval(out)  # noqa: S307
        assert values == [("JAX_COORDINATOR_ADDRESS", f"node007:{61440 + 4100 % 4096}"),
                          *local_ids, ("JAX_NUM_PROCESSES", "16"), ("JAX_PROCESS_ID", "9")]
        assert argv == ["train", "--distributed", "--config", "c.py"]


def test_tpu_pod_launcher_runs_flare_train_on_every_worker(tmp_path):
    # The fake gcloud runs the remote command locally, where `flare` prints its arguments: the
    # overrides must survive the remote shell's word splitting unchanged.
    _fake_tool(tmp_path / "bin", "gcloud",
               'printf "%s\\n" "$@" > "$GCLOUD_ARGS"; c="${@: -1}"; bash -c "${c#--command=}"')
    _fake_tool(tmp_path / "bin", "flare", SHOW)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "FLARE_REPO": str(tmp_path), "GCLOUD_ARGS": str(tmp_path / "gcloud_args")}
    overrides = ["--config", "configs/x.py", "--config.data.paths=('a b.jsonl',)"]
    out = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "pod-1", "us-east5-a",
                          "--project", "p", "--", *overrides], env=env, capture_output=True,
                         text=True, check=True).stdout
    gcloud = (tmp_path / "gcloud_args").read_text().splitlines()
    assert gcloud[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone=us-east5-a"]
    assert "--worker=all" in gcloud and gcloud[gcloud.index("--project") + 1] == "p"
    assert eval(out)[1] == ["train", "--distributed", *overrides]  # noqa: S307
