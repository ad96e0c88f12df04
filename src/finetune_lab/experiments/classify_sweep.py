"""Experiment: a sequence classifier over learning rates x epochs (x seeds), on the shared sweep machinery (`sweep`):
one child run per configuration x seed, each the complete record of a `classify` run (`classify.train_and_log`),
all on the same data and held-out split (prepared once, from the first seed); on the parent a comparison table, a
summary per configuration (mean ± std over seeds of accuracy, precision, recall, F1, ROC-AUC and eval loss), a
figure of each metric per configuration with the seeds' spread, the best configuration's confusion matrix, and the
verdicts (`verdicts`): is the best configuration (highest mean accuracy) shown better than the others, by Welch's test
over seeds or McNemar's on the held-out examples? The best configuration's best seed is registered on request.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSequenceClassification

from finetune_lab import contract, executors, health, models, plots, preamble, tracking
from finetune_lab import data as data_lib
from finetune_lab.config import ClassifyConfig, ClassifySweepConfig
from finetune_lab.contract import FAILED, FINISHED
from finetune_lab.data import TEST
from finetune_lab.errors import InputError, raise_if_any
from finetune_lab.experiments import classify, search, sweep
from finetune_lab.experiments.sweep import ChildOutcome, ChildSpec

# A child's fine-tuned classifier (weights + tokenizer), logged only when the sweep registers its best.
CLASSIFIER_ARTIFACT = "classifier"
# Held-out texts a registered classifier must reproduce the trained model's logits on.
CHECK_TEXTS = 3
# The figure's panels: metric → axis label.
FIGURE_METRICS = {"accuracy": "accuracy", "f1": "F1", "roc_auc": "ROC-AUC", "eval_loss": "held-out loss"}


def child_label(learning_rate: float, epochs: float) -> str:
    """A configuration's name in run names and tables, like `lr4e-05-ep2`."""
    return f"lr{learning_rate:g}-ep{epochs:g}"


def configuration_name(row) -> str:
    """The label of a table row's configuration."""
    return child_label(float(row["learning_rate"]), float(row["epochs"]))


@dataclasses.dataclass
class ClassifySweepWorkload:
    """What every child shares: the sweep's config, the data and model source as prepared once, and the tags."""

    config: ClassifySweepConfig
    prepared: classify.PreparedClassification
    marks: dict[str, str]
    parent_run_id: str

    def __getstate__(self) -> dict:
        # The splits travel with their rows; MLflow's dataset records of them do not pickle and are made again
        # from the same rows on arrival (so with the same digests).
        data = self.prepared.data
        described = {"splits": sweep.portable(data.splits), "name": data.name, "source": data.source,
                     "from_hub": data.from_hub, "targets": data.targets, "truncated": data.truncated}
        return {**self.__dict__, "prepared": dataclasses.replace(self.prepared, data=None), "data": described}

    def __setstate__(self, state: dict) -> None:
        data = data_lib.describe(**state.pop("data"))
        self.__dict__.update(state, prepared=dataclasses.replace(state["prepared"], data=data))

    def make_trainer(self) -> ChildTrainer:
        return ChildTrainer(self)


class ChildTrainer:
    """Trains children one after another in this process, each a `classify` run of its own config."""

    def __init__(self, workload: ClassifySweepWorkload):
        self.workload = workload

    def __call__(self, spec: ChildSpec, run_id: str = "") -> ChildOutcome:
        return run_child(self.workload, spec, run_id)


def run_child(work: ClassifySweepWorkload, spec: ChildSpec, run_id: str = "") -> ChildOutcome:
    """Fine-tune one classifier in its own child run with the record of `classify` (`run_id`: the run the driver
    made for it in a worker process, else a new nested run). A failure (a collapsed model, anything) ends that run
    FAILED and is returned, not raised; a signal or a tracking outage raises executors.Stopped
    (`sweep.recorded`)."""
    config = work.config.child(spec.settings["learning_rate"], spec.settings["epochs"], spec.seed, spec.name)
    outcome, trial = ChildOutcome(spec, "", FAILED), search.watch(spec)
    with sweep.recorded(outcome), tracking.child_run(spec.name, work.parent_run_id, run_id) as child:
        outcome.run_id = child.info.run_id
        preamble.log_config(config)
        mlflow.set_tags(work.marks)
        preamble.log_sources(work.prepared, classify.preamble_params(work.prepared))
        try:
            trained = classify.train_and_log(config, work.prepared, f"{spec.position} {spec.name}", trial)
        except health.TrainingCollapsed as dead:
            outcome.metrics = dead.metrics
            raise
        fitted = trained.fitted
        if work.config.register_as:
            with tracking.scratch_dir("classifier") as scratch:
                fitted.model.save_pretrained(scratch)
                fitted.tokenizer.save_pretrained(scratch)
                mlflow.log_artifacts(str(scratch), CLASSIFIER_ARTIFACT)
            outcome.reference = classify.eager_reference(fitted.model, fitted.tokenizer,
                                                         trained.texts[:CHECK_TEXTS], config.max_length)
        outcome.curve = [(entry["step"], entry["loss"]) for entry in fitted.steps]
        outcome.metrics = {**fitted.metrics, **trained.headline,
                           "train_loss": outcome.curve[-1][1] if outcome.curve else float("nan")}
        if trial:
            trial.record(outcome)
        outcome.status = FINISHED
    return outcome


class ClassifySweep(sweep.Design):
    kind = contract.CLASSIFY_SWEEP
    axes = ["learning_rate", "epochs"]
    table_metrics = contract.CLASSIFY_SWEEP_TABLE_METRICS
    summary_metrics = contract.CLASSIFY_SWEEP_SUMMARY_METRICS
    objective = "accuracy"
    lower_is_better = False
    summary_artifact = contract.CONFIGURATION_SUMMARY

    def configurations(self, config: ClassifySweepConfig) -> list[tuple[str, dict]]:
        return [(child_label(rate, epochs), {"learning_rate": rate, "epochs": epochs})
                for rate in config.learning_rates for epochs in config.epochs]

    def label(self, settings: dict) -> str:
        return child_label(settings["learning_rate"], settings["epochs"])

    def space(self, config: ClassifySweepConfig) -> dict:
        return {"learning_rate": config.learning_rates, "epochs": config.epochs}

    def prepare(self, config: ClassifySweepConfig, split_seed: int) -> classify.PreparedClassification:
        # The data and model checks of `classify` on the settings every child shares (the grid's values play no
        # part in them), reported together with the sweep's own problems, each once.
        found = [*config.problems(), *executors.problems(config)]
        shared = config.child(ClassifyConfig.learning_rate, ClassifyConfig.epochs, split_seed, "")
        try:
            prepared = classify.prepare(shared)
        except InputError as error:
            raise InputError(list(dict.fromkeys([*found, *error.problems]))) from None
        raise_if_any(found)
        return prepared

    def preamble_params(self, prepared: classify.PreparedClassification) -> dict:
        return classify.preamble_params(prepared)

    def workload(self, config: ClassifySweepConfig, prepared: classify.PreparedClassification, marks: dict[str, str],
                 parent_run_id: str) -> ClassifySweepWorkload:
        return ClassifySweepWorkload(config, prepared, marks, parent_run_id)

    def log_figures(self, summary: pd.DataFrame, children: list[ChildOutcome], best: pd.Series) -> None:
        finished = [c for c in children if c.status == FINISHED]
        table = pd.DataFrame([{"configuration": c.spec.label, **c.metrics} for c in finished])
        plots.log_figure(plots.metrics_by_configuration(table, "configuration", FIGURE_METRICS,
                                                        plots.seeds_note(summary)),
                         contract.METRICS_BY_CONFIGURATION_FIGURE)
        with tracking.scratch_dir("best") as scratch:
            path = MlflowClient().download_artifacts(best["run_id"], contract.CONFUSION_MATRIX, str(scratch))
            matrix = json.loads(Path(path).read_text(encoding="utf-8"))
        mlflow.log_dict(matrix, contract.BEST_CONFUSION_MATRIX)
        figure = plots.confusion_figure(matrix)
        figure.axes[0].set_title(f"Best: {configuration_name(best)}, seed {best['seed']}", fontsize="medium")
        plots.log_figure(figure, contract.BEST_CONFUSION_FIGURE)

    def register(self, workload: ClassifySweepWorkload, prepared: classify.PreparedClassification,
                 best: ChildOutcome) -> dict:
        """Register the best child's classifier (downloaded from its run) after a verified reload against the
        logits the trained model gave (or, trained by an earlier attempt, the downloaded model's own)."""
        with tracking.scratch_dir("register") as scratch:
            folder = mlflow.artifacts.download_artifacts(run_id=best.run_id, artifact_path=CLASSIFIER_ARTIFACT,
                                                         dst_path=str(scratch))
            # The fine-tuned weights from the run; the tokenizer is the one the children used (they log it unchanged).
            model = AutoModelForSequenceClassification.from_pretrained(folder)
            tokenizer = models.load_tokenizer(prepared.source)
            texts = list(prepared.data.splits[TEST][workload.config.text_column][:CHECK_TEXTS])
            return classify.register(workload.config, prepared, model, tokenizer, texts, best.metrics["eval_loss"],
                                     trained_in=best.run_id, expected=best.reference)


DESIGN = ClassifySweep()


def run(config: ClassifySweepConfig) -> dict:
    """The whole sweep, a grid or a search (see `search.run`), inside one parent run; the parent's id, the best child
    and notes."""
    return search.run(config, DESIGN)
