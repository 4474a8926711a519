"""bench.time_to_model's arithmetic: each stage's wall time split from its timestamps, extrapolation, the table.

A project stage is split from its job row (the tool call, created_at, started_at, finished_at) and its events.jsonl;
a peer stage (columns a and b) from the marks its own process wrote and its per-step clock.
"""

from __future__ import annotations

from typing import Any, Optional

SPLITS = ("startup", "load", "compile", "train", "save", "other")
LABELS = {"startup": "start-up", "load": "load", "compile": "compile/record", "train": "train", "save": "save",
          "other": "other", "total": "total"}


def _r(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 2)


def step_timing(steps: list[tuple[int, float]], origin: float, excluded_s: float = 0.0) -> dict:
    """(step number, time) of each logged optimizer step, from `origin` (training's start): the per-step seconds
    of the steps after the first, and the first step's excess over them (compile, graph recording, warm-up).
    `excluded_s`: seconds inside the steps that are not steps (checkpoint saves)."""
    if not steps:
        return {"per_step_s": None, "first_excess_s": 0.0}
    (n0, t0), (n1, t1) = steps[0], steps[-1]
    per_step = (t1 - t0 - excluded_s) / (n1 - n0) if n1 > n0 else None
    first = t0 - origin
    excess = max(first - per_step * n0, 0.0) if per_step is not None else 0.0
    return {"per_step_s": per_step, "first_excess_s": excess, "first_step_s": first}


def checkpoint_seconds(events: list[dict], before: float = float("inf")) -> float:
    """Seconds spent writing checkpoints before time `before`: each checkpoint event after the step event it follows."""
    total, last_step = 0.0, None
    for event in events:
        if event["event"] == "step":
            last_step = event["time"]
        elif event["event"] == "checkpoint" and last_step is not None and event["time"] < before:
            total += event["time"] - last_step
    return total


def _first(events: list[dict], name: str, **match: Any) -> Optional[dict]:
    return next((e for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items())), None)


def job_splits(job: dict, events: list[dict], t_call: float, t_returned: float) -> dict:
    """A project stage from the tool call to the job's end (the store's finished_at), split by its events.

    start-up: claim to the job's first event (process start, imports, the data read); load: to the `start` event
    (model load and NF4, DPO's SFT merge and re-quantize, the trainer built, the levers applied); compile/record:
    the first step's excess over a step; train: to the last step (DPO: with its precomputed reference log-probs);
    save: checkpoints and the adapter; other: the tool call, the queue, eval samples, lineage, process exit.
    """
    events = [e for e in events if e["time"] >= job["started_at"] - 1e-3]  # the last attempt's
    end = job["finished_at"]
    first = events[0]["time"] if events else end
    start = _first(events, "start")
    out: dict[str, Any] = {"tool_call_s": _r(t_returned - t_call), "queue_s": _r(job["started_at"] - t_returned),
                           "attempts": job.get("attempts"), "events": [e["event"] for e in events][:6]}
    artifact = _first(events, "artifact", kind="merged") or _first(events, "artifact", kind="adapter")
    finished = _first(events, "end")
    t_end = finished["time"] if finished else end
    out["exit_s"] = _r(end - t_end)
    if start is None:  # failed before training began
        out.update(startup=_r(first - job["started_at"]), load=_r(end - first), compile=0.0, train=0.0, save=0.0,
                   other=_r(job["started_at"] - t_call))
        out["total"] = _r(end - t_call)
        return out
    steps = [(e["step"], e["time"]) for e in events if e["event"] == "step"]
    if start.get("stage") == "merge":  # its start event follows its imports
        t_art = artifact["time"] if artifact else t_end
        merged = _first(events, "merged")  # proposed: the model merged in memory, before it is written
        t_merged = merged["time"] if merged else t_art
        out.update(startup=_r(start["time"] - job["started_at"]), load=_r(t_merged - start["time"]), compile=0.0,
                   train=0.0, save=_r(t_art - t_merged) if merged else None)
        if merged is None:
            out["note"] = "merge: no event between its merge and its save (both under load)"
        tail = t_end - t_art
    else:
        reference = (start.get("reference_logps") or {}).get("seconds") or 0.0
        last_step = steps[-1][1] if steps else start["time"]
        checkpoints = checkpoint_seconds(events, before=last_step)  # those between steps (later ones: under save)
        timing = step_timing(steps, start["time"], checkpoints)
        t_art = artifact["time"] if artifact else last_step
        samples = _first(events, "artifact", kind="eval_samples")
        # The end of start-up: a `loading` event (proposed: imports and data read, before the model loads), else the
        # first event (SFT's over-length warning, after the data is read and counted), else `start` itself.
        anchor = _first(events, "loading") or events[0]
        before = start["time"] - job["started_at"] - reference  # start-up and load, without the reference pass
        if anchor is start:
            out["note"] = "no event before 'start': start-up includes the load"
        startup = before if anchor is start else anchor["time"] - job["started_at"]
        out.update(startup=_r(startup), load=None if anchor is start else _r(before - startup),
                   compile=_r(timing["first_excess_s"]),
                   train=_r(last_step - start["time"] - timing["first_excess_s"] - checkpoints + reference),
                   save=_r(t_art - last_step + checkpoints), reference_logps_s=_r(reference),
                   checkpoints_s=_r(checkpoint_seconds(events)), per_step_s=_r(timing["per_step_s"]),
                   steps=steps[-1][0] if steps else 0, total_steps=start.get("total_steps"),
                   eval_samples_s=_r(samples["time"] - t_art) if samples else None)
        loaded = [e for e in events if e["event"] == "loaded"]  # proposed: after each model load (DPO: two)
        if loaded and anchor is not start:
            out["loaded_after_s"] = {e.get("what", "model"): _r(e["time"] - anchor["time"]) for e in loaded}
        tail = t_end - t_art
    out["other"] = _r((job["started_at"] - t_call) + tail + (end - t_end))
    out["total"] = _r(end - t_call)
    return out


def peer_splits(run: dict, steps_asked: int) -> dict:
    """A peer stage from its process start to its exit, split by its marks; training measured in full, or for
    `steps_asked` steps and extrapolated to the run's total steps from the mean step after the first."""
    marks, spawn, exit_ = run.get("marks", {}), run["spawn"], run["exit"]
    get = lambda name, default: marks.get(name, default)  # noqa: E731
    imported = get("imported", spawn)
    out: dict[str, Any] = {"startup": _r(imported - spawn)}
    if "error" in run:
        out.update(error=run["error"], total=_r(exit_ - spawn))
        return out
    if "train_call" in marks:
        curve, begin = run.get("curve") or [], get("train_begin", marks["train_call"])
        steps = [(i + 1, begin + p["t"]) for i, p in enumerate(curve)]
        timing = step_timing(steps, marks["train_call"])
        measured = get("train_end", marks["train_call"]) - marks["train_call"]
        total_steps, done = run.get("total_steps") or len(curve), len(curve)
        extra = (total_steps - done) * timing["per_step_s"] if done < total_steps and timing["per_step_s"] else 0.0
        out.update(load=_r(marks["train_call"] - imported), compile=_r(timing["first_excess_s"]),
                   train=_r(measured - timing["first_excess_s"] + extra),
                   save=_r(get("saved", get("train_end", exit_)) - get("train_end", exit_)),
                   per_step_s=_r(timing["per_step_s"]), steps=done, total_steps=total_steps,
                   measured="full" if done >= total_steps else f"{done} of {total_steps} steps, extrapolated",
                   extrapolated_s=_r(extra))
        if "sft_merged" in marks:
            out["sft_merge_s"] = _r(marks["sft_merged"] - imported)
        out["other"] = _r(exit_ - get("saved", exit_))
        out["total"] = _r(exit_ - spawn + extra)
        return out
    if run.get("stage") == "merge":  # load the 16-bit base and merge the adapter (Unsloth: merges as it saves); save
        merged = get("merged", get("loaded", exit_))
        out.update(load=_r(merged - imported), compile=0.0, train=0.0, save=_r(get("saved", exit_) - merged),
                   other=_r(exit_ - get("saved", exit_)))
    else:  # generate: load the merged model, then the answers
        out.update(load=_r(get("loaded", exit_) - imported), compile=0.0, train=0.0, save=0.0,
                   other=_r(exit_ - get("loaded", exit_)))
    out["total"] = _r(exit_ - spawn)
    return out


def whole_job(column: dict) -> Optional[float]:
    """SFT + DPO + merge, tool call (process start) to job end each, plus the first answer after the merge."""
    parts = [column.get(stage, {}).get("total") for stage in ("sft", "dpo", "merge")]
    parts.append(column.get("generate", {}).get("first_after_merge_s"))
    return round(sum(parts), 2) if all(isinstance(p, (int, float)) for p in parts) else None


def ratios(results: dict) -> dict:
    project = results["columns"].get("project", {}).get("whole_job_s")
    found = {}
    for name in ("a", "b"):
        other = results["columns"].get(name, {}).get("whole_job_s")
        found[f"{name}/project"] = round(other / project, 2) if project and other else None
    return found


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, (int, float)) else str(value)


def table(results: dict) -> str:
    """The markdown table: stage x split rows, one column per measured column."""
    names = [n for n in ("project", "a", "b") if n in results["columns"]]
    titles = {"project": "project (server job path)", "a": "(a) seed's TRL notebook", "b": "(b) Unsloth"}
    lines = [f"card: {results['card']}; torch {results.get('torch')}; smoke: {results['smoke']}",
             "| stage | part | " + " | ".join(titles[n] for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for stage in ("sft", "dpo", "merge"):
        for part in (*SPLITS, "total"):
            cells = []
            for n in names:
                column = results["columns"][n]
                stage_result = column.get(stage) or {}
                cells.append(column["skipped"] if "skipped" in column and part == "total" else
                             stage_result.get("error", "")[:40] if part == "total" and "error" in stage_result else
                             _cell(stage_result.get(part)))
            lines.append(f"| {stage} | {LABELS[part]} s | " + " | ".join(cells) + " |")
    rows = (("first generate after merge end s", "first_after_merge_s"), ("first generate call s", "first_s"),
            ("32 concurrent: wall s", "batch_s"), ("32 concurrent: tokens/s", "batch_tokens_per_s"))
    columns = [results["columns"][n] for n in names]
    for label, key in rows:
        lines.append(f"| generate | {label} | " + " | ".join(_cell((c.get("generate") or {}).get(key)) for c in columns)
                     + " |")
    lines.append("| whole job | s | " + " | ".join(_cell(c.get("whole_job_s")) for c in columns) + " |")
    lines.append("| measured | | " + " | ".join(c.get("measured", "-") for c in columns) + " |")
    r = results.get("ratios", {})
    first = (results["columns"].get("project", {}).get("generate") or {}).get("first_after_merge_s")
    lines.append(f"\nratios: total(a)/total(project) {_cell(r.get('a/project'))} (target >= 10), "
                 f"total(b)/total(project) {_cell(r.get('b/project'))} (target >= 2); first generate after the "
                 f"merge's end {_cell(first)} s (target <= 2)")
    return "\n".join(lines)
