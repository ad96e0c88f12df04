"""Did training diverge or collapse? Told from the Trainer's logged steps and the held-out loss, so that a dead
model ends its run FAILED with the reason instead of being declared best and registered.

The signs, per logged step (the loss is the mean over the logging window; `grad_norm` is the pre-clip norm of the
logged step, so clipping does not hide an explosion):
- the training loss ended above both twice its first value and ln(V), worse than a uniform guess: diverged
  (a non-finite loss stops training at once: `training.NonFiniteLossError`);
- the gradient norm fell to (almost) zero and stayed there, or rose a thousandfold and stayed there, over the last
  quarter of the logged steps (at least two).
A gradient sign alone is not a verdict, nor is a held-out loss near ln(V): the short, healthy run of a random
model sits near ln(V) too, with ordinary gradients. A held-out loss no better than a uniform prediction *together
with* a gradient sign is: collapsed. (Seen with LoRA at learning_rate=1e6: the gradient norm jumps ~1e5-fold, then
is exactly 0 from the third step on, and the held-out loss is ln(V) to six digits.)
"""

from __future__ import annotations

import math

# The gradient norm "vanished" below this fraction of its first logged value, "exploded" above this multiple.
VANISHED_RATIO = 1e-6
EXPLODED_RATIO = 1e3
# A held-out loss within this fraction of ln(V) is no better than a uniform prediction.
UNIFORM_MARGIN = 0.02
MIN_TRAILING_LOGS = 2


class TrainingCollapsed(RuntimeError):
    """Training finished, but the model it left is dead; `metrics` are what it measured."""

    def __init__(self, reason: str, metrics: dict[str, float]):
        super().__init__(reason)
        self.metrics = metrics


def _trailing(values: list[float], holds) -> int:
    """How many of the last values satisfy `holds`, counted back from the end."""
    count = 0
    for value in reversed(values):
        if not holds(value):
            break
        count += 1
    return count


def _for_good(values: list[float], holds) -> bool:
    """`holds` for the last quarter of `values`, and for at least MIN_TRAILING_LOGS of them."""
    return _trailing(values, holds) >= max(MIN_TRAILING_LOGS, math.ceil(len(values) / 4))


def diagnose(steps: list[dict], eval_loss: float, classes: int) -> str:
    """Why the model is dead ("" if it is not). `steps`: the Trainer's log entries with `loss` (and `grad_norm`),
    in order; `classes`: the vocabulary size (or number of labels) that a uniform prediction spreads over."""
    uniform = math.log(classes)
    losses = [float(s["loss"]) for s in steps]
    if len(losses) >= 2 and losses[-1] > max(2 * losses[0], uniform):
        return (f"training diverged: the loss rose from {losses[0]:.4g} to {losses[-1]:.4g}, above a uniform "
                f"prediction's ln({classes}) = {uniform:.4g}")
    norms = [float(s["grad_norm"]) for s in steps if math.isfinite(float(s.get("grad_norm", math.nan)))]
    if len(norms) < MIN_TRAILING_LOGS + 1 or norms[0] <= 0:
        return ""
    if _for_good(norms, lambda n: n <= VANISHED_RATIO * norms[0]):
        sign = f"the gradient norm vanished ({norms[0]:.3g} at first, {norms[-1]:.3g} at the end)"
    elif _for_good(norms, lambda n: n >= EXPLODED_RATIO * norms[0]):
        sign = f"the gradient norm exploded ({norms[0]:.3g} at first, {norms[-1]:.3g} at the end)"
    else:
        return ""
    if eval_loss >= (1 - UNIFORM_MARGIN) * uniform:
        return (f"training collapsed: {sign} and the held-out loss {eval_loss:.4f} is no better than a uniform "
                f"prediction's ln({classes}) = {uniform:.4f}")
    return ""


def check(steps: list[dict], eval_loss: float, classes: int, metrics: dict[str, float]) -> None:
    """Raise TrainingCollapsed (carrying `metrics`) if `diagnose` finds the model dead."""
    reason = diagnose(steps, eval_loss, classes)
    if reason:
        raise TrainingCollapsed(reason, metrics)
