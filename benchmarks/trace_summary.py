"""Where a jitted program spends device time: trace a few calls with ``jax.profiler`` and sum the
device events of the trace by kernel (XLA fusion, library call or Pallas kernel) name.

    from trace_summary import profile_top
    top = profile_top(lambda: step(state, batch), calls=2, trace_dir="/tmp/trace")

On a GPU the events are those of the ``/device:*`` processes (one per kernel launch); on the CPU,
where there is no device process, those of XLA's CPU client threads less the executor's own
spans (which enclose the ops). The trace stays in
``trace_dir`` (open it in Perfetto or TensorBoard for the timeline).
"""

from __future__ import annotations

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


def device_time_by_name(events: list[dict]) -> dict[str, float]:
    """Microseconds of device events per event name (see the module docstring for which)."""
    processes, threads = _names(events)
    complete = [e for e in events if e.get("ph") == "X"]
    device = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if device:
        chosen = [e for e in complete if e["pid"] in device]
    else:
        chosen = [e for e in complete
                  if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
                  and not e["name"].startswith("ThunkExecutor")]
    totals: dict[str, float] = collections.defaultdict(float)
    for e in chosen:
        totals[e["name"]] += float(e.get("dur", 0.0))
    return dict(totals)


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
    newest = max(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
    with gzip.open(newest) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = device_time_by_name(events)
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [{"name": name, "ms_per_call": us / 1e3 / calls, "share": us / whole}
            for name, us in ranked]
