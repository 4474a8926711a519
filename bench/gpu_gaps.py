"""Where the GPU waits: idle gaps in a torch.profiler Chrome trace, and what the host was doing to end them.

    python -m bench.gpu_gaps TRACE.json [--min-us 20] [--top 15]

TRACE.json is written by `python -m bench.train_bench --profile --trace` (or any torch.profiler
`export_chrome_trace`). The report: the traced window, the GPU's busy time (the union of its kernels, copies and
memsets), its idle time, and the idle gaps of at least --min-us grouped by the host operation that launched the
work ending each gap (the outermost and innermost CPU op around that launch). A gap ended by the first kernel
of a step's forward is time the host spent between steps; one ended inside a compiled layer is launch latency.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "user_annotation", "python_function"}


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def busy_intervals(events: list[dict]) -> list[tuple[float, float, dict]]:
    """The GPU's work as merged (start, end, the event that started the interval) in microseconds."""
    work = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e), key=lambda e: e["ts"])
    merged: list[list] = []
    for e in work:
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, e])
    return [(a, b, e) for a, b, e in merged]


def host_context(events: list[dict]):
    """A function (thread, time) -> (outermost, innermost) CPU op names around that time on that thread."""
    by_thread: dict = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATEGORIES and "dur" in e:
            by_thread[e["tid"]].append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]))
    for spans in by_thread.values():
        spans.sort()
    starts = {tid: [s[0] for s in spans] for tid, spans in by_thread.items()}

    def around(tid, t: float) -> tuple[str, str]:
        spans = by_thread.get(tid, [])
        enclosing = [s for s in spans[: bisect.bisect_right(starts.get(tid, []), t)] if s[1] >= t]
        if not enclosing:
            return "(no op)", "(no op)"
        outer = min(enclosing, key=lambda s: (s[0], -s[1]))
        inner = max(enclosing, key=lambda s: (s[0], -s[1]))
        return outer[2][:70], inner[2][:70]

    return around


def report(events: list[dict], min_us: float = 20.0, top: int = 15) -> str:
    intervals = busy_intervals(events)
    if not intervals:
        return "no GPU events in this trace"
    window = intervals[-1][1] - intervals[0][0]
    busy = sum(b - a for a, b, _ in intervals)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    around = host_context(events)
    by_host: dict = defaultdict(lambda: [0.0, 0])
    sizes = defaultdict(float)
    for (_, end, _), (start, _, first) in zip(intervals, intervals[1:]):
        gap = start - end
        if gap < min_us:
            continue
        launch = launches.get(first.get("args", {}).get("correlation"))
        if launch is None:
            key = ("(launch not traced)", first["name"][:70])
        else:
            outer, inner = around(launch["tid"], float(launch["ts"]))
            key = (outer, inner if inner != outer else launch["name"])
        by_host[key][0] += gap
        by_host[key][1] += 1
        bucket = "<100us" if gap < 100 else "<1ms" if gap < 1000 else "<10ms" if gap < 10_000 else ">=10ms"
        sizes[bucket] += gap
    idle = window - busy
    lines = [f"traced window {window / 1000:.1f} ms: GPU busy {busy / 1000:.1f} ms, idle {idle / 1000:.1f} ms "
             f"({100 * idle / window:.0f}%)",
             f"idle in gaps >= {min_us:g} us by gap size: "
             + ", ".join(f"{k} {v / 1000:.1f} ms" for k, v in sizes.items()),
             f"idle gaps >= {min_us:g} us by what the host launched to end them (outermost op | innermost op):"]
    for (outer, inner), (total, count) in sorted(by_host.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {total / 1000:8.2f} ms in {count:4d} gaps  {outer} | {inner}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--min-us", type=float, default=20.0, help="the smallest gap counted (microseconds)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    print(report(load(args.trace), args.min_us, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
