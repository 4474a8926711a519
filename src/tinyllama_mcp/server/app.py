"""The MCP server: tools, the jobs://{job_id} resource with update notifications, the workflow prompt.

Wiring only: what the tools do lives in tools.py, what lives as long as the process (store, workers,
job watcher, subscribers) in runtime.py.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional

import anyio.to_thread
import mcp_types
from mcp.server import MCPServer, ServerRequestContext
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from pydantic import BaseModel, ConfigDict, ValidationError

from tinyllama_mcp.server import SERVER_NAME, __version__
from tinyllama_mcp.server import job_views
from tinyllama_mcp.server import tools as logic
from tinyllama_mcp.server import aliases as alias_tools, lineage_view
from tinyllama_mcp.server.alias_models import AliasesInput, AliasesOutput, AliasMoveOutput, PromoteInput, RollbackInput
from tinyllama_mcp.server import wait_tool
from tinyllama_mcp.server import export_tools
from tinyllama_mcp.server.export_models import ExportInput
from tinyllama_mcp.server import evaluation_tools
from tinyllama_mcp.server.evaluation_models import (
    CompareInput, CompareOutput, CompareResultsInput, CompareResultsOutput, EvaluateInput, EvaluateOutput,
    JudgeInput, JudgeOutput,
)
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.server.errors import describe_validation_error
from tinyllama_mcp.server.models import (
    CancelInput, CancelOutput, GenerateInput, GenerateOutput, MergeInput, StartDPOInput, StartJobOutput,
    StartSFTInput, StatusInput, StatusOutput,
)
from tinyllama_mcp.server.runtime import Runtime
from tinyllama_mcp.server.services import Services

INSTRUCTIONS = """\
Fine-tune and query a small local LLM (TinyLlama-1.1B by default; 'tiny-demo' is an embedded model that
trains on a CPU in seconds). Workflow: start_sft -> wait -> start_dpo(sft_job_id) -> merge(dpo_job_id)
-> generate(model=<merge job id or output_name>). start_* and merge only queue a job and return a job_id
at once; training runs in the background, one job per GPU. Datasets must be local files inside the server's
data folders (or hub names when online). promote(model, alias='production') names a model; generate and /v1
accept the alias, rollback(alias) moves it back. Read the prompt 'retrain_workflow' for the details."""

WORKFLOW = """\
Retrain the local model in four steps. Each start_* / merge call returns a job_id immediately; the job
runs in the background. Call wait(job_id=..., timeout_s=600) (it returns once the job has ended; call it
again while timed_out is true) instead of polling status, until state is 'succeeded', before relying on its
output. Give start_sft/start_dpo a validation_dataset (or eval_fraction) to see valid_loss (SFT) or
valid_reward_accuracy (DPO) at every checkpoint, full_valid_* at the end and the best_checkpoint.

1. Supervised fine-tuning: start_sft(dataset={sft_dataset!r}, base_model={base_model!r}).
   The dataset has a `messages` column of chat turns. The call checks the file first and reports rows
   and token lengths; fix what it reports before retrying.
2. Preference tuning: start_dpo(sft_job_id=<the SFT job id>, dataset={dpo_dataset!r}).
   The dataset has `chosen`/`rejected` answers (with `prompt`, or `system` + `input`). You may call it
   right after step 1: the DPO job waits until its SFT job succeeded.
   Watch metrics.reward_accuracy rise towards 1.0 in status.
3. Merge: merge(dpo_job_id=<the DPO job id>, output_name=<a name>). Produces a standalone checkpoint.
4. Use it: generate(model=<output_name or merge job id>, prompt=...). A finished SFT or DPO job id also
   works before merging (its adapter is applied on load).

If a job fails, status shows `error` and `log_tail`; 'failed after N attempts' means the worker retried.
cancel(job_id) stops a job. Hyperparameters are optional: the defaults are the reference recipe
(QLoRA NF4, LoRA r=64, lr 2e-4 for SFT; beta 0.1, lr 1e-5 for DPO)."""


class _RawArguments(ArgModelBase):
    """Hands the raw arguments to the tool, which validates them with its own model.

    The SDK would validate against a model it builds from a function signature; validating here with
    the published input model instead forbids unknown arguments and words errors for an agent.
    """

    model_config = ConfigDict(extra="allow")

    def model_dump_one_level(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


def _decode_json_strings(model: type[BaseModel], arguments: dict[str, Any]) -> dict[str, Any]:
    """Some hosts send list/object arguments as JSON text; decode those for non-string fields."""
    decoded = dict(arguments)
    for name, value in arguments.items():
        info = model.model_fields.get(name)
        if info is None or not isinstance(value, str) or info.annotation in (str, Optional[str]):
            continue
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            continue
        if isinstance(parsed, (list, dict)):
            decoded[name] = parsed
    return decoded


def make_tool(
    name: str, title: str, description: str, input_model: type[BaseModel], output_model: type[BaseModel],
    handler: Callable[..., Awaitable[BaseModel]], annotations: mcp_types.ToolAnnotations,
    wants_context: bool = False,
) -> Tool:
    """A tool validated by its own input model; `wants_context` passes the request context (for progress)."""
    async def call(ctx: Context, **arguments: Any) -> BaseModel:
        try:
            args = input_model.model_validate(_decode_json_strings(input_model, arguments))
        except ValidationError as exc:
            raise ToolError(
                f"invalid arguments: {describe_validation_error(exc)}. Fix them and call {name} again."
            ) from None
        try:
            return await (handler(args, ctx) if wants_context else handler(args))
        except UserError as exc:
            raise ToolError(str(exc)) from None

    return Tool(
        fn=call, name=name, title=title, description=description,
        parameters=input_model.model_json_schema(),
        fn_metadata=FuncMetadata(arg_model=_RawArguments, output_model=output_model),
        is_async=True, annotations=annotations, context_kwarg="ctx",
    )


def _annotations(*, read_only: bool, destructive: bool, idempotent: bool) -> mcp_types.ToolAnnotations:
    # open_world_hint=False: the tools act on this server's queue and models, not on outside systems.
    return mcp_types.ToolAnnotations(
        read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=False
    )


def _in_thread(function: Callable[[Services, Any], BaseModel], svc: Services):
    """Store and preflight work blocks (SQLite, file reads): keep it off the event loop."""

    async def handler(args: Any) -> BaseModel:
        return await anyio.to_thread.run_sync(function, svc, args)

    return handler


def _moving(function: Callable[..., BaseModel], svc: Services):
    """An alias move, off the event loop, recording which MCP client made it (as the client names itself)."""

    async def handler(args: Any, ctx: Context) -> BaseModel:
        params = ctx.session.client_params
        by = f"{params.client_info.name} {params.client_info.version}" if params is not None else None
        return await anyio.to_thread.run_sync(function, svc, args, by)

    return handler


def build_server(runtime: Runtime) -> MCPServer:
    svc = runtime.services
    server = MCPServer(
        SERVER_NAME, title="TinyLlama fine-tuning", version=__version__, instructions=INSTRUCTIONS,
        subscriptions=runtime.bus,
        tools=[
            make_tool(
                "start_sft", "Start supervised fine-tuning",
                "Queue a QLoRA supervised fine-tuning (SFT) job on chat data and return its job_id at once; "
                "nothing trains during this call. The dataset is checked first (path allowed, columns, rows, "
                "token lengths) and problems come back as errors. Hyperparameters are optional (defaults: the "
                "reference recipe). Next: wait(job_id) until 'succeeded', then start_dpo or merge.",
                StartSFTInput, StartJobOutput, _in_thread(logic.start_sft, svc),
                _annotations(read_only=False, destructive=False, idempotent=False),
            ),
            make_tool(
                "start_dpo", "Start DPO preference tuning",
                "Queue a DPO preference-tuning job on chosen/rejected pairs, on top of an SFT job (sft_job_id; it "
                "may still be running, DPO then waits) or straight on a base model. Returns the job_id at once. "
                "Next: wait(job_id) (watch reward_accuracy), then merge(dpo_job_id).",
                StartDPOInput, StartJobOutput, _in_thread(logic.start_dpo, svc),
                _annotations(read_only=False, destructive=False, idempotent=False),
            ),
            make_tool(
                "merge", "Merge adapters into a standalone model",
                "Queue a job that merges the SFT adapter (and the DPO adapter on top, if given) into the base "
                "model on a 16-bit base, writing a checkpoint that generate and plain transformers load. Give "
                "dpo_job_id alone and its SFT job is found. Returns the job_id at once.",
                MergeInput, StartJobOutput, _in_thread(logic.merge, svc),
                _annotations(read_only=False, destructive=False, idempotent=False),
            ),
            make_tool(
                "status", "Job status",
                "With job_id: the job's state (queued, running, succeeded, failed, cancelled), progress (step, "
                "total, percent), latest loss (DPO: reward accuracy and margin), tokens/s, ETA, attempts, "
                "artifact paths, error and the last log lines. Without: recent jobs, the queue and the workers.",
                StatusInput, StatusOutput, _in_thread(logic.status, svc),
                _annotations(read_only=True, destructive=False, idempotent=True),
            ),
            make_tool(
                "generate", "Generate text",
                "Answer a prompt (or a chat in messages) with a model: a merge job's id or output_name, a finished "
                "SFT/DPO job (adapter applied on load), 'tiny-demo', a hub id or a local folder; default the "
                "configured model, else the newest merged model. Returns text, usage and latency. The first call "
                "for a model loads it (seconds); later calls reuse it, and concurrent calls are batched. Send a "
                "progress token to receive the partial text as progress notifications while it generates.",
                GenerateInput, GenerateOutput, lambda args, ctx: logic.generate(svc, args, ctx.report_progress),
                _annotations(read_only=True, destructive=False, idempotent=False), wants_context=True,
            ),
            make_tool(
                "cancel", "Cancel a job",
                "Cancel a job: a queued job leaves the queue; a running job's processes are stopped (its "
                "checkpoints stay on disk). Finished jobs cannot be cancelled.",
                CancelInput, CancelOutput, _in_thread(logic.cancel, svc),
                _annotations(read_only=False, destructive=True, idempotent=True),
            ),
            make_tool(
                "promote", "Point an alias at a model",
                "Move an alias (e.g. 'production', 'candidate'; made if new) to a servable model: a succeeded "
                "SFT/DPO/merge job by id or output_name, 'tiny-demo', or another alias's target. generate, /v1 and "
                "the huggingface provider then accept the alias as model. Every move is kept in the alias history.",
                PromoteInput, AliasMoveOutput, _moving(alias_tools.promote, svc),
                _annotations(read_only=False, destructive=False, idempotent=False), wants_context=True,
            ),
            make_tool(
                "rollback", "Move an alias back",
                "Move an alias back to the target it had before its current one (repeat to go further back); the "
                "rollback is itself recorded in the alias history. Errors when the alias has no earlier target.",
                RollbackInput, AliasMoveOutput, _moving(alias_tools.rollback, svc),
                _annotations(read_only=False, destructive=False, idempotent=False), wants_context=True,
            ),
            make_tool(
                "aliases", "List aliases",
                "Every alias (or one) with its target, whether that target can be served, where rollback would move "
                "it, and its latest moves. models:// lists the models with their aliases, metrics and lineage.",
                AliasesInput, AliasesOutput, _in_thread(alias_tools.aliases, svc),
                _annotations(read_only=True, destructive=False, idempotent=True),
            ),
            make_tool(
                "wait", "Wait for a job", wait_tool.DESCRIPTION, wait_tool.WaitInput, wait_tool.WaitOutput,
                lambda args, ctx: wait_tool.wait(svc, runtime.bus, args, ctx.report_progress),
                _annotations(read_only=True, destructive=False, idempotent=True), wants_context=True,
            ),
            make_tool(
                "export", "Export a model for llama.cpp, Ollama or vLLM",
                "Queue a job that writes a model (a merge job, a finished SFT/DPO job's adapter, 'tiny-demo' or a "
                "local folder) as GGUF (f16, bf16, q8_0) for llama.cpp/Ollama, a GGUF LoRA, an Ollama Modelfile, a "
                "PEFT adapter for vLLM and a merged safetensors checkpoint. Every file is read back and compared with "
                "the source model (logits, token ids) before the job succeeds; status then lists each file with its "
                "sha256 and check figures. Returns the job_id at once.",
                ExportInput, StartJobOutput, _in_thread(export_tools.export, svc),
                _annotations(read_only=False, destructive=False, idempotent=False),
            ),
            make_tool(
                "evaluate", "Evaluate a model",
                "Queue a job that measures one model (a finished SFT/DPO job, a merge job, its output_name, "
                "'tiny-demo', a hub id or a local folder) on held-out data and return its job_id at once: chat_dataset "
                "-> chat_loss, chat_perplexity, chat_token_accuracy (assistant tokens); preference_dataset -> "
                "preference_accuracy, preference_margin; prompts -> greedy answers; lm_eval_tasks -> lm-evaluation-"
                "harness scores from local task files in lm_eval_task_dir. Datasets are checked first. Next: poll "
                "status(job_id) until 'succeeded'; its evaluation field holds the metrics.",
                EvaluateInput, EvaluateOutput, _in_thread(evaluation_tools.evaluate, svc),
                _annotations(read_only=False, destructive=False, idempotent=False),
            ),
            make_tool(
                "compare", "Compare models",
                "Evaluate two or more models on the same inputs (as evaluate; an earlier identical evaluation of a "
                "model is reused) and record a comparison; returns its comparison_id and the evaluate job ids at "
                "once. The first model is the baseline: with more than two, each other model is paired with it. "
                "Give prompts to get blinded answer pairs to judge. Next: compare_results(comparison_id).",
                CompareInput, CompareOutput, _in_thread(evaluation_tools.compare, svc),
                _annotations(read_only=False, destructive=False, idempotent=False),
            ),
            make_tool(
                "compare_results", "Comparison results",
                "A comparison's state ('pending' while its jobs run); once 'ready': the metric table, one row per "
                "model, and for each prompt the two answers as a blinded pair (A and B in random order, pairs "
                "shuffled, models not named). Read the pairs and decide which answer is better without guessing "
                "the models. Next: judge(comparison_id, verdicts).",
                CompareResultsInput, CompareResultsOutput, _in_thread(evaluation_tools.compare_results, svc),
                _annotations(read_only=True, destructive=False, idempotent=True),
            ),
            make_tool(
                "judge", "Judge blinded answer pairs",
                "Record your verdicts on a comparison's blinded pairs ({pair_id, winner: 'A', 'B' or 'tie'}); "
                "judging a pair again replaces its verdict. Returns each model's win rate over the judged pairs "
                "(ties count half) and, for the judged pairs only, which model wrote A and B.",
                JudgeInput, JudgeOutput, _in_thread(evaluation_tools.judge, svc),
                _annotations(read_only=False, destructive=True, idempotent=True),
            ),
        ],
    )

    @server.resource(
        "jobs://{job_id}", name="job", title="Training job", mime_type="application/json",
        description="A job's status as JSON (what status(job_id) returns). Subscribe to be told when it changes.",
    )
    async def job_resource(job_id: str) -> str:
        try:
            return await anyio.to_thread.run_sync(job_views.job_json, svc, job_id)
        except UserError as exc:
            raise ResourceNotFoundError(str(exc)) from None

    @server.resource(
        "models://", name="models", title="Models", mime_type="application/json",
        description="Every servable model with the aliases pointing at it, its newest evaluation metrics and its "
        "lineage summary, and every alias with its target. Subscribe to be told when jobs or aliases change.",
    )
    async def models_resource() -> str:
        overview = await anyio.to_thread.run_sync(lineage_view.models_overview, svc)
        return json.dumps(overview, indent=2)

    @server.resource(
        "models://{ref}", name="model", title="Model lineage", mime_type="application/json",
        description="One model's lineage (ref: a job id, output_name, alias or 'tiny-demo'): dataset sha256 -> SFT -> "
        "DPO -> merge -> evaluations -> export files' sha256 -> alias history.",
    )
    async def model_resource(ref: str) -> str:
        try:
            found = await anyio.to_thread.run_sync(lineage_view.model_lineage, svc, ref)
        except UserError as exc:
            raise ResourceNotFoundError(str(exc)) from None
        return json.dumps(found.model_dump(mode="json"), indent=2)

    @server.prompt(name="retrain_workflow", title="Retrain the local model",
                   description="How to run SFT -> DPO -> merge -> generate with this server's tools.")
    def retrain_workflow(sft_dataset: str = "<path to chat .jsonl>", dpo_dataset: str = "<path to pairs .jsonl>",
                         base_model: str = "tiny-demo") -> str:
        return WORKFLOW.format(sft_dataset=sft_dataset, dpo_dataset=dpo_dataset, base_model=base_model)

    # Clients on protocol versions up to 2025-11-25 subscribe with resources/subscribe and expect
    # notifications/resources/updated on their session; MCPServer serves only the newer
    # subscriptions/listen (fed by runtime.bus), so the older pair is registered here.
    async def subscribe(ctx: ServerRequestContext, params: mcp_types.SubscribeRequestParams) -> mcp_types.EmptyResult:
        runtime.subscribe(str(params.uri), ctx.session)
        return mcp_types.EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext, params: mcp_types.UnsubscribeRequestParams) -> mcp_types.EmptyResult:
        runtime.unsubscribe(str(params.uri), ctx.session)
        return mcp_types.EmptyResult()

    lowlevel = server._lowlevel_server  # no public hook for these two legacy methods in MCPServer
    lowlevel.add_request_handler("resources/subscribe", mcp_types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", mcp_types.UnsubscribeRequestParams, unsubscribe)
    return server
