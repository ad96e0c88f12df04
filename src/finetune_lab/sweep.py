"""Experiment: LoRA rank sweep. One parent run; one child run per rank x seed on the same frozen base,
the same tokenized data and the same held-out split; then a comparison table, a per-rank summary
(mean ± std over seeds), plots and the best rank on the parent.

Recipe: prepare (config, data, model, architecture checks) → tokenize once →
children through an executor (`executors`: base loaded once per process; fresh adapter each; a failing child is
recorded and the sweep goes on) → summarise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import datasets
import mlflow
import pandas as pd
import torch

from finetune_lab import causal_lm, contract, executors, lora, models, plots, prompts, registry, tracking
from finetune_lab import data as data_lib
from finetune_lab.config import SweepConfig, as_params
from finetune_lab.contract import child_name
from finetune_lab.data import TEST, TRAIN

# A prompt every registered adapter is checked and exemplified on.
PROBE_PROMPT = "Hello, how are you?"


@dataclass
class ChildOutcome:
    rank: int
    seed: int
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""
    reference_logits: list[torch.Tensor] = field(default_factory=list)
    """The trained model's logits on the registry's check texts (only when registering)."""

    @property
    def name(self) -> str:
        return child_name(self.rank, self.seed)


def run_child(base, tokenizer, tokenized, config: SweepConfig, rank: int, seed: int, check_texts: list[str],
              position: str = "", run_id: str = "") -> ChildOutcome:
    """Train one adapter in its own child run; a failure ends that run FAILED and is returned, not raised.
    `check_texts`: texts whose logits are kept for verifying a registry reload (empty = keep none); `position`: its
    place in the sweep for the console, like `[2/4]`; `run_id`: the child run the driver made for it (a worker
    process), else a new nested run."""
    try:
        with tracking.child_run(child_name(rank, seed), run_id) as child, lora.adapter(base, config, rank, seed) as model:
            run_id = child.info.run_id
            params = lora.lora_params(model, config, rank, seed)
            tracking.log_params(params)  # first: the effective lora_alpha wins over the config's 0 = "per rank"
            tracking.log_config(as_params(config))
            fitted = causal_lm.fit(model, tokenizer, tokenized[TRAIN], tokenized[TEST], config, seed, run_id,
                                   f"{position} {child_name(rank, seed)}".strip())
            logged = {**fitted.metrics, "trainable_params": lora.trainable_params(model),
                      "adapter_size_bytes": lora.log_adapter(model, tokenizer)}
            mlflow.log_metrics(logged)
            reference = registry.reference_logits(model, tokenizer, check_texts)
            return ChildOutcome(rank, seed, run_id, "FINISHED", {**logged, "train_loss": fitted.train_loss},
                                fitted.curve, reference_logits=reference)
    except Exception as error:  # noqa: BLE001 - OOM, NaN loss, anything: record it and go on with the sweep
        return ChildOutcome(rank, seed, run_id, "FAILED", error=tracking.one_line(error))


@dataclass(frozen=True)
class Child:
    """One rank x seed of the sweep, as handed to an executor."""

    rank: int
    seed: int
    position: str = ""
    """Its place in the sweep, like `[2/4]`, for the console."""

    @property
    def name(self) -> str:
        return child_name(self.rank, self.seed)

    def failed(self, run_id: str, error: str) -> ChildOutcome:
        """The outcome of a child that could not finish where it was sent (e.g. its worker died)."""
        return ChildOutcome(self.rank, self.seed, run_id, "FAILED", error=error)


@dataclass
class Workload:
    """What every child of a sweep shares: sent once to each process that trains children."""

    config: SweepConfig
    source: models.ModelSource
    tokenized: datasets.DatasetDict
    check_texts: list[str]

    def __getstate__(self) -> dict:
        # Pickled for worker processes, maybe on other machines: carry the rows, not paths to this machine's
        # dataset cache files (which is how a file-backed Dataset pickles).
        tokenized = datasets.DatasetDict({name: split.flatten_indices(keep_in_memory=True) if split.cache_files
                                          else split for name, split in self.tokenized.items()})
        return {**self.__dict__, "tokenized": tokenized}


class ChildTrainer:
    """The frozen base loaded once, in the process that trains the children; then one child after another, each
    with a fresh adapter that is detached afterwards."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self.base, self.tokenizer = causal_lm.load_base(workload.source)

    def __call__(self, child: Child, run_id: str = "") -> ChildOutcome:
        w = self.workload
        return run_child(self.base, self.tokenizer, w.tokenized, w.config, child.rank, child.seed, w.check_texts,
                         child.position, run_id)


def comparison_table(children: list[ChildOutcome]) -> pd.DataFrame:
    rows = [
        {"rank": c.rank, "seed": c.seed, **{m: c.metrics.get(m) for m in contract.SWEEP_TABLE_METRICS},
         "status": c.status,
         "run_id": c.run_id, "error": c.error}
        for c in children
    ]
    return pd.DataFrame(rows)


def best_child(table: pd.DataFrame, summary: pd.DataFrame) -> pd.Series:
    """The rank with the lowest mean eval loss, and its child with the lowest eval loss."""
    best_rank = int(summary.loc[summary["eval_loss_mean"].idxmin(), "rank"])
    finished = table[(table["status"] == "FINISHED") & (table["rank"] == best_rank)]
    return finished.loc[finished["eval_loss"].idxmin()]


def log_summary(children: list[ChildOutcome]) -> dict:
    """Comparison table, per-rank summary, plots, best rank and failures on the parent run."""
    table = comparison_table(children)
    mlflow.log_table(table, contract.COMPARISON_TABLE)
    failed = table[table["status"] != "FINISHED"]
    mlflow.log_metric("failed_children", len(failed))
    if len(failed):
        mlflow.set_tag("failed_children", "; ".join(f"{child_name(r.rank, r.seed)}: {r.error}"
                                                     for r in failed.itertuples()))
    if len(failed) == len(table):
        raise RuntimeError(f"all {len(table)} child runs failed; first error: {failed.iloc[0]['error']}")
    summary = contract.summarise(table)
    mlflow.log_table(summary, contract.RANK_SUMMARY)
    for row in summary.itertuples():
        mlflow.log_metrics({"eval_loss_by_rank": row.eval_loss_mean, "train_loss_by_rank": row.train_loss_mean},
                           step=int(row.rank))
    plots.log_figure(plots.loss_vs_rank(summary), contract.LOSS_VS_RANK_FIGURE)
    memory = plots.memory_vs_rank(summary)
    if memory is not None:
        plots.log_figure(memory, contract.MEMORY_VS_RANK_FIGURE)
    plots.log_figure(plots.loss_curves({c.name: c.curve for c in children}), contract.LOSS_CURVES_FIGURE)
    best = best_child(table, summary)
    mlflow.log_metrics({"best_rank": int(best["rank"]), "best_eval_loss": float(best["eval_loss"])})
    mlflow.set_tags({"best_rank": str(int(best["rank"])), "best_run_id": best["run_id"]})
    return {"table": table, "summary": summary, "best": best}


def registry_check_texts(prepared: causal_lm.Prepared, tokenizer, config: SweepConfig) -> list[str]:
    """Prompts on which a registered adapter must reproduce the trained model's logits exactly."""
    held_out = prepared.data.splits[TEST][0][config.input_column]
    return [prompts.prompt_text(tokenizer, text, config.prompt_format) for text in (held_out, PROBE_PROMPT)]


def register_best(config: SweepConfig, prepared: causal_lm.Prepared, best: ChildOutcome,
                  check_texts: list[str]) -> dict:
    """Register the best child's adapter (adapter files + base reference) after a verified reload."""
    parent_run_id = mlflow.active_run().info.run_id
    with tracking.scratch_dir("register") as scratch:
        adapter_dir = mlflow.artifacts.download_artifacts(
            run_id=best.run_id, artifact_path=contract.ADAPTER_ARTIFACT, dst_path=str(scratch)
        )
        candidate = registry.Candidate(
            log=lambda: registry.log_adapter_model(adapter_dir, prepared.source, config.prompt_format,
                                                   registry.DEFAULT_MAX_NEW_TOKENS, PROBE_PROMPT),
            check_texts=check_texts,
            expected_logits=best.reference_logits,
            eval_loss=best.metrics["eval_loss"],
            eval_set_digest=prepared.data.eval_digest,
            tags={"rank": str(best.rank), "seed": str(best.seed), "run_id": best.run_id,
                  "parent_run_id": parent_run_id, "dataset_digest": prepared.data.digest,
                  "base_model": prepared.source.spec, "base_revision": prepared.source.revision},
        )
        return registry.register_verified(config.register_as, candidate, parent_run_id)


def run(config: SweepConfig) -> dict:
    """The whole sweep inside one parent run; return the parent's id, the best child and the tables."""
    with tracking.experiment_run(contract.SWEEP, config.experiment, config.run_name) as parent:
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
        tokenizer = causal_lm.load_tokenizer(prepared.source)
        tokenized = causal_lm.tokenize(prepared.data.splits, tokenizer, config)
        check_texts = registry_check_texts(prepared, tokenizer, config) if config.register_as else []
        trainer = functools.partial(ChildTrainer, Workload(config, prepared.source, tokenized, check_texts))
        grid = [(rank, seed) for seed in config.seeds for rank in config.ranks]
        planned = [Child(rank, seed, f"[{k}/{len(grid)}]") for k, (rank, seed) in enumerate(grid, start=1)]
        # Executors give outcomes as children end (in any order); the table keeps the planned order.
        ended = {outcome.name: outcome for outcome in executors.run_children(config, trainer, planned)}
        children = [ended[child.name] for child in planned]
        outcome = log_summary(children)
        best = outcome["best"]
        registered = []
        if config.register_as:
            chosen = next(c for c in children if c.run_id == best["run_id"])
            result = register_best(config, prepared, chosen, check_texts)
            registered = [f"registered {result['model_uri']} (champion {result['decision']})"]
        notes = [f"  {c.name:<14} {c.status:<9} " + (f"eval_loss {c.metrics['eval_loss']:.4f}" if c.metrics else c.error)
                 for c in children]
        return {
            "run_id": parent.info.run_id,
            "metrics": {"best_rank": int(best["rank"]), "best_eval_loss": float(best["eval_loss"])},
            "notes": ["children:", *notes, f"best child run: {best['run_id']}", *registered],
            "ui": tracking.ui_hint(parent.info.experiment_id),
        }
