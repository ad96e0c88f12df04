"""A run's per-example record on its held-out split, logged by the experiments and read back from the tracking store:
what the paired tests compare, in the sweeps' verdicts, the report's and the registry's champion decision.

- A classifier's record is its predictions table (`predictions.json`: row i is held-out example i, its text, label,
  prediction and class probabilities), which `classify` logs anyway.
- A causal LM's is `held_out_losses.json` (`losses_record`, logged by every LoRA child and probe stage): each
  example's mean loss per target token and its number of target tokens, in held-out order, and the digest of the
  held-out split. The run's `eval_loss` is their token-weighted mean (`training.ExampleLosses`).

Records are read from the store, never from memory, so that a child reused by `resume`, recorded after an outage or
trained on a Ray worker counts the same as one trained here. `Records` downloads each run's record once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_lab import tracking, verdicts
from finetune_lab.contract import EXAMPLE_LOSSES, PREDICTIONS_TABLE


def losses_record(per_example: np.ndarray, targets: np.ndarray, eval_set_digest: str) -> dict:
    """A causal LM's record as `held_out_losses.json` holds it (an example without targets has no loss: null)."""
    return {"eval_set_digest": eval_set_digest,
            "loss": [float(x) if np.isfinite(x) else None for x in per_example],
            "target_tokens": [int(n) for n in targets]}


def log_losses(record: dict) -> None:
    """Log a `losses_record` into the active run."""
    mlflow.log_dict(record, EXAMPLE_LOSSES)


@dataclass(frozen=True)
class Record:
    """One run's values on its held-out examples."""

    kind: str
    """`verdicts.CORRECT` (a classifier) or `verdicts.LOSS` (a causal LM)."""
    examples: str
    """Identifies the held-out examples: the split's digest (LM), a digest of the texts and labels (classifier)."""
    values: np.ndarray
    """Per example: 1.0 where the classifier's prediction is right, else 0.0; or the LM's mean loss per token."""
    probabilities: np.ndarray | None = None
    """A classifier's class probabilities (examples x classes), for pooling seeds."""
    labels: np.ndarray | None = None

    def held_out(self) -> verdicts.HeldOut:
        return verdicts.HeldOut(self.kind, self.values, self.examples)


def _from_losses(logged: dict) -> Record:
    losses = np.array([np.nan if x is None else x for x in logged["loss"]], dtype=float)
    return Record(verdicts.LOSS, logged["eval_set_digest"], losses)


def _from_predictions(logged: dict) -> Record:
    columns = {name: [row[k] for row in logged["data"]] for k, name in enumerate(logged["columns"])}
    labels, predictions = np.asarray(columns["label"]), np.asarray(columns["prediction"])
    classes = sorted((int(name.removeprefix("prob_")), name) for name in columns if name.startswith("prob_"))
    probabilities = np.array([columns[name] for _, name in classes], dtype=float).T
    examples = hashlib.sha256(json.dumps([columns.get("text"), columns["label"]]).encode()).hexdigest()
    return Record(verdicts.CORRECT, examples, (predictions == labels).astype(float), probabilities, labels)


class Records:
    """Runs' held-out records, each downloaded once (None for a run that logged none, or is gone)."""

    def __init__(self, client: MlflowClient | None = None):
        self.client = client or MlflowClient()
        self.read: dict[str, Record | None] = {}

    def of(self, run_id: str) -> Record | None:
        if run_id not in self.read:
            self.read[run_id] = self._download(run_id) if run_id else None
        return self.read[run_id]

    def _download(self, run_id: str) -> Record | None:
        try:
            logged = {a.path for a in self.client.list_artifacts(run_id)}
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        for name, parse in ((EXAMPLE_LOSSES, _from_losses), (PREDICTIONS_TABLE, _from_predictions)):
            if name in logged:
                with tracking.scratch_dir("held_out") as scratch:
                    path = self.client.download_artifacts(run_id, name, str(scratch))
                    return parse(json.loads(Path(path).read_text(encoding="utf-8")))
        return None

    def pooled(self, run_ids: list[str]) -> verdicts.HeldOut | None:
        """The runs' records pooled per example, as one configuration over its seeds (`verdicts.pooled_classifier`,
        `verdicts.pooled_losses`; a single run's own values); None unless every run has a record, of one kind, on
        the same examples."""
        records = [self.of(run_id) for run_id in run_ids]
        if not records or None in records or len({(r.kind, r.examples, len(r.values)) for r in records}) != 1:
            return None
        first = records[0]
        if len(records) == 1:
            return first.held_out()
        if first.kind == verdicts.CORRECT:
            return verdicts.pooled_classifier([r.probabilities for r in records], first.labels, first.examples)
        return verdicts.pooled_losses([r.values for r in records], first.examples)
