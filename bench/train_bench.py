"""SFT and DPO throughput side by side, in one process on one CUDA card (issue 4).

    python -m bench.train_bench --out OUT_DIR [--seconds 15] [--budget-s 330] [--runs c,c-x] [--repeat 2]
                                [--profile [--profile-runs c,c-x] [--profile-after N] [--trace]]
                                [--unsloth-site DIR] [--full-rows]
    python -m bench.train_bench --out OUT_DIR --smoke        # CPU, tiny-demo, < 2 minutes

Model: TinyLlama-1.1B-shaped, random weights (bench.synthetic), NF4 + LoRA r64 on the 7 projections.
Data: synthetic chat rows, ~100 to ~2,300 tokens (log-uniform); DPO pairs with prompt and answers of
~50 to ~500 tokens each (--full-rows: SFT rows all past max_length, DPO prompts and answers of about half of it,
every sequence filling it: the shape of PERF_NOTES' Unsloth figures). Runs, per stage:
  a  the reference recipe as docs/ai states it: plain TRL defaults, batch 2 x accumulation 4, length 512,
     gradient checkpointing, paged_adamw_32bit (SFT lr 2e-4 cosine; DPO lr 1e-5, warmup 0.1, 200 steps).
  b  the tuned-batch HF baseline: plain TRL, batch 8 x 2048 (DPO 8 x 1024), no accumulation, checkpointing.
  c  the project's stage (recipe.sft.run_sft / recipe.dpo.run_dpo in-process) at b's shape, its defaults
     (sequences packed into one row with varlen attention, each decoder layer one compiled function, NF4
     weights dequantized once, gradient checkpointing only when memory needs it, fused AdamW; the recipe's steps),
     torch_compile forced on (its 'auto' leaves runs this short eager: see stage_training), cuda_graphs 'auto'
     (off at this run size; on for SFT with --full-rows, whose rows pack to one width).
  unsloth (SFT, DPO), unsloth-padded (SFT)  with --unsloth-site DIR: Unsloth on the same model, rows, shape and meter,
     in a process of its own with DIR's packages (bench.unsloth_bench; padded: its padded rows instead of
     padding-free batches); its peak memory is its own process's.
  c-warmup  c run once first, not compared: it takes the compiles of the first project run (its
     first_step_s shows what they cost; DPO's packed shapes add a recompile of the layer graph).
  c-graphs-warmup  c-graphs run once first, not compared: the compiles of the layers for CUDA graphs (inductor's
     options differ, so c-warmup does not take them) and of the loss.
  c-eager  c with torch_compile=false: HF's eager layers, one autograd function per LoRA projection or group,
     Liger's RoPE (the default before round 11).
  c-graphs  c with cuda_graphs=true: the compiled layers replayed as CUDA graphs, packed widths padded to a multiple
     of --width-multiple (its 'auto' leaves runs this short without: each width's recording costs seconds, so a
     short run shows mostly recordings; tokens_per_s_late, the run's second half, shows the replay rate).
  c-graphs-syncs (SFT)  c-graphs with sync_free_step=false: TRL's loss and metrics, read on the host every step
     (before round 14).
  c-graphs-workers (SFT)  c-graphs with dataloader_workers=2 (round 14's measurement; 'auto' now gives c-graphs them).
  c-graphs-quiet (SFT)  c-graphs logging every 1,000 steps: what a step without the log's reads would run.
  c-graphs-logsync (SFT)  c-graphs with each step's log read at once (Plan.log_one_step_late off; before round 15).
  c-graphs-inductor-rng (SFT)  c-graphs with the LoRA dropout drawn by inductor's fused kernels
     (Plan.aten_random off; before round 15).
  c-graphs-round14 (SFT)  both of the above: c-graphs as round 14 left it.
  c-graphs-addmm-copy (SFT)  c-graphs with each LoRA term summed by torch.addmm, which copies the base GEMM's output
     first (Plan.lora_sum_in_place off; before round 16).
  c-graphs-eager-loss (SFT)  c-graphs with the loss's chunks eager (Plan.compile_loss off; before round 16).
  c-graphs-width-bound (SFT)  c-graphs with varlen attention's max_length the packed width (Plan.graph_attention_bound
     off; before round 16).
  c-graphs-round15 (SFT, DPO)  the three above (DPO: the first and the last): c-graphs as round 15 left it.
  c-syncfree (SFT)  c with sync_free_step=true, without graphs.
  c-noworkers  c with dataloader_workers=0: batches collated in the training process, between steps (before
     round 13).
  c-unshared (DPO)  c with share_prompt=false: each pair's prompt computed twice, in its chosen and its rejected
     row (before round 13).
  c-inline (DPO)  c with precompute_ref_log_probs=false: the reference forward inside every step (before round 13;
     c's 'auto' precomputes, as its 200 steps train every one of the 1,200 pairs).
  c-refeager (DPO)  c-inline with DPO's reference pass through HF's eager layers (before round 12: the compiled
     layers served the policy's forward only).
  c-nf4 (SFT)  c with dequantized_base=false (bitsandbytes dequantizes the NF4 weights in every call).
  c-peft (SFT)  c with fused_lora=false (peft's own LoRA modules instead of one autograd function a projection).
  c-liger-all (SFT)  c with use_liger_kernel=true: Liger's SwiGLU and RMSNorm as well as its RoPE (the default
     before round 10).
  c-masked (SFT)  c with varlen_attention=false (rows of max_length under a block-diagonal mask through sdpa).
  c-padded (DPO)  c with varlen_attention=false (TRL's rows padded to the longest, attention mask dropped).
  c-paged (SFT)  c with fused_optimizer=false (the recipe's paged bitsandbytes AdamW instead of torch's fused one).
  c-steps (SFT)  c with tokens_per_step='auto' (~24k real tokens an optimizer step: fewer, larger steps, so its
     loss at equal tokens is not the recipe's; shown for the speed alone).
  c-lowmem (SFT)  c in the memory-saving mode: gradient_checkpointing=true, activation_offloading=true
     (which keeps the paged optimizer; torch_compile 'auto', so eager layers under checkpointing).
Each run is time-bounded: it stops after --seconds of training and at least 6 steps (within 4 x --seconds;
the schedule is the nominal run's, so the learning rate is what the full run would use at those steps).
Reported: real (non-pad) tokens/s over the steps after the first two, over their second half (late), and over
those of them that took at most 3x the median step (replay: a run with CUDA graphs without its recording steps);
a DPO run that precomputed its reference log-probs is charged their seconds per pair for the pairs those steps
train (tokens_per_s_steps leaves them out). Also peak GPU memory (torch allocator; paged optimizer states live
in managed memory and are not counted), loss around the same token count for
all runs of a stage but a (whose rows are cut to 512 tokens), ratios c/a and c/b, the card, and each c run against
c-graphs (else c) over the steps both replayed (`paired`: the same steps pack the same rows, so this is the fairest
comparison of two runs of a process). Writes OUT_DIR/train_bench.json (after every run, so a call cut short keeps
what ran) and prints a table. The timer never waits for the GPU inside a run: a step's end is a CUDA event, read
after the run (StepClock).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 2
MIN_STEPS = WARMUP_STEPS + 4  # steps a run takes at least, so its rate is measured past the warm-up


# ---------------------------------------------------------------- measuring


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Seconds from start() to each mark(), without making the host wait for the GPU at a mark.

    On CUDA a mark is an event recorded behind the work queued so far, read only at the end: timing a step by
    synchronizing would drain the GPU's queue every step, and a step that keeps the GPU busy without host reads
    (`sync_free_step` with CUDA graphs) would then idle while the host prepares the next one, a cost the stage
    does not pay on its own. On a CPU a mark is the host's clock.
    """

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.marks: list = []
        self.t0 = 0.0
        self.origin = None

    def start(self) -> None:
        import torch

        _sync()
        self.t0 = time.perf_counter()
        self.marks = []
        if self.cuda:
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()

    def host_seconds(self) -> float:
        return time.perf_counter() - self.t0

    def mark(self) -> int:
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(self.host_seconds())
        return len(self.marks) - 1

    def seconds(self) -> list[float]:
        """Every mark's seconds from start() (waits for the GPU to pass the last mark)."""
        if not self.cuda:
            return list(self.marks)
        if self.marks:
            self.marks[-1].synchronize()
        return [self.origin.elapsed_time(event) / 1000 for event in self.marks]


def make_meter(seconds: float, max_steps: Optional[int] = None):
    """A TrainerCallback recording (time, real tokens, loss) per optimizer step and stopping after `seconds`.

    A run with slow steps (the reference recipe's) goes on to MIN_STEPS steps, so its rate is measured after the
    warm-up steps too, within 4 x `seconds`.
    """
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.marked: list[dict] = []  # per step: its number, real tokens so far, its clock mark
            self.clock = StepClock()
            self.losses: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.marked.append({"step": state.global_step, "tokens": int(state.num_input_tokens_seen),
                                "mark": self.clock.mark()})
            elapsed = self.clock.host_seconds()  # the host runs at most a few steps ahead of the GPU
            done = elapsed >= seconds and len(self.marked) >= MIN_STEPS
            if done or elapsed >= 4 * seconds or (max_steps and len(self.marked) >= max_steps):
                control.should_training_stop = True

        @property
        def points(self) -> list[dict]:
            """Per step: its number, the seconds from the start of training to its end, real tokens so far."""
            times = self.clock.seconds()
            return [{"step": m["step"], "t": times[m["mark"]], "tokens": m["tokens"]} for m in self.marked]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

        def result(self, charge_per_step: float = 0.0) -> dict:
            """`charge_per_step`: seconds of work done before training on each step's behalf (DPO's precomputed
            reference log-probs), added to every measured step so the rates include it."""
            pts = self.points
            out: dict[str, Any] = {"steps": len(pts), "tokens": pts[-1]["tokens"] if pts else 0,
                                   "train_s": round(pts[-1]["t"], 2) if pts else 0.0,
                                   "first_step_s": round(pts[0]["t"], 2) if pts else None}

            def rate(i: int) -> float:
                first, last = pts[i], pts[-1]
                seconds = last["t"] - first["t"] + (len(pts) - 1 - i) * charge_per_step
                return round((last["tokens"] - first["tokens"]) / seconds, 1)

            if len(pts) > WARMUP_STEPS + 1:
                out["tokens_per_s"] = rate(WARMUP_STEPS - 1)
                out["tokens_per_s_replay"] = replay_rate(pts[WARMUP_STEPS - 1:], charge_per_step)
                # The second half alone: past what a run's first steps of each shape pay (CUDA graph recordings).
                mid = max(WARMUP_STEPS - 1, len(pts) // 2)
                if pts[-1]["t"] > pts[mid]["t"]:
                    out["tokens_per_s_late"] = rate(mid)
            elif pts:
                out["tokens_per_s"] = round(pts[-1]["tokens"] / max(pts[-1]["t"], 1e-9), 1)
                out["note"] = "too few steps to skip warm-up"
            out["curve"] = [{"step": p["step"], "t": round(p["t"], 3), "tokens": p["tokens"],
                             "loss": self.losses.get(p["step"])} for p in pts]
            return out

    return Meter()


def replayed_steps(points: list[dict]) -> dict[int, tuple[float, int]]:
    """Each step's (seconds, real tokens), keyed by its step number (else its position), for the steps that took at
    most 3x the run's median step: a run with CUDA graphs without its recording steps (25-50x a replayed one)."""
    steps = {b.get("step", i): (b["t"] - a["t"], b["tokens"] - a["tokens"])
             for i, (a, b) in enumerate(zip(points, points[1:]), start=1)}
    if not steps:
        return {}
    limit = 3 * statistics.median(seconds for seconds, _ in steps.values())
    return {k: v for k, v in steps.items() if v[0] <= limit}


def replay_rate(points: list[dict], charge_per_step: float = 0.0) -> Optional[float]:
    """Real tokens/s over the replayed steps: what a long run converges to once each packed width's CUDA graphs
    are recorded (a run without graphs has no recording steps, and this is then about its whole rate)."""
    kept = replayed_steps(points).values()
    if not kept:
        return None
    return round(sum(tokens for _, tokens in kept) / sum(seconds + charge_per_step for seconds, _ in kept), 1)


def paired_rates(curve: list[dict], reference: list[dict]) -> Optional[dict]:
    """Two runs' real tokens/s over the same steps: those that both replayed.

    Runs of one process start from the same data order, so step k packs the same rows in both: comparing them
    over the same steps takes out the difference in which steps each run's recordings fell on, which moves a short
    run's replay rate by several percent."""
    mine, theirs = replayed_steps(curve), replayed_steps(reference)
    common = [k for k in mine if k in theirs]
    if not common:
        return None
    tokens = sum(mine[k][1] for k in common)
    rate, reference_rate = (tokens / sum(run[k][0] for k in common) for run in (mine, theirs))
    return {"steps": len(common), "tokens_per_s": round(rate, 1), "reference_tokens_per_s": round(reference_rate, 1),
            "ratio": round(rate / reference_rate, 3)}


def loss_at(curve: list[dict], tokens: int, window: int = 3) -> Optional[float]:
    """Mean logged loss of the last `window` steps up to the first step that reaches `tokens`."""
    upto = []
    for p in curve:
        if p["loss"] is not None:
            upto.append(p["loss"])
        if p["tokens"] >= tokens:
            break
    return round(sum(upto[-window:]) / len(upto[-window:]), 4) if upto else None


def peak_gib() -> Optional[float]:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- the runs


def lora():
    from peft import LoraConfig

    from tinyllama_mcp.pipeline.specs import LLAMA_PROJECTIONS

    return LoraConfig(r=64, lora_alpha=32, lora_dropout=0.1, bias="none", target_modules=list(LLAMA_PROJECTIONS),
                      task_type="CAUSAL_LM")


def hf_common(cfg, out: Path, *, batch: int, accumulation: int) -> dict:
    import torch

    from tinyllama_mcp.pipeline import modeling

    dtype = modeling.compute_dtype(cfg.dtype)
    return dict(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                optim="paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch", bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=42,
                include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)


def hf_model(cfg):
    """The plain-TRL baselines' start: the recipe's NF4 base, its tokenizer, the seed, a meter."""
    from transformers import set_seed

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    tokenizer = modeling.load_tokenizer(cfg.base)
    model = modeling.load_base(cfg.base, QuantSpec(compute_dtype=cfg.dtype), modeling.compute_dtype(cfg.dtype))
    set_seed(42)
    return tokenizer, model, make_meter(cfg.seconds)


def run_hf_sft(cfg, rows: list[dict], out: Path, *, batch: int, accumulation: int, max_length: int) -> dict:
    """Plain TRL SFTTrainer: the recipe's QLoRA model and TRL's defaults otherwise."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, model, meter = hf_model(cfg)
    args = SFTConfig(**hf_common(cfg, out, batch=batch, accumulation=accumulation), learning_rate=2e-4,
                     lr_scheduler_type="cosine", num_train_epochs=1, max_length=max_length)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora(), callbacks=[meter])
    trainer.train()
    return meter.result()


def run_hf_dpo(cfg, pairs: list[dict], out: Path, *, batch: int, accumulation: int, max_length: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tinyllama_mcp.pipeline.recipe.dpo import to_text_pairs

    tokenizer, model, meter = hf_model(cfg)
    args = DPOConfig(**hf_common(cfg, out, batch=batch, accumulation=accumulation), learning_rate=1e-5,
                     lr_scheduler_type="cosine", warmup_steps=0.1, max_steps=200, beta=0.1, max_length=max_length,
                     truncation_mode="keep_start")
    trainer = DPOTrainer(model=model, ref_model=None, args=args,
                         train_dataset=Dataset.from_list(to_text_pairs(pairs, tokenizer, max_length)),
                         processing_class=tokenizer, peft_config=lora(), callbacks=[meter])
    trainer.train()
    return meter.result()


def run_unsloth(cfg, stage: str, padded: bool = False) -> dict:
    """Unsloth's run of `stage` (bench.unsloth_bench) in a process of its own, with cfg.unsloth_site first on its
    path in place of this process's (Unsloth pins older transformers and trl): the same model, data, shape and meter;
    its peak memory is its own process's."""
    out = cfg.work / f"unsloth_{stage}{'_padded' if padded else ''}_result"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "bench.unsloth_bench", "--out", str(out), "--work", str(cfg.work),
               "--seconds", str(cfg.seconds), "--only", stage]
    command += [flag for flag, on in (("--smoke", cfg.smoke), ("--full-rows", cfg.full_rows), ("--padded", padded)) if on]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cfg.unsloth_site), str(REPO), str(REPO / "src")]))
    finished = subprocess.run(command, env=env, cwd=REPO)
    written = out / "unsloth_bench.json"
    if not written.exists():
        raise RuntimeError(f"bench.unsloth_bench exited with {finished.returncode} before writing {written}")
    report = json.loads(written.read_text())
    result = report[stage]
    if "error" in result:
        raise RuntimeError(f"Unsloth's {stage} run: {result['error']}")
    return dict(result, versions=report["versions"])


def fresh_dir(out: Path) -> Path:
    """An empty run folder: a stage finds a finished run's checkpoints in its folder and would train 0 steps."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def stage_training(stage: str, max_length: int) -> dict:
    """The c runs' training fields: b's shape (8 sequences a step, no accumulation), the recipe's schedule.

    torch_compile is forced on: 'auto' compiles runs of 3M real tokens or more (where the compile pays back), and
    the bench's nominal runs (2,400 rows; 200 DPO steps) are ~1.5M; the bench measures the steady-state rate.
    """
    shape = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, max_length=max_length,
                 torch_compile=True)
    if stage == "sft":
        return dict(shape, learning_rate=2e-4, num_train_epochs=1)
    return dict(shape, learning_rate=1e-5, max_steps=200, warmup_ratio=0.1)


def call_stage(cfg, stage: str, data_path: Path, out: Path, training: dict, callbacks: list,
               overrides: Optional[dict] = None) -> None:
    """The project's stage function (recipe.sft.run_sft / recipe.dpo.run_dpo) in-process, in a fresh `out`, with
    `callbacks` beside the stage's own TrainerCallbacks and `overrides` (Plan fields: the lever parts without a spec
    field, and --width-multiple)."""
    from tinyllama_mcp.pipeline.events import EventLog
    from tinyllama_mcp.pipeline.recipe.dpo import run_dpo
    from tinyllama_mcp.pipeline.recipe.sft import run_sft
    from tinyllama_mcp.pipeline.specs import DPOSpec, SFTSpec

    fresh_dir(out)
    common = dict(base_model=cfg.base, dataset={"source": str(data_path)}, quant={"compute_dtype": cfg.dtype},
                  eval_prompts={"prompts": [], "max_new_tokens": 1})
    training = dict(training, save_steps=10_000_000)
    spec = SFTSpec(**common, training=training) if stage == "sft" else DPOSpec(**common, training=training)
    if getattr(cfg, "width_multiple", None):
        overrides = dict(overrides or {}, graph_width_multiple=cfg.width_multiple)
    log = EventLog(out / "events.jsonl")
    try:
        (run_sft if stage == "sft" else run_dpo)(spec, out, log, callbacks=callbacks, overrides=overrides)
    finally:
        log.close()


def run_stage(cfg, stage: str, data_path: Path, out: Path, training: dict, overrides: Optional[dict] = None,
              callbacks: tuple = ()) -> dict:
    """The project's stage, measured by the meter."""
    from tinyllama_mcp.pipeline.events import read_events

    meter = make_meter(cfg.seconds)
    call_stage(cfg, stage, data_path, out, training, [meter, *callbacks], overrides)
    start = next((e for e in read_events(out / "events.jsonl") if e["event"] == "start"), {})
    reference = start.get("reference_logps")  # DPO's reference log-probs, precomputed before the first step
    if reference and reference.get("rows"):
        # Its cost per pair, charged to every step for the pairs it trains: the rates are the whole run's.
        charge = reference["seconds"] / reference["rows"] * start["levers"]["sequences_per_step"]
        result = dict(meter.result(charge), reference_logps=reference,
                      tokens_per_s_steps=meter.result().get("tokens_per_s"))
    else:
        result = meter.result()
    result["levers"] = start.get("levers")
    if "torch._dynamo" in sys.modules:  # inductor's count of graphs it left out of CUDA graphs, with its log's reasons
        result["cudagraph_skips"] = sys.modules["torch._dynamo"].utils.counters["inductor"].get("cudagraph_skips", 0)
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    manager = trees.get_manager(0, create_if_none_exists=False) if trees else None
    if manager is not None:  # CUDA graphs recorded and warm-up runs so far in this process (ids count up)
        result["cuda_graphs_recorded"] = next(manager.graph_counter)
        result["cuda_graph_warmups"] = -next(manager.warmup_node_counter) - 1
    return result


def compared(name: str) -> bool:
    """A project run whose rate is compared (c and its lever runs; not the warm-up runs)."""
    return name.startswith("c") and not name.endswith("-warmup")


# Parts of levers without a spec field of their own, switched off (Plan fields) to measure what each buys.
EAGER_REFERENCE = {"compile_reference_pass": False}  # DPO's reference through HF's eager layers
ADDMM_COPY = {"lora_sum_in_place": False}  # LoRA summed by addmm (copies x W^T first)
WIDTH_BOUND = {"graph_attention_bound": False}  # graphs' attention bounded by the packed width
LOG_AT_ONCE = {"log_one_step_late": False}  # each step's log read at once
INDUCTOR_RNG = {"aten_random": False}  # the LoRA dropout drawn inside inductor's kernels
EAGER_LOSS = {"compile_loss": False}  # the sync-free loss's chunks eager


def guarded(name: str, fn, results: dict, fallback=None) -> None:
    """Run one measurement; record its error instead of stopping the bench; try `fallback` if given."""
    reset_memory()
    t0 = time.time()
    try:
        r = fn()
    except Exception as exc:
        traceback.print_exc()
        r = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
        if fallback is not None:
            print(f"[bench] {name} failed ({r['error']}); retrying with its fallback", file=sys.stderr, flush=True)
            reset_memory()
            try:
                r = {**fallback(), "first_error": r["error"], "fallback": True}
            except Exception as exc2:
                traceback.print_exc()
                r["fallback_error"] = f"{type(exc2).__name__}: {exc2}"
    r.setdefault("peak_gib", peak_gib())  # a run in its own process (unsloth) measured its own
    r["wall_s"] = round(time.time() - t0, 1)
    results[name] = r
    print(f"[bench] {name}: {json.dumps({k: v for k, v in r.items() if k != 'curve'})}", flush=True)


# ---------------------------------------------------------------- profile


def profile_stage(cfg, stage: str, data_path: Path, out: Path, training: dict, steps: int = 3,
                  trace: Optional[Path] = None, overrides: Optional[dict] = None) -> str:
    """Where a step of the project's SFT or DPO stage goes, in three phases of `steps` steps after
    cfg.profile_after steps (past the CUDA graphs' recordings, for a run with them):
    plain (wall time per step), torch.profiler (top ops by device time and by self CPU time), and cProfile
    (the Python functions: a CPU-bound step shows here where its launch time is spent). `trace`: also write the
    torch.profiler phase's Chrome trace there."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, record_shapes=False)
    py_prof = cProfile.Profile()
    phases = ["plain", "torch", "cprofile"]
    state = {"phase": None, "n": 0, "t0": 0.0, "plain_ms": None}

    def begin(phase: str) -> None:
        _sync()
        state.update(phase=phase, n=0, t0=time.perf_counter())
        if phase == "torch":
            prof.__enter__()
        elif phase == "cprofile":
            py_prof.enable()

    def end(phase: str) -> None:
        _sync()
        if phase == "plain":
            state["plain_ms"] = (time.perf_counter() - state["t0"]) * 1000 / steps
        elif phase == "torch":
            prof.__exit__(None, None, None)
            if trace is not None:  # for bench.gpu_gaps: where the GPU waits in the step
                prof.export_chrome_trace(str(trace))
        else:
            py_prof.disable()

    class Prof(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            if st.global_step == cfg.profile_after and state["phase"] is None:
                begin("plain")

        def on_step_end(self, args, st, control, **kwargs):
            phase = state["phase"]
            if phase in phases:
                state["n"] += 1
                if state["n"] >= steps:
                    end(phase)
                    following = phases[phases.index(phase) + 1:]
                    if following:
                        begin(following[0])
                    else:
                        state["phase"] = "done"
                        control.should_training_stop = True

    call_stage(cfg, stage, data_path, out, training, [Prof()], overrides)
    stopped_in = state["phase"]
    sections = [f"{steps} steps per phase of the project's {stage.upper()} stage"]
    if stopped_in in phases:  # the data ran out first: report what ran
        end(stopped_in)
        sections[0] += f" (the data ran out in phase {stopped_in}: that phase has fewer steps)"
    if state["plain_ms"] is not None:
        sections[0] += f"; without a profiler: {state['plain_ms']:.1f} ms per step"
    ran = phases if stopped_in == "done" else phases[: phases.index(stopped_in) + 1] if stopped_in in phases else []
    sort_keys = ("self_device_time_total", "self_cpu_time_total") if torch.cuda.is_available() else ("self_cpu_time_total",)
    for key in sort_keys if "torch" in ran else ():
        sections.append(f"torch.profiler, top ops by {key}:\n"
                        f"{prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)}")
    for key in ("tottime", "cumulative") if "cprofile" in ran else ():
        text = io.StringIO()
        pstats.Stats(py_prof, stream=text).sort_stats(key).print_stats(35)
        sections.append(f"cProfile, top Python functions by {key}:\n{text.getvalue()}")
    if "cprofile" in ran:  # who walks the module tree every step (named_modules showed ~200k calls in 3 steps)
        text = io.StringIO()
        pstats.Stats(py_prof, stream=text).print_callers(r"_named_members|\(train\)")
        sections.append(f"cProfile, callers of the module-tree walks:\n{text.getvalue()}")
    return "\n\n".join(sections)


# ---------------------------------------------------------------- main


def table(results: dict, card: str) -> str:
    lines = [f"card: {card}", f"{'run':14} {'tok/s':>9} {'late':>7} {'replay':>7} {'peak GiB':>8} {'steps':>5} {'tokens':>9} "
             f"{'loss@T':>8} {'wall s':>6}  note"]
    for stage in ("sft", "dpo"):
        runs = results.get(stage, {})
        for name, r in runs.get("runs", {}).items():
            note = r.get("error", "") or ("fallback: " + r.get("first_error", "") if r.get("fallback") else "")
            lines.append(f"{stage + ' ' + name:14} {r.get('tokens_per_s', 0) or 0:9.0f} "
                         f"{r.get('tokens_per_s_late', 0) or 0:7.0f} {r.get('tokens_per_s_replay', 0) or 0:7.0f} "
                         f"{r.get('peak_gib') or 0:8.2f} "
                         f"{r.get('steps', 0):5d} {r.get('tokens', 0):9d} {r.get('loss_at_T') or float('nan'):8.4f} "
                         f"{r.get('wall_s', 0):6.1f}  {note}")
        paired = runs.get("paired") or {}
        for name, p in paired.get("runs", {}).items():
            lines.append(f"{stage} paired: {name} {p['tokens_per_s']:.0f} vs {paired['reference']} "
                         f"{p['reference_tokens_per_s']:.0f} tok/s over {p['steps']} steps both replayed: "
                         f"{p['ratio']:.3f}x")
        if runs.get("ratios"):
            lines.append(f"{stage} ratios: {runs['ratios']}  (loss@T: T = {runs.get('loss_tokens')} tokens)")
    return "\n".join(lines)


def prepare_inputs(cfg) -> dict:
    """The model and data of every run: sets cfg.base, cfg.dtype and cfg.seconds' default; writes the data files
    into cfg.work (the same seeds every time, so bench.unsloth_bench, in its own process, trains on the same rows).
    Returns the data files' paths and the stages' lengths (SFT rows, DPO pairs, run a's rows)."""
    from bench.synthetic import build_tinyllama_shaped, dpo_rows, sft_rows, write_jsonl

    cfg.work.mkdir(parents=True, exist_ok=True)
    if cfg.smoke:
        from tinyllama_mcp.pipeline.modeling import resolve_model

        cfg.seconds = cfg.seconds or 4
        cfg.base, cfg.dtype = resolve_model("tiny-demo"), "auto"
        n_sft, n_dpo = 64, 48
        lengths = dict(sft_len=256, dpo_len=256, short_len=128)
        sft_words, dpo_words = (30, 150), (10, 60)
    else:
        cfg.seconds = cfg.seconds or 15
        cfg.base, cfg.dtype = str(build_tinyllama_shaped(cfg.work / "tinyllama-shaped")), "auto"
        n_sft, n_dpo = 2400, 1200
        lengths = dict(sft_len=2048, dpo_len=1024, short_len=512)
        sft_words, dpo_words = (60, 1400), (30, 300)  # ~1.67 tokens a word: ~100-2,300 and ~50-500 tokens
    if cfg.full_rows:  # rows past max_length, cut to it: 8 x max_length real tokens a step (DPO: ~half each part)
        sft_words = (int(lengths["sft_len"] / 1.5), int(lengths["sft_len"] / 1.4))
        dpo_words = (int(lengths["dpo_len"] / 3.0), int(lengths["dpo_len"] / 2.8))
    sft_path = write_jsonl(sft_rows(n_sft, seed=1, lo=sft_words[0], hi=sft_words[1]), cfg.work / "sft.jsonl")
    dpo_path = write_jsonl(dpo_rows(n_dpo, seed=2, lo=dpo_words[0], hi=dpo_words[1]), cfg.work / "dpo.jsonl")
    return dict(lengths, sft_path=sft_path, dpo_path=dpo_path)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-demo, small shapes: checks the bench works")
    ap.add_argument("--seconds", type=float, default=None, help="training seconds per run (default 15; smoke 4)")
    ap.add_argument("--budget-s", type=float, default=330, help="skip remaining runs once this much wall time is spent")
    ap.add_argument("--only", choices=["sft", "dpo"], default=None)
    ap.add_argument("--runs", default=None, help="comma list of the runs to do (e.g. c,c-eager); default all")
    ap.add_argument("--profile", action="store_true",
                    help="also profile a few steps of the project's stage (each stage --only leaves on)")
    ap.add_argument("--trace", action="store_true",
                    help="with --profile: also write each profile's Chrome trace (read it: python -m bench.gpu_gaps)")
    ap.add_argument("--profile-runs", default="c", help="with --profile: the project runs to profile (e.g. c,c-unshared)")
    ap.add_argument("--profile-after", type=int, default=WARMUP_STEPS,
                    help="with --profile: steps before the profiled ones (e.g. 60 for c-graphs, past its recordings)")
    ap.add_argument("--repeat", type=int, default=1, help="run the project's runs (not the warm-ups) this many times")
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_bench"))
    ap.add_argument("--width-multiple", type=int, default=None,
                    help="cuda_graphs' packed-width multiple (default speed.plan.GRAPH_WIDTH_MULTIPLE)")
    ap.add_argument("--full-rows", action="store_true",
                    help="SFT rows all past max_length (cut to 2,048), DPO prompts and answers of about half of it "
                         "each, every pair's sequences filling it (prompt 512 + answer 512): the shape of PERF_NOTES' "
                         "Unsloth and stock-HF figures, instead of the realistic spread of lengths")
    ap.add_argument("--unsloth-site", type=Path, default=None,
                    help="a folder of Unsloth's packages (bench/unsloth_site.sh): adds the runs 'unsloth', "
                         "bench.unsloth_bench in a process of its own")
    cfg = ap.parse_args(argv)
    if cfg.runs and {"unsloth", "unsloth-padded"} & set(cfg.runs.split(",")) and not cfg.unsloth_site:
        ap.error("the run 'unsloth' needs --unsloth-site DIR (Unsloth's packages: bench/unsloth_site.sh)")
    if cfg.unsloth_site and not (cfg.unsloth_site / "unsloth").is_dir():
        ap.error(f"--unsloth-site {cfg.unsloth_site}: no unsloth package there (build it: bench/unsloth_site.sh)")
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from tinyllama_mcp.pipeline.data import load as load_data
    from tinyllama_mcp.pipeline.modeling import device_name
    from tinyllama_mcp.pipeline.specs import DatasetSpec

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg.out.mkdir(parents=True, exist_ok=True)
    if not cfg.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    inputs = prepare_inputs(cfg)
    sft_path, dpo_path = inputs["sft_path"], inputs["dpo_path"]
    sft_len, dpo_len, short_len = inputs["sft_len"], inputs["dpo_len"], inputs["short_len"]
    sft_data = load_data(DatasetSpec(source=str(sft_path)), "sft").rows
    dpo_data = load_data(DatasetSpec(source=str(dpo_path)), "dpo").rows
    card = device_name()
    results: dict[str, Any] = {"card": card, "torch": torch.__version__, "seconds_per_run": cfg.seconds,
                               "smoke": cfg.smoke, "sft": {"runs": {}}, "dpo": {"runs": {}}}

    def left() -> bool:
        return time.time() - t_start < cfg.budget_s

    fast_sft, fast_dpo = stage_training("sft", sft_len), stage_training("dpo", dpo_len)
    if cfg.smoke:
        # tokens_per_step 'auto' is off on a CPU: name a budget so the smoke run goes through token-budget steps.
        fast_dpo["tokens_per_step"] = 4096
        # inductor's CPU compile takes minutes on a small machine; the CPU tests check the compiled layers
        fast_sft["torch_compile"] = fast_dpo["torch_compile"] = "auto"
    # Liger patches transformers' Llama classes for the whole process: every plain-HF baseline runs
    # before the first run that may apply it.
    sft_on, dpo_on = cfg.only in (None, "sft"), cfg.only in (None, "dpo")
    plan = []
    if sft_on:
        plan += [
            ("sft", "a", lambda: run_hf_sft(cfg, sft_data, cfg.work / "sft_a", batch=2, accumulation=4, max_length=short_len), None),
            ("sft", "b", lambda: run_hf_sft(cfg, sft_data, cfg.work / "sft_b", batch=8, accumulation=1, max_length=sft_len), None),
        ]
    if dpo_on:
        plan += [
            ("dpo", "a", lambda: run_hf_dpo(cfg, dpo_data, cfg.work / "dpo_a", batch=2, accumulation=4, max_length=short_len), None),
            ("dpo", "b", lambda: run_hf_dpo(cfg, dpo_data, cfg.work / "dpo_b", batch=8, accumulation=1, max_length=dpo_len), None),
        ]
    # Unsloth in a process of its own, before any project run holds GPU memory (its CPU mode trains SFT only).
    if cfg.unsloth_site:
        plan += [(stage, "unsloth", lambda stage=stage: run_unsloth(cfg, stage), None)
                 for stage, on in (("sft", sft_on), ("dpo", dpo_on and not cfg.smoke)) if on]
        if sft_on:  # SFT with Unsloth's padded rows (its rule picks them where a padded step is cheap)
            plan.append(("sft", "unsloth-padded", lambda: run_unsloth(cfg, "sft", padded=True), None))
    # The project's runs: (stage, name, training fields, fallback fields or None, Plan overrides or None). The compiled
    # layers (and Liger's Triton kernels) compile in the first project run of a process: an untimed warm-up run
    # takes that cost, else whichever c variant runs first pays it.
    variants: list[tuple] = []
    if sft_on:
        variants += [
            ("sft", "c-warmup", fast_sft, None, None),
            ("sft", "c-graphs-warmup", dict(fast_sft, cuda_graphs=True), None, None),
            ("sft", "c", fast_sft, dict(fast_sft, use_liger_kernel=False), None),
            ("sft", "c-eager", dict(fast_sft, torch_compile=False), None, None),
            ("sft", "c-graphs", dict(fast_sft, cuda_graphs=True), None, None),
            ("sft", "c-graphs-syncs", dict(fast_sft, cuda_graphs=True, sync_free_step=False), None, None),
            ("sft", "c-graphs-workers", dict(fast_sft, cuda_graphs=True, dataloader_workers=2), None, None),
            ("sft", "c-graphs-quiet", dict(fast_sft, cuda_graphs=True, logging_steps=1000), None, None),
            ("sft", "c-graphs-logsync", dict(fast_sft, cuda_graphs=True), None,
             LOG_AT_ONCE),
            ("sft", "c-graphs-inductor-rng", dict(fast_sft, cuda_graphs=True), None,
             INDUCTOR_RNG),
            ("sft", "c-graphs-round14", dict(fast_sft, cuda_graphs=True), None,
             {**LOG_AT_ONCE, **INDUCTOR_RNG}),
            ("sft", "c-graphs-round15", dict(fast_sft, cuda_graphs=True), None,
             {**ADDMM_COPY, **WIDTH_BOUND, **EAGER_LOSS}),
            ("sft", "c-graphs-addmm-copy", dict(fast_sft, cuda_graphs=True), None, ADDMM_COPY),
            ("sft", "c-graphs-eager-loss", dict(fast_sft, cuda_graphs=True), None,
             EAGER_LOSS),
            ("sft", "c-graphs-width-bound", dict(fast_sft, cuda_graphs=True), None, WIDTH_BOUND),
            ("sft", "c-syncfree", dict(fast_sft, sync_free_step=True), None, None),
            ("sft", "c-noworkers", dict(fast_sft, dataloader_workers=0), None, None),
        ]
    if dpo_on:
        inline = dict(fast_dpo, precompute_ref_log_probs=False)
        variants += [
            ("dpo", "c-warmup", fast_dpo, None, None),
            ("dpo", "c-graphs-warmup", dict(fast_dpo, cuda_graphs=True), None, None),
            ("dpo", "c", fast_dpo, dict(fast_dpo, use_liger_kernel=False), None),
            ("dpo", "c-eager", dict(fast_dpo, torch_compile=False), None, None),
            ("dpo", "c-graphs", dict(fast_dpo, cuda_graphs=True), None, None),
            ("dpo", "c-graphs-round15", dict(fast_dpo, cuda_graphs=True), None, {**ADDMM_COPY, **WIDTH_BOUND}),
            ("dpo", "c-unshared", dict(fast_dpo, share_prompt=False), None, None),
            ("dpo", "c-noworkers", dict(fast_dpo, dataloader_workers=0), None, None),
            ("dpo", "c-inline", inline, None, None),
            ("dpo", "c-refeager", inline, None, EAGER_REFERENCE),
            ("dpo", "c-padded", dict(fast_dpo, varlen_attention=False), None, None),
        ]
    if sft_on:
        lowmem = dict(fast_sft, gradient_checkpointing=True, activation_offloading=True, torch_compile="auto")
        variants += [
            ("sft", "c-nf4", dict(fast_sft, dequantized_base=False), None, None),
            ("sft", "c-peft", dict(fast_sft, fused_lora=False), None, None),
            ("sft", "c-liger-all", dict(fast_sft, use_liger_kernel=True), None, None),
            ("sft", "c-masked", dict(fast_sft, varlen_attention=False), None, None),
            ("sft", "c-paged", dict(fast_sft, fused_optimizer=False), None, None),
            ("sft", "c-steps", dict(fast_sft, tokens_per_step="auto" if not cfg.smoke else 4096), None, None),
            ("sft", "c-lowmem", lowmem, dict(lowmem, activation_offloading=False), None),
        ]
    paths = {"sft": sft_path, "dpo": dpo_path}

    def project_run(stage: str, name: str, training: dict, overrides: Optional[dict]):
        return lambda: run_stage(cfg, stage, paths[stage], cfg.work / f"{stage}_{name}", training, overrides)

    for stage, name, training, fallback, overrides in variants:
        plan.append((stage, name, project_run(stage, name, training, overrides),
                     project_run(stage, name + "-fallback", fallback, overrides) if fallback else None))
    if cfg.runs:
        wanted = set(cfg.runs.split(","))
        plan = [entry for entry in plan if entry[1] in wanted]
    # --repeat: the project's runs again, in the same order (c, c-x, c, c-x, ...), as name#2, name#3: a host whose
    # speed drifts over minutes shows as a spread between repeats rather than as a difference between runs.
    repeated = [entry for entry in plan if compared(entry[1])]
    for k in range(2, cfg.repeat + 1):
        plan += [(stage, f"{name}#{k}", fn, fallback) for stage, name, fn, fallback in repeated]
    for stage, name, fn, fallback in plan:
        if not left():
            results[stage]["runs"][name] = {"skipped": "over --budget-s"}
            continue
        guarded(name, fn, results[stage]["runs"], fallback)
        # written so far after every run: a call cut short keeps what ran
        (cfg.out / "train_bench.json").write_text(json.dumps(results, indent=2))

    for stage in ("sft", "dpo"):
        runs = results[stage]["runs"]
        # Run a trains on rows cut to 512 tokens: a different loss; the others are compared at equal tokens.
        done = {k: v for k, v in runs.items() if v.get("tokens") and k != "a"}
        if done:
            common = min(v["tokens"] for v in done.values())
            results[stage]["loss_tokens"] = common
            for v in done.values():
                v["loss_at_T"] = loss_at(v["curve"], common)
        rate = {k: v.get("tokens_per_s") for k, v in runs.items()}
        ratios = {}
        for num in filter(compared, runs):  # c and its lever runs
            for den in ("a", "b", "unsloth"):
                if rate.get(num) and rate.get(den):
                    ratios[f"{num}/{den}"] = round(rate[num] / rate[den], 2)
        results[stage]["ratios"] = ratios
        # Each lever run against c-graphs (else c) over the steps both replayed: the fairest same-process comparison.
        reference = next((k for k in ("c-graphs", "c") if runs.get(k, {}).get("curve")), None)
        if reference:
            paired = {k: paired_rates(v["curve"], runs[reference]["curve"]) for k, v in runs.items()
                      if compared(k) and k != reference and v.get("curve")}
            results[stage]["paired"] = {"reference": reference, "runs": {k: v for k, v in paired.items() if v}}

    profiled = set(cfg.profile_runs.split(",")) if cfg.profile else set()
    for stage, name, training, _, overrides in variants:
        if name not in profiled or not compared(name):
            continue
        label = f"profile_{stage}" + ("" if name == "c" else f"_{name}")
        if left():
            reset_memory()
            try:
                trace = cfg.out / f"{label}_trace.json" if cfg.trace else None
                text = profile_stage(cfg, stage, paths[stage], cfg.work / f"{stage}_prof", training, trace=trace,
                                     overrides=overrides)
            except Exception as exc:
                traceback.print_exc()
                text = f"profile failed: {type(exc).__name__}: {exc}"
            (cfg.out / f"{label}.txt").write_text(text)
            results[label] = str(cfg.out / f"{label}.txt")
            print(text[:6000], flush=True)
        else:
            results[label] = "skipped: over --budget-s"

    results["wall_s"] = round(time.time() - t_start, 1)
    (cfg.out / "train_bench.json").write_text(json.dumps(results, indent=2))
    text = table(results, card)
    (cfg.out / "train_bench.txt").write_text(text + "\n")
    print(text, flush=True)
    print(f"total wall {results['wall_s']} s; JSON: {cfg.out / 'train_bench.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
