"""What a training loop does when the loss or gradient norm is not finite: stop, or skip the step.

A pure decision on replicated values (the loss and grad norm are the same on every rank), so
every rank takes the same branch and none is left waiting in a collective. Skipping a step
means keeping the parameters and optimizer state from before it (the step is a pure function,
so they are still there); a non-finite update is never applied, hence never checkpointed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
    """Training stopped because the loss or the gradient norm was inf or nan."""


@dataclass(frozen=True)
class NonFinitePolicy:
    """`action`: "stop" (default) or "skip"; `max_skips`: consecutive skipped steps before stopping anyway."""

    action: str = "stop"
    max_skips: int = 3

    def __post_init__(self):
        if self.action not in POLICIES:
            raise ValueError(f"non-finite policy must be one of {POLICIES}, got {self.action!r}")
        if self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {self.max_skips}")


_ADVICE = ("Lower optim.lr, keep gradient clipping on (optim.clip_norm), use float32 rather than bfloat16, "
           "or check the batch at this step.")


def apply_update(loss: float, grad_norm: float, step: int, policy: NonFinitePolicy, skipped_in_a_row: int,
                 first_step: bool, last_good: str = "") -> bool:
    """True: apply this step's update. False: skip it (the caller keeps the previous state).

    Raises `NonFiniteLossError` when the policy is "stop", when `max_skips` consecutive steps
    were already skipped, or on the first step of a run (nothing good to keep: bad input).
    `last_good` names the last good checkpoint for the message.
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    values = f"loss {loss}, grad_norm {grad_norm}"
    kept = f" The last good checkpoint is {last_good}." if last_good else " No checkpoint was written with these values."
    if first_step:
        raise NonFiniteLossError(f"step {step}: the loss is not finite before any update ({values}): the initial "
                                 f"parameters or the data are broken (model.dtype, the init, the token ids), "
                                 f"or the checkpoint resumed from holds inf/nan.{kept}")
    if policy.action == "stop":
        raise NonFiniteLossError(f"step {step}: {values}; stopping (nonfinite=stop).{kept} {_ADVICE} "
                                 f"nonfinite=skip skips such steps instead.")
    if skipped_in_a_row >= policy.max_skips:
        raise NonFiniteLossError(f"step {step}: {values} after {skipped_in_a_row} skipped steps in a row; "
                                 f"stopping (max_skips={policy.max_skips}).{kept} {_ADVICE}")
    return False
