"""Where a jitted program spends device time: trace a few calls with ``jax.profiler`` and sum the
device events of the trace by kernel (XLA fusion, library call or Pallas kernel) name.

    from trace_summary import profile_top
    top = profile_top(lambda: step(state, batch), calls=2, trace_dir="/tmp/trace")

On a GPU the events are those of the ``/device:*`` processes (one per kernel launch); on the CPU,
where there is no device process, those of XLA's CPU client threads less the executor's own
spans (which enclose the ops). The trace stays in
``trace_dir`` (open it in Perfetto or TensorBoard for the timeline).

Where a kernel's launches come from (the string arguments of its device events, e.g. the HLO op
each launch ran for), from a trace folder that ``--profile`` left:

    python benchmarks/trace_summary.py /tmp/prof/flare_b2 memcpy128
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
from collections.abc import Callable

import jax


def _names(events: list[dict]) -> tuple[dict, dict]:
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return processes, threads


PER_LAUNCH_ARGS = {"_src", "run_id", "correlation_id", "device_ordinal"}  # say nothing of origin


def _device_events(events: list[dict]) -> list[dict]:
    """The complete events that are kernel launches (see the module docstring for which)."""
    processes, threads = _names(events)
    complete = [e for e in events if e.get("ph") == "X"]
    device = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if device:
        return [e for e in complete if e["pid"] in device]
    return [e for e in complete
            if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
            and not e["name"].startswith("ThunkExecutor")]


def device_time_by_name(events: list[dict]) -> dict[str, float]:
    """Microseconds of device events per event name (see the module docstring for which)."""
    totals: dict[str, float] = collections.defaultdict(float)
    for e in _device_events(events):
        totals[e["name"]] += float(e.get("dur", 0.0))
    return dict(totals)


def device_time_by_arg(events: list[dict], name: str) -> dict[tuple[str, str], float]:
    """Microseconds of the device events called ``name``, per (argument, string value) pair of
    those events (the HLO op, module, kernel details the profiler attached)."""
    totals: dict[tuple[str, str], float] = collections.defaultdict(float)
    for e in _device_events(events):
        if e["name"] == name:
            for key, value in (e.get("args") or {}).items():
                if key not in PER_LAUNCH_ARGS and isinstance(value, str) and len(value) < 300:
                    totals[(key, value)] += float(e.get("dur", 0.0))
    return dict(totals)


def load_trace(trace_dir: str) -> list[dict]:
    """The events of the newest perfetto trace under ``trace_dir``."""
    newest = max(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
    with gzip.open(newest) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile_top(call: Callable[[], object], *, calls: int, trace_dir: str,
                top: int = 25) -> list[dict]:
    """Trace ``calls`` runs of ``call`` (already compiled) and return the ``top`` kernels by
    device time: name, milliseconds per call, share of all device time."""
    jax.block_until_ready(call())
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        for _ in range(calls):
            jax.block_until_ready(call())
    finally:
        jax.profiler.stop_trace()
    totals = device_time_by_name(load_trace(trace_dir))
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [{"name": name, "ms_per_call": us / 1e3 / calls, "share": us / whole}
            for name, us in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description="where a kernel's launches come from")
    parser.add_argument("trace_dir", help="a folder holding a perfetto_trace.json.gz")
    parser.add_argument("names", nargs="+", help="kernel names, as profile_top lists them")
    parser.add_argument("--top", type=int, default=15, help="argument values listed per name")
    args = parser.parse_args()
    events = load_trace(args.trace_dir)
    for name in args.names:
        ranked = sorted(device_time_by_arg(events, name).items(), key=lambda item: -item[1])
        print(f"{name}:")
        for (key, value), us in ranked[:args.top]:
            print(f"  {us / 1e3:9.3f} ms  {key}={value}")


if __name__ == "__main__":
    main()
