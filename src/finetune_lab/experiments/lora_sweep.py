"""Experiment: LoRA over methods x ranks (x seeds), on the shared sweep machinery (`sweep`): one child run per
method x rank x seed on the same frozen base, the same tokenized data and the same held-out split; a comparison
table, a summary per method and rank (mean ± std over seeds), figures, verdicts (methods compared at equal rank) and
the best child on the parent; its adapter registered on request.

Each process that trains children loads the frozen base once (`ChildTrainer`); each child attaches a fresh adapter
of its method and detaches it afterwards. A child whose training finished while the tracking server was gone is kept
on disk (`spool`) and recorded by `resume`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import datasets
import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from finetune_lab import (
    causal_lm,
    contract,
    device,
    executors,
    health,
    held_out,
    lora,
    models,
    plots,
    preamble,
    prompts,
    registry,
    spool,
    tracking,
    training,
)
from finetune_lab.config import ASHA, LoraSweepConfig
from finetune_lab.contract import ADAPTER_ARTIFACT, FAILED, FINISHED
from finetune_lab.data import TEST, TRAIN
from finetune_lab.experiments import search, sweep
from finetune_lab.experiments.sweep import ChildOutcome, ChildSpec
from finetune_lab.schema import LogRange

# A prompt every registered adapter is checked and exemplified on.
PROBE_PROMPT = "Hello, how are you?"
# How far a PiSSA / OLoRA adapter, converted to apply to the untouched base, may move the trained model's logits:
# the conversion is exact arithmetic, rounded in the base weights' precision (fp32, or a 16-bit frozen base).
CONVERSION_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 1e-1}



@dataclass
class LoraSweepWorkload:
    """What every child of a sweep shares; sent once to each process that trains children."""

    config: LoraSweepConfig
    source: models.ModelSource
    tokenized: datasets.DatasetDict
    check_texts: list[str]
    """Texts whose logits each child keeps for verifying a registry reload (empty = keep none)."""
    marks: dict[str, str]
    """The config and data digests every child is tagged with (`resume`)."""
    parent_run_id: str
    eval_set_digest: str
    """The held-out split's digest, in each child's per-example record (`held_out`)."""
    trainer: ChildTrainer | None = field(default=None, repr=False, compare=False)
    """This process's trainer, made by the first `make_trainer()`."""

    def __getstate__(self) -> dict:
        # A worker process gets the workload without this process's trainer (and base): it makes its own.
        return {**self.__dict__, "tokenized": sweep.portable(self.tokenized), "trainer": None}

    def make_trainer(self) -> ChildTrainer:
        """This process's trainer, with the frozen base loaded once per process: the children trained here and the
        registration share it."""
        if self.trainer is None:
            self.trainer = ChildTrainer(self)
        return self.trainer


class ChildTrainer:
    """The workload in the process that trains children: the frozen base loaded once, then one child after another,
    each with a fresh adapter that is detached afterwards."""

    def __init__(self, workload: LoraSweepWorkload):
        self.workload = workload
        self.base, self.tokenizer = causal_lm.load_base(workload.source,
                                                        device.training_precision(workload.config.precision))

    def __call__(self, spec: ChildSpec, run_id: str = "") -> ChildOutcome:
        return run_child(self, spec, run_id)


def _keep_locally(trainer: ChildTrainer, spec: ChildSpec, model, params: dict, metrics: dict, fitted,
                  losses: dict, error: BaseException):
    """The tracking server is gone after `spec` trained: keep its adapter and record on disk (`spool`)."""
    tracking.go_offline(error)
    work = trainer.workload
    kept = spool.keep(work.parent_run_id, spec.name, model, trainer.tokenizer,
                      {"params": params, "tags": work.marks, "metrics": metrics, "steps": fitted.steps,
                       "held_out_losses": losses})
    return tracking.TrackingUnreachable(f"{spec.name} finished training; its adapter is kept in {kept}")


def _check_conversion(trainer: ChildTrainer, adapter_dir, trained: registry.Reference, texts: list[str]
                      ) -> registry.Reference:
    """A PiSSA / OLoRA adapter as logged (converted) on the untouched base: its logits, after checking that they
    are the trained model's (within the precision's rounding); the largest difference is logged."""
    with lora.loaded(trainer.base, str(adapter_dir)) as model:
        converted = registry.reference(model, trainer.tokenizer, texts)
    difference = max((a - b).abs().max().item() for a, b in zip(converted.logits, trained.logits))
    mlflow.log_metric("adapter_conversion_max_logit_diff", difference)
    if difference > CONVERSION_TOLERANCE[trained.dtype]:
        raise RuntimeError(f"the adapter converted to apply to the untouched base changes the trained model's logits "
                           f"by up to {difference:.3g}; not kept")
    return converted


def run_child(trainer: ChildTrainer, spec: ChildSpec, run_id: str = "") -> ChildOutcome:
    """Train one adapter in its own child run (`run_id`: the run the driver made for it in a worker process, else
    a new nested run). A failure ends that run FAILED and is returned, not raised; a signal or a tracking outage
    raises executors.Stopped (`sweep.recorded`)."""
    work = trainer.workload
    config, tokenizer, outcome = work.config, trainer.tokenizer, ChildOutcome(spec, "", FAILED)
    method, rank, trial = spec.settings["method"], spec.settings["rank"], search.watch(spec)
    if "learning_rate" in spec.settings:  # searched
        config = dataclasses.replace(config, learning_rate=spec.settings["learning_rate"])
    # The logits a reload must reproduce; a converted PiSSA / OLoRA adapter is also checked on a probe prompt.
    texts = work.check_texts or ([PROBE_PROMPT] if method in lora.MUTATE_BASE else [])
    with sweep.recorded(outcome), tracking.scratch_dir("child") as scratch, \
            tracking.child_run(spec.name, work.parent_run_id, run_id) as child:
        with lora.adapter(trainer.base, config, rank, spec.seed, method) as model:
            outcome.run_id = child.info.run_id
            params = lora.lora_params(model, config, rank, spec.seed)
            tracking.log_params(params)  # first: the effective lora_alpha wins over the config's 0 = "per rank"
            preamble.log_config(config)
            mlflow.set_tags(work.marks)
            try:
                fitted = causal_lm.fit(model, tokenizer, work.tokenized[TRAIN], work.tokenized[TEST], config,
                                       spec.seed, outcome.run_id, f"{spec.position} {spec.name}".strip(),
                                       watch=trial)
            except health.TrainingCollapsed as dead:
                outcome.metrics = dead.metrics
                mlflow.log_metrics(dead.metrics)  # what the dead model measured, next to the reason
                raise
            metrics = {**fitted.metrics, "trainable_params": lora.trainable_params(model)}
            losses = held_out.losses_record(fitted.held_out.per_example, fitted.held_out.targets,
                                            work.eval_set_digest)
            try:
                metrics["adapter_size_bytes"] = lora.log_adapter(model, tokenizer, keep_in=scratch)
                held_out.log_losses(losses)
                mlflow.log_metrics(metrics)
            except Exception as error:  # noqa: BLE001 - only an unreachable server is kept for later here
                if not (tracking.offline() or tracking.unreachable(error)):
                    raise
                raise _keep_locally(trainer, spec, model, params, metrics, fitted, losses, error) from error
            outcome.reference = registry.reference(model, tokenizer, texts)
        if method in lora.MUTATE_BASE:  # the base holds its own weights again
            converted = _check_conversion(trainer, scratch / ADAPTER_ARTIFACT, outcome.reference, texts)
            outcome.reference = converted if work.check_texts else None
        outcome.metrics, outcome.curve = {**metrics, "train_loss": fitted.train_loss}, fitted.curve
        if trial:
            trial.record(outcome)
        outcome.status = FINISHED
    return outcome


def registry_check_texts(prepared: causal_lm.PreparedCausalLM, tokenizer, config: LoraSweepConfig) -> list[str]:
    """Prompts on which a registered adapter must reproduce the trained model's logits exactly."""
    held_out = prepared.data.splits[TEST][0][config.input_column]
    return [prompts.prompt_text(tokenizer, text, config.prompt_format) for text in (held_out, PROBE_PROMPT)]


class LoraSweep(sweep.Design):
    kind = contract.LORA_SWEEP
    axes = ["method", "rank"]
    table_metrics = contract.SWEEP_TABLE_METRICS
    summary_metrics = contract.SUMMARY_METRICS
    objective = "eval_loss"
    lower_is_better = True
    summary_artifact = contract.RANK_SUMMARY

    def configurations(self, config: LoraSweepConfig) -> list[tuple[str, dict]]:
        return [(contract.lora_label(method, rank), {"method": method, "rank": rank})
                for method in config.method_list for rank in config.ranks]

    def label(self, settings: dict) -> str:
        label = contract.lora_label(settings["method"], settings["rank"])
        return f"{label}-lr{settings['learning_rate']:g}" if "learning_rate" in settings else label

    def space(self, config: LoraSweepConfig) -> dict:
        rates = config.learning_rates or (config.learning_rate,)
        return {"method": tuple(config.method_list), "rank": config.ranks,
                "learning_rate": rates if isinstance(rates, LogRange) else tuple(rates)}

    def prepare(self, config: LoraSweepConfig, split_seed: int) -> causal_lm.PreparedCausalLM:
        return causal_lm.prepare(config, config.ranks, split_seed, found=executors.problems(config),
                                 methods=[m for m in config.method_list if m in lora.METHOD_SETTINGS])

    def workload(self, config: LoraSweepConfig, prepared: causal_lm.PreparedCausalLM, marks: dict[str, str],
                 parent_run_id: str) -> LoraSweepWorkload:
        tokenizer = causal_lm.load_tokenizer(prepared.source)
        tokenized = causal_lm.tokenize(prepared.data.splits, tokenizer, config)
        check_texts = registry_check_texts(prepared, tokenizer, config) if config.register_as else []
        return LoraSweepWorkload(config, prepared.source, tokenized, check_texts, marks, parent_run_id,
                        prepared.data.eval_digest)

    def record_kept(self, workload: LoraSweepWorkload, specs: list[ChildSpec]) -> dict[str, ChildOutcome]:
        """The planned children whose training finished during a tracking outage and was kept on this machine
        (`spool`), recorded now as child runs of the parent instead of trained again: name → outcome."""
        kept, recorded = spool.kept(workload.parent_run_id), {}
        for spec in specs:
            folder = kept.get(spec.name)
            if folder is None:
                continue
            record = spool.load(folder)
            if record["tags"] != workload.marks:  # kept from another config or data: train it again
                continue
            adapter = folder / ADAPTER_ARTIFACT
            metrics = {**record["metrics"], "adapter_size_bytes": (adapter / lora.ADAPTER_WEIGHTS).stat().st_size}
            with tracking.child_run(spec.name, workload.parent_run_id) as child:
                tracking.log_params(record["params"])
                preamble.log_config(workload.config)
                mlflow.set_tags({**record["tags"], contract.RECOVERED_TAG: str(folder)})
                training.log_steps(MlflowClient(), child.info.run_id, record["steps"])
                mlflow.log_metrics(metrics)
                mlflow.log_artifacts(str(adapter), ADAPTER_ARTIFACT)
                if "held_out_losses" in record:  # kept by a version that logged no per-example record
                    held_out.log_losses(record["held_out_losses"])
            spool.discard(folder)
            curve = [(entry["step"], entry["loss"]) for entry in record["steps"]]
            recorded[spec.name] = ChildOutcome(spec, child.info.run_id, FINISHED,
                                               {**metrics, "train_loss": curve[-1][1]}, curve, reused=True)
        return recorded

    def verdict_groups(self, table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
        """Ranks compared with each other for one method; with several methods, the methods at each rank."""
        if table["method"].nunique() <= 1:
            return [("", table)]
        return [(f"rank {rank}", rows) for rank, rows in table.groupby("rank")]

    def log_figures(self, summary: pd.DataFrame, children: list[ChildOutcome], best: pd.Series) -> None:
        for row in summary[summary["method"] == best["method"]].itertuples():
            mlflow.log_metrics({"eval_loss_by_rank": row.eval_loss_mean, "train_loss_by_rank": row.train_loss_mean},
                               step=int(row.rank))
        plots.log_figure(plots.loss_vs_rank(summary), contract.LOSS_VS_RANK_FIGURE)
        memory = plots.memory_vs_rank(summary)
        if memory is not None:
            plots.log_figure(memory, contract.MEMORY_VS_RANK_FIGURE)
        if summary["method"].nunique() > 1:
            plots.log_figure(plots.methods_by_rank(summary), contract.METHODS_FIGURE)
        plots.log_figure(plots.loss_curves({c.name: c.curve for c in children if c.status == FINISHED}),
                         contract.LOSS_CURVES_FIGURE)

    def register(self, workload: LoraSweepWorkload, prepared: causal_lm.PreparedCausalLM, best: ChildOutcome) -> dict:
        """Register the best child's adapter (adapter files + base reference) after a verified reload. A child whose
        trained model is not in memory (trained by an earlier attempt), or was on a device this process does not have
        (a GPU worker of a CPU driver), is checked against its logged adapter on the base, on this process's
        device."""
        config = workload.config
        with tracking.scratch_dir("register") as scratch:
            adapter_dir = mlflow.artifacts.download_artifacts(
                run_id=best.run_id, artifact_path=ADAPTER_ARTIFACT, dst_path=str(scratch)
            )
            expected = best.reference
            if expected is None or expected.device != device.training_device():
                trainer = workload.make_trainer()  # the base the children trained on here, or loaded now
                with lora.loaded(trainer.base, adapter_dir) as model:
                    expected = registry.reference(model, trainer.tokenizer, workload.check_texts)
            candidate = registry.Candidate(
                log=lambda: registry.log_adapter_model(adapter_dir, prepared.source, expected.dtype,
                                                       config.prompt_format, registry.DEFAULT_MAX_NEW_TOKENS,
                                                       PROBE_PROMPT),
                check_texts=workload.check_texts,
                expected=expected,
                eval_loss=best.metrics["eval_loss"],
                eval_set_digest=prepared.data.eval_digest,
                tags={"method": best.settings["method"], "rank": str(best.settings["rank"]), "seed": str(best.seed),
                      "run_id": best.run_id, "parent_run_id": workload.parent_run_id,
                      "dataset_digest": prepared.data.digest, "base_model": prepared.source.spec,
                      "base_revision": prepared.source.revision},
            )
            return registry.register_verified(config.register_as, candidate, workload.parent_run_id)


class SearchedLoraSweep(LoraSweep):
    """The LoRA sweep as a search (`search=asha`) samples it: the learning rate is one more axis of a configuration,
    and the configurations it confirms are compared with each other whatever their method and rank."""

    axes = ["method", "rank", "learning_rate"]

    def verdict_groups(self, table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
        return [("", table)]


DESIGN = LoraSweep()
SEARCHED = SearchedLoraSweep()


def design(config: LoraSweepConfig) -> LoraSweep:
    """The design that trains `config`: the grid's, or the search's."""
    return SEARCHED if config.search == ASHA else DESIGN


def plan(config: LoraSweepConfig) -> list[ChildSpec]:
    """Every child of the sweep, in the order they run: seed by seed, method by method, rank by rank."""
    return DESIGN.plan(config)


def execute(config: LoraSweepConfig) -> dict:
    """The whole sweep inside the active run (see `sweep.execute`)."""
    return sweep.execute(config, DESIGN)


def run(config: LoraSweepConfig) -> dict:
    """The whole sweep, a grid or a search (see `search.run`), inside one parent run; the parent's id, the best child
    and notes."""
    return search.run(config, design(config))
