#!/usr/bin/env python3
"""Start N processes of `flare train` on this machine, joined by a localhost jax.distributed
coordinator (for tests and debugging multi-host code paths on one box).

  # 2 processes x 4 CPU host devices each (8 devices in all)
  python launch/local.py -n 2 --cpu-devices 4 -- --config configs/tiny_cpu.py --config.workdir=runs/t
  # 2 processes x 1 GPU each (CUDA_VISIBLE_DEVICES=0 and =1)
  python launch/local.py -n 2 --gpus-per-process 1 -- --config configs/qwen3_5_0p8b.py ...
  # another program in each process (it joins with flare_jax.train.mesh.initialize_distributed)
  python launch/local.py -n 2 --cpu-devices 4 --exec python -- my_script.py --its-flag

Every process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by
`flare train --distributed`). If one process fails or is killed, the others are stopped (they
would wait for it in a collective); the exit status is the first failure's (128 + signal for a
killed process). SIGINT / SIGTERM are forwarded: SIGTERM lets `flare train` checkpoint and stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 10.0  # after a failure: how long the other processes get to exit on SIGTERM


def free_port() -> int:
    """A TCP port free on localhost now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(index: int, args: argparse.Namespace, port: int) -> dict[str, str]:
    """The environment of process ``index``: coordinator settings and its devices."""
    env = dict(os.environ)
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES=str(args.processes), JAX_PROCESS_ID=str(index))
    if args.cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count="
                                     f"{args.cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    if args.gpus_per_process:
        gpus = args.gpus.split(",") if args.gpus else [str(i) for i in range(
            args.processes * args.gpus_per_process)]
        if len(gpus) < args.processes * args.gpus_per_process:
            raise SystemExit(f"launch/local.py: {args.processes} x {args.gpus_per_process} GPUs "
                             f"requested, --gpus lists {len(gpus)}")
        k = args.gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[index * k:(index + 1) * k])
    return env


def command(args: argparse.Namespace) -> list[str]:
    """What every process runs: ``flare train --distributed ARGS`` or the ``--exec`` program."""
    if args.exec:
        return [*args.exec.split(), *args.rest]
    return [sys.executable, "-m", "flare_jax.cli", "train", "--distributed", *args.rest]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


def run(args: argparse.Namespace) -> int:
    """Start the processes, wait for them; the exit status of the job."""
    port = args.port or free_port()
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(args.processes):
        out = open(log_dir / f"process_{i}.log", "w") if log_dir else None  # noqa: SIM115
        procs.append(subprocess.Popen(command(args), env=process_env(i, args, port), stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
        if out is not None:
            out.close()  # the child holds its own descriptor
    if log_dir is not None:
        (log_dir / "pids").write_text("".join(f"{p.pid}\n" for p in procs))

    def forward(signum: int, _frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _stop(procs)
            return _status(failed[0])
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"launch/local.py: timeout after {args.timeout} s", file=sys.stderr)
            _stop(procs)
            return 124
        time.sleep(0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--processes", type=int, required=True)
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--cpu-devices", type=int, default=0,
                         help="CPU host devices per process (sets JAX_PLATFORMS=cpu)")
    devices.add_argument("--gpus-per-process", type=int, default=0,
                         help="consecutive GPUs per process via CUDA_VISIBLE_DEVICES")
    parser.add_argument("--gpus", default="", help="GPU ids to split (default 0,1,...)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--log-dir", default="",
                        help="write process_<i>.log and the pids there (default: the terminal)")
    parser.add_argument("--timeout", type=float, default=0, help="stop all after S seconds")
    parser.add_argument("--exec", default="", help="run this command instead of flare train")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.rest = argv[cut + 1:]  # after '--': arguments of flare train or of the --exec command
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args()))
