"""Experiment: LoRA rank sweep. One parent run; one child run per rank x seed on the same frozen base,
the same tokenized data and the same held-out split; then a comparison table, a per-rank summary
(mean ± std over seeds), plots and the best rank on the parent.

Recipe: prepare (config, data, model, architecture checks) → plan the children (`ChildSpec`) → with `resume`,
reopen the earlier parent and keep the children it finished with the same config and data → tokenize once →
train the others through an executor (`executors`: in this process, or on Ray workers; the base loaded once per
process; a fresh adapter each; a failing child is recorded and the sweep goes on; a signal or a tracking outage
stops it) → summarise every planned child, also on the way down after a signal → register the best.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import datasets
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from finetune_lab import (
    causal_lm,
    contract,
    device,
    executors,
    health,
    lora,
    models,
    plots,
    prompts,
    registry,
    resume,
    spool,
    tracking,
    training,
)
from finetune_lab import data as data_lib
from finetune_lab.config import SweepConfig, as_params
from finetune_lab.contract import ADAPTER_ARTIFACT, NOT_RUN, child_name
from finetune_lab.data import TEST, TRAIN
from finetune_lab.errors import one_line

# A prompt every registered adapter is checked and exemplified on.
PROBE_PROMPT = "Hello, how are you?"
FINISHED = "FINISHED"


@dataclass(frozen=True)
class ChildSpec:
    """One child run the sweep plans."""

    rank: int
    seed: int
    position: str = ""
    """Its place in the sweep, like `[2/4]`, for the console."""

    @property
    def name(self) -> str:
        return child_name(self.rank, self.seed)

    def failed(self, run_id: str, error: str, status: str = "FAILED") -> ChildOutcome:
        """The outcome of this child when it could not finish where it was sent (e.g. its worker died)."""
        return ChildOutcome(self, run_id, status, error=error)


def plan(config: SweepConfig) -> list[ChildSpec]:
    """Every child of the sweep, in the order they run: seed by seed, rank by rank."""
    grid = [(rank, seed) for seed in config.seeds for rank in config.ranks]
    return [ChildSpec(rank, seed, f"[{k}/{len(grid)}]") for k, (rank, seed) in enumerate(grid, start=1)]


@dataclass
class ChildOutcome:
    spec: ChildSpec
    run_id: str
    status: str
    """FINISHED, FAILED, KILLED, or NOT_RUN (the sweep stopped before it started)."""
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""
    reference: registry.Reference | None = None
    """The trained model's logits on the registry's check texts (only when registering, and trained now)."""
    reused: bool = False
    """Finished by an earlier attempt of the parent (`resume`), not trained now."""

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Workload:
    """What every child of a sweep shares; sent once to each process that trains children."""

    config: SweepConfig
    source: models.ModelSource
    tokenized: datasets.DatasetDict
    check_texts: list[str]
    """Texts whose logits each child keeps for verifying a registry reload (empty = keep none)."""
    marks: dict[str, str]
    """The config and data digests every child is tagged with (`resume`)."""
    parent_run_id: str

    def __getstate__(self) -> dict:
        # Pickled for worker processes, maybe on other machines: carry the rows, not paths to this machine's
        # dataset cache files (which is how a file-backed Dataset pickles).
        tokenized = datasets.DatasetDict({name: split.flatten_indices(keep_in_memory=True) if split.cache_files
                                          else split for name, split in self.tokenized.items()})
        return {**self.__dict__, "tokenized": tokenized}


class ChildTrainer:
    """The workload in the process that trains children: the frozen base loaded once, then one child after another,
    each with a fresh adapter that is detached afterwards."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self.base, self.tokenizer = causal_lm.load_base(workload.source)

    def __call__(self, spec: ChildSpec, run_id: str = "") -> ChildOutcome:
        return run_child(self, spec, run_id)


def _status_in_store(run_id: str) -> str:
    """How the store ended a run ("" if it cannot tell)."""
    if not run_id or tracking.offline():
        return ""
    return MlflowClient().get_run(run_id).info.status


def _keep_locally(trainer: ChildTrainer, spec: ChildSpec, model, params: dict, metrics: dict, fitted,
                  error: BaseException):
    """The tracking server is gone after `spec` trained: keep its adapter and record on disk (`spool`)."""
    tracking.go_offline(error)
    work = trainer.workload
    kept = spool.keep(work.parent_run_id, spec.name, model, trainer.tokenizer,
                      {"params": params, "tags": work.marks, "metrics": metrics, "steps": fitted.steps})
    return tracking.TrackingUnreachable(f"{spec.name} finished training; its adapter is kept in {kept}")


def run_child(trainer: ChildTrainer, spec: ChildSpec, run_id: str = "") -> ChildOutcome:
    """Train one adapter in its own child run (`run_id`: the run the driver made for it in a worker process, else
    a new nested run). A failure (OOM, NaN loss, a collapsed model, anything) ends that run FAILED and is returned,
    not raised; a signal or a tracking outage raises executors.Stopped."""
    work = trainer.workload
    config, tokenizer, outcome = work.config, trainer.tokenizer, ChildOutcome(spec, "", "FAILED")
    try:
        with tracking.child_run(spec.name, work.parent_run_id, run_id) as child, \
                lora.adapter(trainer.base, config, spec.rank, spec.seed) as model:
            outcome.run_id = child.info.run_id
            params = lora.lora_params(model, config, spec.rank, spec.seed)
            tracking.log_params(params)  # first: the effective lora_alpha wins over the config's 0 = "per rank"
            tracking.log_config(as_params(config))
            mlflow.set_tags(work.marks)
            try:
                fitted = causal_lm.fit(model, tokenizer, work.tokenized[TRAIN], work.tokenized[TEST], config,
                                       spec.seed, outcome.run_id, f"{spec.position} {spec.name}".strip())
            except health.TrainingCollapsed as dead:
                outcome.metrics = dead.metrics
                mlflow.log_metrics(dead.metrics)  # what the dead model measured, next to the reason
                raise
            metrics = {**fitted.metrics, "trainable_params": lora.trainable_params(model)}
            try:
                metrics["adapter_size_bytes"] = lora.log_adapter(model, tokenizer)
                mlflow.log_metrics(metrics)
            except Exception as error:  # noqa: BLE001 - only an unreachable server is kept for later here
                if not (tracking.offline() or tracking.unreachable(error)):
                    raise
                raise _keep_locally(trainer, spec, model, params, metrics, fitted, error) from error
            outcome.reference = registry.reference(model, tokenizer, work.check_texts)
            outcome.metrics, outcome.curve = {**metrics, "train_loss": fitted.train_loss}, fitted.curve
        outcome.status = FINISHED
        return outcome
    except KeyboardInterrupt as stop:
        outcome.status, outcome.error = _status_in_store(outcome.run_id) or "KILLED", str(stop)
        raise executors.Stopped([outcome], stop) from stop
    except tracking.TrackingUnreachable as lost:
        raise executors.Stopped([outcome], lost) from lost
    except Exception as error:  # noqa: BLE001 - record it and go on with the sweep
        if tracking.offline() or tracking.unreachable(error):
            tracking.go_offline(error)
            raise executors.Stopped([outcome], tracking.TrackingUnreachable(f"{spec.name} had not finished training")
                                    ) from error
        outcome.error = one_line(error)
        return outcome


def train_children(workload: Workload, specs: list[ChildSpec]) -> tuple[list[ChildOutcome], BaseException | None]:
    """Train `specs` where the config says (`executors`), until a signal or a tracking outage stops it. Returns an
    outcome per spec, in the planned order (NOT_RUN for those never started), and what stopped it (None if
    nothing did)."""
    ended: dict[str, ChildOutcome] = {}
    stop: BaseException | None = None
    try:
        for outcome in executors.run_children(workload.config, functools.partial(ChildTrainer, workload), specs):
            ended[outcome.name] = outcome
    except executors.Stopped as stopped:
        ended.update({outcome.name: outcome for outcome in stopped.outcomes})
        stop = stopped.cause
    except KeyboardInterrupt as between_children:
        stop = between_children
    return [ended.get(spec.name) or ChildOutcome(spec, "", NOT_RUN, error=f"not run: {stop}") for spec in specs], stop


def reused_children(parent_run_id: str, specs: list[ChildSpec], marks: dict[str, str]) -> dict[str, ChildOutcome]:
    """The planned children that the parent already finished with the same config and data, read back from the
    store: name → outcome."""
    finished = resume.finished_children(parent_run_id, marks)
    client, reused = MlflowClient(), {}
    for spec in specs:
        if spec.name in finished:
            run = finished[spec.name]
            history = client.get_metric_history(run.info.run_id, "train_loss")
            reused[spec.name] = ChildOutcome(spec, run.info.run_id, FINISHED, dict(run.data.metrics),
                                             sorted((m.step, m.value) for m in history), reused=True)
    return reused


def record_kept_children(workload: Workload, specs: list[ChildSpec]) -> dict[str, ChildOutcome]:
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
            tracking.log_config(as_params(workload.config))
            mlflow.set_tags({**record["tags"], contract.RECOVERED_TAG: str(folder)})
            training.log_steps(MlflowClient(), child.info.run_id, record["steps"])
            mlflow.log_metrics(metrics)
            mlflow.log_artifacts(str(adapter), ADAPTER_ARTIFACT)
        spool.discard(folder)
        curve = [(entry["step"], entry["loss"]) for entry in record["steps"]]
        recorded[spec.name] = ChildOutcome(spec, child.info.run_id, FINISHED, {**metrics, "train_loss": curve[-1][1]},
                                           curve, reused=True)
    return recorded


def comparison_table(children: list[ChildOutcome]) -> pd.DataFrame:
    rows = [
        {"rank": c.rank, "seed": c.seed, **{m: c.metrics.get(m) for m in contract.SWEEP_TABLE_METRICS},
         "status": c.status, "reused": c.reused, "run_id": c.run_id, "error": c.error}
        for c in children
    ]
    return pd.DataFrame(rows)


def best_child(table: pd.DataFrame, summary: pd.DataFrame) -> pd.Series:
    """The rank with the lowest mean eval loss, and its child with the lowest eval loss."""
    best_rank = int(summary.loc[summary["eval_loss_mean"].idxmin(), "rank"])
    finished = table[(table["status"] == FINISHED) & (table["rank"] == best_rank)]
    return finished.loc[finished["eval_loss"].idxmin()]


def log_summary(children: list[ChildOutcome]) -> dict | None:
    """On the parent run: the comparison table of every planned child (with its status), the children that did not
    finish; and over the finished ones the per-rank summary, plots and the best rank. None if none finished."""
    table = comparison_table(children)
    tracking.log_table(table, contract.COMPARISON_TABLE)
    unfinished = table[table["status"] != FINISHED]
    mlflow.log_metric("failed_children", len(unfinished))
    tracking.set_or_clear_tag("failed_children", "; ".join(f"{child_name(r.rank, r.seed)}: {r.status} {r.error}"
                                                           for r in unfinished.itertuples()))
    if len(unfinished) == len(table):
        return None
    summary = contract.summarise(table)
    tracking.log_table(summary, contract.RANK_SUMMARY)
    for row in summary.itertuples():
        mlflow.log_metrics({"eval_loss_by_rank": row.eval_loss_mean, "train_loss_by_rank": row.train_loss_mean},
                           step=int(row.rank))
    plots.log_figure(plots.loss_vs_rank(summary), contract.LOSS_VS_RANK_FIGURE)
    memory = plots.memory_vs_rank(summary)
    if memory is not None:
        plots.log_figure(memory, contract.MEMORY_VS_RANK_FIGURE)
    plots.log_figure(plots.loss_curves({c.name: c.curve for c in children if c.status == FINISHED}),
                     contract.LOSS_CURVES_FIGURE)
    best = best_child(table, summary)
    mlflow.log_metrics({"best_rank": int(best["rank"]), "best_eval_loss": float(best["eval_loss"])})
    mlflow.set_tags({"best_rank": str(int(best["rank"])), "best_run_id": best["run_id"]})
    return {"table": table, "summary": summary, "best": best}


def registry_check_texts(prepared: causal_lm.Prepared, tokenizer, config: SweepConfig) -> list[str]:
    """Prompts on which a registered adapter must reproduce the trained model's logits exactly."""
    held_out = prepared.data.splits[TEST][0][config.input_column]
    return [prompts.prompt_text(tokenizer, text, config.prompt_format) for text in (held_out, PROBE_PROMPT)]


def register_best(workload: Workload, tokenizer, prepared: causal_lm.Prepared, best: ChildOutcome) -> dict:
    """Register the best child's adapter (adapter files + base reference) after a verified reload. A child whose
    trained model is not in memory (trained by an earlier attempt), or was on a device this process does not have
    (a GPU worker of a CPU driver), is checked against its logged adapter on the base, on this process's device."""
    config = workload.config
    with tracking.scratch_dir("register") as scratch:
        adapter_dir = mlflow.artifacts.download_artifacts(
            run_id=best.run_id, artifact_path=ADAPTER_ARTIFACT, dst_path=str(scratch)
        )
        expected = best.reference
        if expected is None or expected.device != device.training_device():
            base, _ = causal_lm.load_base(prepared.source)
            with lora.loaded(base, adapter_dir) as model:
                expected = registry.reference(model, tokenizer, workload.check_texts)
        candidate = registry.Candidate(
            log=lambda: registry.log_adapter_model(adapter_dir, prepared.source, expected.dtype, config.prompt_format,
                                                   registry.DEFAULT_MAX_NEW_TOKENS, PROBE_PROMPT),
            check_texts=workload.check_texts,
            expected=expected,
            eval_loss=best.metrics["eval_loss"],
            eval_set_digest=prepared.data.eval_digest,
            tags={"rank": str(best.rank), "seed": str(best.seed), "run_id": best.run_id,
                  "parent_run_id": workload.parent_run_id, "dataset_digest": prepared.data.digest,
                  "base_model": prepared.source.spec, "base_revision": prepared.source.revision},
        )
        return registry.register_verified(config.register_as, candidate, workload.parent_run_id)


def _outage_message(stop: BaseException, parent_run_id: str) -> str:
    return (f"the tracking server {mlflow.get_tracking_uri()} is unreachable; {stop}. When it is back, resume with "
            f"`-P resume={parent_run_id}` (`--resume {parent_run_id}` when called directly): it records what was "
            f"kept and trains only what is missing. The last error: {tracking.offline()[:200]}")


def sweep_children(parent: mlflow.ActiveRun, config: SweepConfig, prepared: causal_lm.Prepared,
                   marks: dict[str, str], started: float) -> dict:
    """Every planned child of `parent`: reused when the parent already finished it with the same config and data,
    recorded when kept on disk during an outage, trained otherwise; then the summary, the registration, and
    `sweep_wall_s` (since `started`) and `child_train_s_sum` (the children trained now) on the parent."""
    parent_run_id = parent.info.run_id
    specs = plan(config)
    done = reused_children(parent_run_id, specs, marks)
    tokenizer = causal_lm.load_tokenizer(prepared.source)
    tokenized = causal_lm.tokenize(prepared.data.splits, tokenizer, config)
    check_texts = registry_check_texts(prepared, tokenizer, config) if config.register_as else []
    workload = Workload(config, prepared.source, tokenized, check_texts, marks, parent_run_id)
    done.update(record_kept_children(workload, [s for s in specs if s.name not in done]))
    trained, stop = train_children(workload, [s for s in specs if s.name not in done])
    outcomes = {**done, **{c.name: c for c in trained}}
    children = [outcomes[s.name] for s in specs]
    if isinstance(stop, tracking.TrackingUnreachable):  # nothing more can be logged: say how to go on
        raise tracking.TrackingUnreachable(_outage_message(stop, parent_run_id)) from stop
    try:
        outcome = log_summary(children)
    finally:
        if stop is not None:  # a signal: the finished work is summarised, now every open run ends KILLED
            raise stop
    if outcome is None:
        raise RuntimeError(f"all {len(children)} child runs failed; first error: {children[0].error}")
    best = outcome["best"]
    registered = []
    if config.register_as:
        chosen = next(c for c in children if c.run_id == best["run_id"])
        result = register_best(workload, tokenizer, prepared, chosen)
        registered = [f"registered {result['model_uri']} (champion {result['decision']})"]
    mlflow.log_metrics({"sweep_wall_s": time.perf_counter() - started,
                        "child_train_s_sum": sum(c.metrics.get("train_runtime_s", 0.0) for c in trained)})
    notes = [f"  {c.name:<14} {c.status:<9} "
             + (f"eval_loss {c.metrics['eval_loss']:.4f}" if c.status == FINISHED else c.error)
             + (" (finished earlier, reused)" if c.reused else "") for c in children]
    return {
        "run_id": parent_run_id,
        "metrics": {"best_rank": int(best["rank"]), "best_eval_loss": float(best["eval_loss"])},
        "children": children,
        "notes": ["children:", *notes, f"best child run: {best['run_id']}", *registered],
    }


def execute(config: SweepConfig) -> dict:
    """The whole sweep inside the active run: the parent of its children (with `resume`: the run that reopens the
    earlier parent). Validate, train every planned child through the executor, summarise, register. Return the
    parent's id, the best child, the children and notes."""
    started = time.perf_counter()
    invocation = mlflow.active_run()
    tracking.log_config(as_params(config))
    # The held-out split (and the tiny model) come from the first seed: identical for every child.
    split_seed = config.seeds[0] if config.seeds else 0
    prepared = causal_lm.prepare(config, config.ranks, split_seed, found=executors.problems(config))
    tracking.log_params(
        {**models.source_params(prepared.source), **tracking.environment_params(),
         "dataset_digest": prepared.data.digest, "train_examples": len(prepared.data.splits[TRAIN]),
         "eval_examples": len(prepared.data.splits[TEST]), "split_seed": split_seed}
    )
    data_lib.log_inputs(prepared.data)
    with resume.parent_run(config, contract.SWEEP, invocation, prepared.data) as parent:
        result = sweep_children(parent, config, prepared, resume.marks(config, prepared.data), started)
    result["notes"][:0] = resume.note(parent, invocation)
    return result


def run(config: SweepConfig) -> dict:
    """The whole sweep inside one parent run (with `resume`: inside the earlier parent, reopened, under a run of
    its own); return the parent's id, the best child and the tables."""
    kind = contract.RESUME if config.resume else contract.SWEEP
    with tracking.experiment_run(kind, config.experiment, config.run_name) as invocation:
        result = execute(config)
        return {"run_id": result["run_id"], "metrics": result["metrics"], "notes": result["notes"],
                "ui": tracking.ui_hint(invocation.info.experiment_id)}
