"""An SDLC agent that writes commit messages for diffs, learns from your reviews and promotes itself only if better.

It talks to one running server (`tinyllama-mcp serve --transport http --port 8765`): MCP tools at /mcp for
training, evaluation and aliases, the OpenAI-compatible /v1 for the answers, through the OpenAI Agents SDK.

    export TINYLLAMA_MCP_TOKEN=...   # the server's bearer token
    python examples/sdlc_agent.py --url http://127.0.0.1:8765 --diffs diffs.jsonl --feedback feedback.jsonl
    python examples/sdlc_agent.py ... --interactive        # review each suggestion on the terminal first
    python examples/sdlc_agent.py ... --json               # print only the JSON summary

diffs.jsonl:    {"diff": "..."} per line, the pending diffs.
feedback.jsonl: {"diff": "...", "message": "<the message you accepted or wrote>", "accepted": true|false} per line.

The loop: make sure alias `production` exists (first run: --base) -> suggest a message per diff with
`production` -> collect feedback -> accepted rows become SFT chat rows (every 4th held out) in --data-dir, which
must be inside the server's data folders (default $TINYLLAMA_MCP_HOME/data/sdlc_agent) -> start_sft, wait, merge,
wait -> compare(production, merged) on the held-out rows and diffs -> judge the blinded pairs -> promote the merged
model only if its held-out chat_loss is lower AND its judged win_rate >= --min-win-rate (default 0.5) -> answer
the diffs with `production`.

Judging rule: of the two blinded answers to a held-out diff, the one closer to the message the user accepted for
that diff wins (difflib.SequenceMatcher ratio); equal ratios are a tie. Ties count half in win_rate (server side).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
from agents.exceptions import ModelBehaviorError
from openai import AsyncOpenAI

from tinyllama_mcp.server.alias_models import AliasesOutput, AliasMoveOutput
from tinyllama_mcp.server.client import TinyLlamaClient, ToolCallError
from tinyllama_mcp.server.evaluation_models import CompareOutput, CompareResultsOutput, JudgeOutput
from tinyllama_mcp.server.models import StartJobOutput
from tinyllama_mcp.server.settings import default_home
from tinyllama_mcp.server.wait_tool import WaitOutput

ALIAS = "production"
SYSTEM = ("You write git commit messages. Answer with one line in Conventional Commits style, "
          "type(scope): summary, for the diff you are given.")


class LoopError(RuntimeError):
    """Bad input or a failed job; the message says what to do."""


# --------------------------------------------------------------------------- files
def read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise LoopError(f"{what} file {path} does not exist; create it (one JSON object per line)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LoopError(f"{path}:{n} is not JSON ({exc.msg}); fix or remove that line") from None
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat_row(diff: str, message: str) -> dict[str, Any]:
    """An accepted review as a start_sft row; the system turn is the agent's instructions, as /v1 sees them."""
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": diff},
                         {"role": "assistant", "content": message}]}


def split_rows(accepted: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(train, held out): every 4th accepted row is held out, at least one; both parts must be non-empty."""
    if len(accepted) < 2:
        raise LoopError(f"only {len(accepted)} accepted feedback row(s); accept at least 2 suggestions (one is held "
                        "out for evaluation) before retraining")
    held_at = {k for k in range(len(accepted)) if k % 4 == 3} or {len(accepted) - 1}
    return ([r for k, r in enumerate(accepted) if k not in held_at], [r for k, r in enumerate(accepted) if k in held_at])


# --------------------------------------------------------------------------- /v1 through the Agents SDK
def commit_agent(url: str, token: str, max_tokens: int) -> Agent:
    """An Agent whose model is alias `production` on the server's /v1: greedy, short answers."""
    client = AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=token, max_retries=0)
    model = OpenAIChatCompletionsModel(model=ALIAS, openai_client=client)
    return Agent(name="commit-writer", instructions=SYSTEM, model=model,
                 model_settings=ModelSettings(temperature=0, max_tokens=max_tokens))


async def suggest(agent: Agent, diffs: list[str]) -> list[str]:
    """One message per diff. An answer the model left empty (the SDK raises ModelBehaviorError) is '', for the user
    to write instead of a crash of the whole loop."""
    messages = []
    for diff in diffs:
        try:
            messages.append(str((await Runner.run(agent, diff)).final_output).strip())
        except ModelBehaviorError:
            messages.append("")
    return messages


def review_on_terminal(diffs: list[str], suggestions: list[str], feedback: Path) -> None:
    """--interactive: accept / edit / reject each suggestion; each answer is appended to the feedback file."""
    with feedback.open("a", encoding="utf-8") as out:
        for diff, text in zip(diffs, suggestions):
            print(f"\n{diff}\n--- suggested: {text}")
            choice = input("[a]ccept, [e]dit, [r]eject? ").strip().lower()[:1]
            if choice == "e":
                text, accepted = input("your message: ").strip(), True
            else:
                accepted = choice == "a"
            out.write(json.dumps({"diff": diff, "message": text, "accepted": accepted}) + "\n")


# --------------------------------------------------------------------------- MCP tools
async def wait_job(mcp: TinyLlamaClient, job_id: str, timeout_s: float) -> WaitOutput:
    """wait(job_id) until the job ends (wait returns timed_out after timeout_s; call again then)."""
    while True:
        out = await mcp.call("wait", WaitOutput, {"job_id": job_id, "timeout_s": timeout_s, "log_lines": 10})
        if not out.timed_out:
            break
    if out.job is None or out.job.state != "succeeded":
        error = out.job.error if out.job is not None else out.hint
        raise LoopError(f"job {job_id} did not succeed: {error}; see status(job_id='{job_id}')")
    return out


async def production_target(mcp: TinyLlamaClient, base: str) -> str:
    """The alias's target; the first run points it at the base model (aliases() errors for a missing alias)."""
    try:
        return (await mcp.call("aliases", AliasesOutput, {"alias": ALIAS})).aliases[0].target
    except ToolCallError as exc:
        if "there is no alias" not in str(exc):
            raise
    moved = await mcp.call("promote", AliasMoveOutput,
                           {"model": base, "alias": ALIAS, "reason": "initial production model"})
    return moved.alias.target


async def retrain(mcp: TinyLlamaClient, train: Path, held: Path, base: str, opts: dict[str, Any]) -> str:
    """start_sft (held-out rows as validation) -> wait -> merge -> wait; returns the merge job id."""
    sft = await mcp.call("start_sft", StartJobOutput, {
        "dataset": str(train), "validation_dataset": str(held), "base_model": base, **opts["sft"]})
    await wait_job(mcp, sft.job_id, opts["wait_s"])
    merged = await mcp.call("merge", StartJobOutput, {"sft_job_id": sft.job_id})
    await wait_job(mcp, merged.job_id, opts["wait_s"])
    return merged.job_id


def pick(pair_answers: tuple[str, str], wanted: str) -> str:
    """The judging rule: the answer closer to the accepted message wins; equal closeness is a tie."""
    a, b = (difflib.SequenceMatcher(None, answer, wanted).ratio() for answer in pair_answers)
    return "A" if a > b else "B" if b > a else "tie"


async def evaluate(mcp: TinyLlamaClient, candidate: str, held: Path, wanted: dict[str, str],
                   opts: dict[str, Any]) -> dict[str, Any]:
    """compare(production, candidate) on the held-out rows -> wait -> compare_results -> judge: the figures."""
    compared = await mcp.call("compare", CompareOutput, {
        "models": [ALIAS, candidate], "chat_dataset": str(held), "prompts": list(wanted),
        "max_new_tokens": opts["max_tokens"], "max_length": opts["sft"].get("max_length")})
    for model in compared.models:
        await wait_job(mcp, model.job_id, opts["wait_s"])
    results = await mcp.call("compare_results", CompareResultsOutput, {"comparison_id": compared.comparison_id})
    if results.state != "ready":
        raise LoopError(f"comparison {compared.comparison_id} is {results.state}: {results.next_step}")
    verdicts = [{"pair_id": p.pair_id, "winner": pick((p.A, p.B), wanted[p.prompt])} for p in results.pairs]
    judged = await mcp.call("judge", JudgeOutput, {"comparison_id": compared.comparison_id, "verdicts": verdicts})
    # table rows and scores come baseline first, then the candidate
    losses = [row.metrics.get("chat_loss") for row in results.table]
    return {"comparison_id": compared.comparison_id,
            "models": [m.model for m in results.models],
            "production_chat_loss": losses[0], "candidate_chat_loss": losses[1],
            "candidate_win_rate": judged.scores[1].win_rate, "production_win_rate": judged.scores[0].win_rate,
            "verdicts": verdicts}


def decide(figures: dict[str, Any], min_win_rate: float = 0.5) -> bool:
    """Promote only if the candidate is better on held-out loss AND wins at least min_win_rate of the judged pairs."""
    new, old, rate = figures["candidate_chat_loss"], figures["production_chat_loss"], figures["candidate_win_rate"]
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (new, old, rate)):
        return False
    return new < old and rate >= min_win_rate


# --------------------------------------------------------------------------- the loop
def _unwrapped(exc: BaseException) -> BaseException:
    """The MCP client's task groups wrap errors raised inside `async with`; surface ours unwrapped."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def run_loop(url: str, token: str, diffs_path: Path, feedback_path: Path, *, data_dir: Optional[Path] = None,
                   base: str = "tiny-demo", interactive: bool = False, max_steps: int = 60,
                   learning_rate: float = 2e-4, max_tokens: int = 32, extra_sft: Optional[dict] = None,
                   min_win_rate: float = 0.5, wait_s: float = 300, log=print) -> dict[str, Any]:
    """One turn of the loop; returns the JSON summary (see the module docstring). Raises LoopError, ToolCallError."""
    try:
        return await _loop(url, token, diffs_path, feedback_path, data_dir, base, interactive, max_steps,
                           learning_rate, max_tokens, extra_sft, min_win_rate, wait_s, log)
    except BaseExceptionGroup as group:
        inner = _unwrapped(group)
        raise inner if isinstance(inner, (LoopError, ToolCallError)) else group


async def _loop(url, token, diffs_path, feedback_path, data_dir, base, interactive, max_steps, learning_rate,
                max_tokens, extra_sft, min_win_rate, wait_s, log) -> dict[str, Any]:
    set_tracing_disabled(True)  # the Agents SDK would upload traces to OpenAI; this runs offline
    url = url.rstrip("/")
    if data_dir is None:
        data_dir = Path(os.environ.get("TINYLLAMA_MCP_HOME") or default_home()) / "data" / "sdlc_agent"
    diffs = [str(row.get("diff", "")) for row in read_jsonl(diffs_path, "diffs")]
    if not diffs or not all(d.strip() for d in diffs):
        raise LoopError(f"{diffs_path} needs rows like {{\"diff\": \"...\"}} with a non-empty diff each")
    opts = {"wait_s": wait_s, "max_tokens": max_tokens,
            "sft": {"max_steps": max_steps, "learning_rate": learning_rate, **(extra_sft or {})}}
    agent = commit_agent(url, token, max_tokens)

    async with TinyLlamaClient.http(url + "/mcp", token) as mcp:
        before = await production_target(mcp, base)
        log(f"production -> {before}")
        if interactive:  # the chore: suggest, then the user reviews on the terminal
            review_on_terminal(diffs, await suggest(agent, diffs), feedback_path)
        rows = read_jsonl(feedback_path, "feedback")
        accepted = [r for r in rows if r.get("accepted") is True and str(r.get("message", "")).strip()
                    and str(r.get("diff", "")).strip()]
        if not accepted:
            raise LoopError(f"{feedback_path} has no accepted rows ({{\"diff\", \"message\", \"accepted\": true}}); "
                            "review some suggestions (--interactive) first")
        train_rows, held_rows = split_rows(accepted)
        train = write_jsonl(data_dir / "train.jsonl", [chat_row(r["diff"], r["message"]) for r in train_rows])
        held = write_jsonl(data_dir / "heldout.jsonl", [chat_row(r["diff"], r["message"]) for r in held_rows])
        log(f"{len(train_rows)} training rows, {len(held_rows)} held out, in {data_dir}")

        candidate = await retrain(mcp, train, held, base, opts)
        log(f"trained and merged: {candidate}")
        figures = await evaluate(mcp, candidate, held, {r["diff"]: r["message"] for r in held_rows}, opts)
        promoted = decide(figures, min_win_rate)
        log(f"chat_loss production {figures['production_chat_loss']} vs new {figures['candidate_chat_loss']}, "
            f"new win_rate {figures['candidate_win_rate']}: {'promote' if promoted else 'keep production'}")
        if promoted:
            reason = (f"held-out chat_loss {figures['candidate_chat_loss']:.4f} < {figures['production_chat_loss']:.4f}"
                      f", win_rate {figures['candidate_win_rate']:.2f} ({figures['comparison_id']})")
            await mcp.call("promote", AliasMoveOutput, {"model": candidate, "alias": ALIAS, "reason": reason})
        after = (await mcp.call("aliases", AliasesOutput, {"alias": ALIAS})).aliases[0].target

    answers = await suggest(agent, diffs)  # whatever production is now answers the pending diffs
    return {"production_before": before, "production_after": after, "candidate": candidate,
            "promoted": promoted, "figures": figures,
            "answers": [{"diff": d, "message": m} for d, m in zip(diffs, answers)]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8765", help="the server, without /mcp or /v1")
    parser.add_argument("--token", default=os.environ.get("TINYLLAMA_MCP_TOKEN"),
                        help="bearer token (default: $TINYLLAMA_MCP_TOKEN)")
    parser.add_argument("--diffs", type=Path, required=True, help="JSONL of {\"diff\": ...} rows")
    parser.add_argument("--feedback", type=Path, required=True, help="JSONL of {diff, message, accepted} rows")
    parser.add_argument("--data-dir", type=Path, help="inside the server's data folders "
                        "(default: $TINYLLAMA_MCP_HOME/data/sdlc_agent)")
    parser.add_argument("--base", default="tiny-demo", help="base model to fine-tune and first production model")
    parser.add_argument("--interactive", action="store_true", help="review suggestions on the terminal first")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="the recipe's SFT rate")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per suggested message")
    parser.add_argument("--quantization", choices=["nf4", "none"],
                        help="default: 'none' for tiny-demo (CPU), else the recipe's nf4 (needs a CUDA GPU)")
    parser.add_argument("--min-win-rate", type=float, default=0.5,
                        help="judged win rate the new model needs besides a lower held-out loss")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("no token: pass --token or set TINYLLAMA_MCP_TOKEN to the server's token")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        summary = asyncio.run(run_loop(
            args.url, args.token, args.diffs, args.feedback, data_dir=args.data_dir, base=args.base,
            interactive=args.interactive, max_steps=args.max_steps, learning_rate=args.learning_rate,
            max_tokens=args.max_tokens, min_win_rate=args.min_win_rate, log=log,
            extra_sft={"quantization": args.quantization or ("none" if args.base == "tiny-demo" else None)}))
    except (LoopError, ToolCallError) as exc:
        print(f"sdlc_agent: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
