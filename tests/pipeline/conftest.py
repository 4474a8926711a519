"""Shared fixtures for the pipeline tests: CPU only, real libraries, the embedded `tiny-demo` model.

The expensive jobs (SFT -> DPO -> merge through `python -m tinyllama_mcp.pipeline run`) run once per test
session, one after another in a background thread, while the cheaper tests run in this process;
the fixtures `sft_job`, `dpo_job` and `merge_job` wait for their result. Every job gets a
fresh folder under the session's tmp dir, and `tiny-demo` is built once into a session cache.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bnb_cpu import CPU_PATHS
from pipeline_testlib import JobChain, JobRun, cli_env

JOB_FIXTURES = {"sft_job", "dpo_job", "merge_job"}


# ---------------------------------------------------------------- session environment


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tinyllama-mcp-cache")


def pipeline_env(cache: Path):
    """The cache and offline flags for in-process pipeline code (the CLI jobs get them in their env)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TINYLLAMA_MCP_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    return mp


@pytest.fixture(scope="module", autouse=True)
def _pipeline_env(cache_dir):
    """Set per module, not per session, so nothing leaks into the server's tests that run afterwards."""
    mp = pipeline_env(cache_dir)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def env(cache_dir) -> dict[str, str]:
    return cli_env(cache_dir)


@pytest.fixture(scope="session")
def tiny_demo(cache_dir) -> str:
    """The tiny-demo checkpoint folder, built once (in-process) into the session cache."""
    from tinyllama_mcp.pipeline.tiny_demo import ensure_tiny_demo

    mp = pipeline_env(cache_dir)  # session fixtures are set up before the module's environment
    try:
        return str(ensure_tiny_demo())
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def tokenizer(tiny_demo):
    from tinyllama_mcp.pipeline.modeling import load_tokenizer

    return load_tokenizer(tiny_demo)


def pytest_collection_modifyitems(session, config, items):
    config._pipeline_needs_jobs = any(JOB_FIXTURES & set(getattr(item, "fixturenames", ())) for item in items)


@pytest.fixture(scope="session")
def job_chains(tmp_path_factory, env, tiny_demo) -> dict[str, JobChain]:
    """The shared jobs on each bitsandbytes CPU path, one chain after the other."""
    executor = ThreadPoolExecutor(1, "pipeline-jobs")
    root = tmp_path_factory.mktemp("chain")
    chains = {path: JobChain(root / path, env, executor, path).start() for path in CPU_PATHS}
    yield chains
    for chain in chains.values():
        chain.close()
    executor.shutdown(wait=True)


@pytest.fixture(scope="session", params=CPU_PATHS)
def cpu_path(request) -> str:
    """The bitsandbytes CPU path a test's jobs ran on (and its in-process models take: bnb_cpu.described)."""
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _start_chain_early(request):
    """Start the shared jobs with the first pipeline test, so they run while cheaper tests do."""
    if getattr(request.config, "_pipeline_needs_jobs", False):
        request.getfixturevalue("job_chains")


@pytest.fixture(scope="session")
def sft_job(job_chains, cpu_path) -> JobRun:
    return job_chains[cpu_path].result("sft")


@pytest.fixture(scope="session")
def dpo_job(job_chains, cpu_path) -> JobRun:
    return job_chains[cpu_path].result("dpo")


@pytest.fixture(scope="session")
def merge_job(job_chains, cpu_path) -> JobRun:
    return job_chains[cpu_path].result("merge")
