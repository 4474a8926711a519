"""The same benchmark on two checkouts of the project, in one call on one card: did a change move the figures?

    python -m bench.compare_checkouts --before DIR [--after .] --out OUT --bench train [-- BENCH ARGS...]
    python -m bench.compare_checkouts --before DIR --out OUT --bench gen [-- BENCH ARGS...]

Each checkout runs its own bench/train_bench.py (or bench/gen_bench.py) in a process of its own, with its own
packages first on the path (a checkout with src/ or with the packages at its root). The runs alternate
(before, after, before, after with --repeat 2), so a card whose speed drifts shows as a spread between repeats.
Prints, per figure, the before and after values and their ratio, and writes OUT/compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = {"train": ["-m", "bench.train_bench"], "gen": ["bench/gen_bench.py"]}
RESULT = {"train": "train_bench.json", "gen": "gen_bench.json"}


def run(checkout: Path, bench: str, out: Path, args: list[str]) -> dict:
    """One bench run in `checkout`; its JSON result."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(checkout / "src"), str(checkout)] if (checkout / "src").is_dir() else [str(checkout)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    target = out if bench == "train" else out / RESULT[bench]
    command = [sys.executable, *BENCH[bench], "--out", str(target), *args]
    print(f"[compare] {checkout}: {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=checkout, env=env, check=False)
    path = out / RESULT[bench]
    return json.loads(path.read_text()) if path.is_file() else {}


def figures(bench: str, result: dict) -> dict[str, float]:
    """The throughput figures to compare: each project run's tokens/s (train), each engine measurement (gen)."""
    found: dict[str, float] = {}
    if bench == "train":
        for stage in ("sft", "dpo"):
            for name, run_result in result.get(stage, {}).get("runs", {}).items():
                for key in ("tokens_per_s", "tokens_per_s_late", "tokens_per_s_replay"):
                    if isinstance(run_result.get(key), (int, float)):
                        found[f"{stage} {name} {key}"] = run_result[key]
        return found

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix} {key}".strip(), inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "tok" in prefix:
            found[prefix] = value

    walk("", result)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bench", choices=sorted(BENCH), required=True)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the bench's own arguments")
    cfg = ap.parse_args(argv)
    args = cfg.bench_args[1:] if cfg.bench_args[:1] == ["--"] else cfg.bench_args
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    card = None
    for k in range(cfg.repeat):
        for side in ("before", "after"):
            checkout = getattr(cfg, side).resolve()
            result = run(checkout, cfg.bench, cfg.out.resolve() / f"{side}{k + 1}", args)
            card = card or result.get("card") or result.get("device")
            runs[side].append(figures(cfg.bench, result))
    names = sorted(set().union(*runs["before"], *runs["after"]))
    table, lines = {}, [f"card: {card}", f"{'figure':60} {'before':>10} {'after':>10} {'after/before':>12}"]
    for name in names:
        before = [r[name] for r in runs["before"] if name in r]
        after = [r[name] for r in runs["after"] if name in r]
        if not before or not after:
            continue
        b, a = statistics.median(before), statistics.median(after)
        ratio = round(a / b, 3) if b else None
        table[name] = {"before": before, "after": after, "ratio": ratio}
        lines.append(f"{name[:60]:60} {b:>10.1f} {a:>10.1f} {ratio if ratio is not None else '-':>12}")
    (cfg.out / "compare.json").write_text(json.dumps({"card": card, "bench": cfg.bench, "args": args,
                                                      "figures": table}, indent=2))
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
