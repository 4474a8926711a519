"""DPO's first step checks that the policy starts equal to its reference, and fails the run loudly when not.

At step 1 the new adapter's B matrices are zero, so the policy is its reference model exactly: every reward
(beta x the policy's minus the reference's log-prob of an answer) is ~0 and the loss is ln 2. A run whose first
rewards are far from 0 computes the two passes differently (say, they read different base weights), and what it
would learn is wrong; it stops here with one sentence instead of reporting success at the end.
"""

from __future__ import annotations

from tinyllama_mcp.errors import SelfCheckError

# The mean log-prob gap (nats a sequence) allowed at step 1: float rounding between the reference pass and the policy
# pass (bf16, other batch shapes) stays well under it; a policy on other weights is off by tens of nats.
START_TOLERANCE_NATS = 2.0


def start_gap(logs: dict, beta: float) -> tuple[float, float]:
    """The policy's minus the reference's mean log-prob of the chosen and of the rejected answers (nats)."""
    return logs["rewards/chosen"] / beta, logs["rewards/rejected"] / beta


def check_start(logs: dict, beta: float) -> None:
    """Raise SelfCheckError when step 1's logged rewards say the policy is not its reference."""
    if "rewards/chosen" not in logs or "rewards/rejected" not in logs:
        return
    chosen, rejected = start_gap(logs, beta)
    if max(abs(chosen), abs(rejected)) > START_TOLERANCE_NATS:
        raise SelfCheckError(
            f"DPO's first step does not start at its reference: the policy's log-probs differ from the reference's "
            f"by {chosen:+.2f} (chosen) and {rejected:+.2f} (rejected) nats a sequence where the two are one model "
            f"(loss {logs.get('loss', float('nan')):.3f}, ln 2 expected), most likely because the policy and "
            "reference passes read different base weights (an NF4 layout or precision mismatch), so this run "
            "stopped instead of learning from a wrong reference; report it with the job's log.txt"
        )


def start_check_callback(beta: float):
    """A TrainerCallback that runs check_start on the first logged step of a run that starts at step 0."""
    from transformers import TrainerCallback

    class StartCheck(TrainerCallback):
        def __init__(self) -> None:
            self.fresh = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.fresh = state.global_step == 0  # a resumed run's policy has moved on

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.fresh and state.global_step == 1 and "loss" in (logs or {}):
                self.fresh = False
                check_start(logs, beta)

    return StartCheck()
