"""Divergence and collapse: the verdicts on logged training histories (measured ones included), and a collapsed sweep
that ends every child FAILED with the reason and registers nothing."""

from __future__ import annotations

import math

import pytest
from support.store import load_table, parent_and_children, runs_of

from finetune_lab import health
from finetune_lab.config import LoraSweepConfig
from finetune_lab.experiments import lora_sweep

UNIFORM = math.log(1024)  # the tiny Llama's vocabulary


def steps(losses, norms):
    return [{"step": i + 1, "loss": loss, "grad_norm": norm} for i, (loss, norm) in enumerate(zip(losses, norms))]


# Logged by the tiny sweep on sample_chat (ranks 2, 4; 10 steps): LoRA at learning_rate=1e6, and a healthy 1e-3.
COLLAPSED = steps([6.952, 6.932] + [6.931] * 8, [0.126, 3.65e4] + [0.0] * 8)
HEALTHY = steps([6.952, 6.936, 6.944, 6.939, 6.959, 6.964, 6.948, 6.944, 6.943, 6.942],
                [0.126, 0.148, 0.131, 0.126, 0.17, 0.162, 0.183, 0.215, 0.205, 0.202])


def test_a_collapse_needs_a_gradient_sign_and_a_uniform_held_out_loss():
    reason = health.diagnose(COLLAPSED, eval_loss=6.931472918338802, classes=1024)
    assert reason.startswith("training collapsed: the gradient norm vanished (0.126 at first, 0 at the end)")
    assert "no better than a uniform prediction's ln(1024) = 6.9315" in reason
    # The healthy short run of a random model sits at (even above) ln V: its ordinary gradients keep it alive.
    assert health.diagnose(HEALTHY, eval_loss=6.943066400507306, classes=1024) == ""
    # A gradient sign alone, with a held-out loss well below uniform, is not a verdict either.
    assert health.diagnose(COLLAPSED, eval_loss=3.0, classes=1024) == ""
    exploded = steps([6.95] * 6, [0.1, 50.0, 400.0, 900.0, 2e3, 5e3])
    assert health.diagnose(exploded, eval_loss=UNIFORM, classes=1024).startswith(
        "training collapsed: the gradient norm exploded")
    # Vanishing for good means the end of training, not a passing zero.
    recovered = steps([6.95] * 6, [0.1, 0.0, 0.0, 0.0, 0.1, 0.1])
    assert health.diagnose(recovered, eval_loss=UNIFORM, classes=1024) == ""


def test_a_loss_that_ends_above_uniform_and_twice_its_start_diverged():
    diverged = steps([2.0, 3.5, 9.0, 15.0], [1.0, 2.0, 3.0, 4.0])
    assert health.diagnose(diverged, eval_loss=14.0, classes=1024).startswith(
        "training diverged: the loss rose from 2 to 15, above a uniform prediction's ln(1024)")
    assert health.diagnose(steps([2.0, 4.5], [1.0, 1.0]), eval_loss=4.0, classes=1024) == "", "below ln V: noisy"


@pytest.mark.slow  # trains repeatedly: a sweep of two children
def test_a_collapsed_sweep_fails_every_child_and_registers_nothing(client, tmp_path):
    config = LoraSweepConfig(model="tiny", dataset="sample_chat", ranks=(2, 4), seeds=(1,), max_steps=6, batch_size=8,
                         max_length=48, learning_rate=1e6, experiment="collapse", register_as="dead-adapter")
    with pytest.raises(RuntimeError, match="all 2 child runs failed; first error: TrainingCollapsed: training "
                                           "collapsed"):
        lora_sweep.run(config)
    runs = runs_of(client, "collapse")
    parent, children = parent_and_children(runs)
    assert parent.info.status == "FAILED" and "best_run_id" not in parent.data.tags
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED"
        assert child.data.tags["error"].startswith("TrainingCollapsed: training collapsed: the gradient norm")
        # What the dead adapter measured stays on record: a held-out loss of a uniform prediction.
        assert child.data.metrics["eval_loss"] == pytest.approx(math.log(1024), abs=0.02)
        assert not client.list_artifacts(child.info.run_id, "adapter"), "a dead adapter is not logged"
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert set(table["status"]) == {"FAILED"} and table["error"].str.contains("training collapsed").all()
    assert client.search_registered_models() == []
