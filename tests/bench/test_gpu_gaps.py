"""bench.gpu_gaps: the GPU's idle time in a trace, attributed to the host op that launched the work after it."""

from __future__ import annotations

from bench.gpu_gaps import report


def _kernel(ts, dur, correlation):
    return {"ph": "X", "cat": "kernel", "name": f"k{correlation}", "ts": ts, "dur": dur, "pid": 0, "tid": 7,
            "args": {"correlation": correlation}}


def _launch(ts, correlation):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 5, "pid": 1, "tid": 1,
            "args": {"correlation": correlation}}


def _op(name, ts, dur):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}


def test_idle_gaps_are_measured_and_attributed_to_the_launching_op():
    events = [
        _kernel(0, 100, 1), _kernel(50, 100, 2),  # overlapping: busy 0-150
        _kernel(1150, 100, 3),  # after a 1 ms gap, launched inside optimizer.step / aten::mul
        _kernel(1260, 40, 4),  # a 10 us gap: under the 20 us floor
        _op("Optimizer.step", 1000, 300), _op("aten::mul", 1100, 20), _launch(1110, 3), _launch(1200, 4),
    ]
    text = report(events)
    assert "traced window 1.3 ms: GPU busy 0.3 ms, idle 1.0 ms (78%)" in text
    assert "<1ms" not in text and "<10ms 1.0 ms" in text
    assert "1.00 ms in    1 gaps  Optimizer.step | aten::mul" in text


def test_a_trace_without_gpu_work_says_so():
    assert report([_op("aten::mm", 0, 10)]) == "no GPU events in this trace"
