"""Command line: `python -m tinyllama_mcp.pipeline run JOB_DIR` (see docs/PIPELINE_CLI.md)."""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyllama_mcp.pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the stage described by JOB_DIR/spec.json")
    run.add_argument("job_dir", type=Path)
    args = parser.parse_args(argv)
    from tinyllama_mcp.pipeline.runner import run as run_job

    return run_job(args.job_dir)


if __name__ == "__main__":
    sys.exit(main())
