"""Expected losses: tiny seeded models trained a few steps through the project's real training paths (`classify`'s
and `lora_sweep`'s) log, step by step, the losses stored in tests/expected_losses.json. A change that alters
training (data order, tokenisation, loss masking, the optimizer, a default) fails here instead of drifting the
figures unnoticed.

Tolerance: relative 3e-4. The runs are seeded; on this machine, two runs of the same commit under different load
differed by up to 1.2e-4 relative at one step (CPU float32 kernels summing in another order); another machine's
BLAS may differ as much. A learning rate 10% higher moved classify's fourth loss by 2.2e-3 and lora_sweep's sixth
by 4.6e-4, relative: both fail here, lora_sweep's with a thin margin.

Regenerate: `pytest tests/test_expected_losses.py --regenerate-expected-losses`, and commit the JSON with the
change. Legitimate only when training is meant to change (a new default, a fixed defect, a pinned library upgraded)
and the commit says why; never to make a failure go away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import REPO
from support.store import children_of, runs_of, top_level

EXPECTED = Path(__file__).with_name("expected_losses.json")
RELATIVE_TOLERANCE = 3e-4
STEPS = 6

# Each in a process of its own, as `mlflow run` starts it: the losses depend on nothing an earlier test left in
# this process.
RUNS = {
    "classify": ["--model", "tiny", "--dataset", "sample", "--max-train-samples", "48", "--max-eval-samples", "16",
                 "--max-length", "32", "--batch-size", "8", "--learning-rate", "1e-3", "--seed", "7"],
    "lora_sweep": ["--model", "tiny", "--dataset", "sample_chat", "--ranks", "2", "--seeds", "1", "--batch-size", "8",
                   "--max-length", "48", "--learning-rate", "1e-2"],
}


def logged_losses(client, experiment: str) -> list[float]:
    """The per-step train_loss of the run that trained: the single run, or the sweep's one child."""
    runs = runs_of(client, experiment)
    (run,) = children_of(runs) or top_level(runs)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1)), "one logged loss per step"
    return [m.value for m in history]


@pytest.mark.parametrize("path", sorted(RUNS))
def test_a_seeded_tiny_run_logs_the_stored_losses(client, tracking_uri, request, path):
    trained = subprocess.run(
        [sys.executable, str(REPO / "entrypoints" / f"{path}.py"), *RUNS[path], "--max-steps", str(STEPS),
         "--experiment", f"expected-{path}"],
        capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    losses = logged_losses(client, f"expected-{path}")
    stored = json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {}
    if request.config.getoption("regenerate_expected_losses"):
        EXPECTED.write_text(json.dumps({**stored, path: losses}, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"{EXPECTED.name}: {path} regenerated")
    assert path in stored, f"no stored losses for {path}: regenerate them (see this module's docstring)"
    assert losses == pytest.approx(stored[path], rel=RELATIVE_TOLERANCE), (
        f"{path}'s training changed: logged {losses}, stored {stored[path]}")
