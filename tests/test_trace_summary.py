"""The profile summary of the benchmarks sums device kernels by name: a GPU trace's device
processes only (host events ignored), a CPU trace's XLA client threads less the executor spans."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from trace_summary import device_time_by_arg, device_time_by_name  # noqa: E402


def meta(kind: str, pid: int, name: str, tid: int | None = None) -> dict:
    event = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
    return event if tid is None else {**event, "tid": tid}


def span(pid: int, tid: int, name: str, dur: float) -> dict:
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur}


def test_gpu_trace_counts_device_kernels_only():
    events = [meta("process_name", 1, "/host:CPU"), meta("process_name", 7, "/device:GPU:0"),
              meta("thread_name", 7, "Stream #1", tid=3),
              span(1, 9, "PjitFunction(step)", 500.0), span(7, 3, "gated_delta_scan_fwd", 40.0),
              span(7, 3, "fusion.12", 10.0), span(7, 3, "gated_delta_scan_fwd", 45.0)]
    assert device_time_by_name(events) == {"gated_delta_scan_fwd": 85.0, "fusion.12": 10.0}


def test_cpu_trace_counts_xla_threads_without_executor_spans():
    events = [meta("process_name", 1, "/host:CPU"), meta("thread_name", 1, "python", tid=1),
              meta("thread_name", 1, "tf_XLAPjRtCpuClient/42", tid=2),
              span(1, 1, "PjitFunction(step)", 900.0), span(1, 2, "ThunkExecutor::Execute", 300.0),
              span(1, 2, "ynn_fusion.3", 120.0), span(1, 2, "while.5", 60.0)]
    assert device_time_by_name(events) == {"ynn_fusion.3": 120.0, "while.5": 60.0}


def test_time_by_argument_tells_launches_of_one_kernel_apart():
    events = [meta("process_name", 7, "/device:GPU:0"),
              {**span(7, 3, "memcpy128", 30.0), "args": {"hlo_op": "copy.4", "run_id": "1"}},
              {**span(7, 3, "memcpy128", 5.0), "args": {"hlo_op": "copy.9", "run_id": "1"}},
              {**span(7, 3, "memcpy128", 20.0), "args": {"hlo_op": "copy.4", "run_id": "2"}},
              {**span(7, 3, "fusion.1", 99.0), "args": {"hlo_op": "fusion.1"}}]
    assert device_time_by_arg(events, "memcpy128") == {("hlo_op", "copy.4"): 50.0,
                                                        ("hlo_op", "copy.9"): 5.0}
