"""What the experiments promise to write into a run, and what the report reads back: run kinds, artifact names,
metric lists, child-run names and the per-rank summary. One place, imported by both sides, so that the two can
never drift apart. Bottom of the stack: it imports nothing of the package."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scripts' `--help` reads the kinds here (`entry_points`): pandas only once a summary is made
    import pandas as pd

# Every top-level run says which experiment made it; the report sorts runs by this tag, never by guessing.
KIND_TAG = "finetune_lab.kind"
CLASSIFICATION, PROBE, GENERATE, REPORT, BENCH = "classification", "probe", "generate", "report", "bench"
# The LoRA sweep's runs are tagged "sweep", the name they had in the store before the classifier sweep existed: stored
# runs and the report that reads them keep working.
LORA_SWEEP = "sweep"
CLASSIFY_SWEEP = "classify_sweep"
# The invocation that resumed an earlier parent run (`resume=...`); the parent it resumed is in RESUMED_TAG.
RESUME = "resume"
RESUMED_TAG = "finetune_lab.resumed_run_id"
# On parents and children: what they were made with, so that `resume` reuses only work done with the same.
CONFIG_DIGEST_TAG = "finetune_lab.config_digest"
DATA_DIGEST_TAG = "finetune_lab.data_digest"
# On a child recorded by `resume` from the results kept on local disk during a tracking outage: that folder.
RECOVERED_TAG = "finetune_lab.recovered_from"
ERROR_TAG = "error"
# The full traceback of an unexpected error, next to its one-line `error` tag.
ERROR_TRACEBACK = "error_traceback.txt"

CONFIG_ARTIFACT = "config.yaml"
# A LoRA child's adapter folder (PEFT config + weights + tokenizer, no base weights), and a registered model.
ADAPTER_ARTIFACT = "adapter"
MODEL_ARTIFACT = "model"

MEMORY_METRICS = ["peak_cuda_mem_allocated_mb", "peak_rss_mb"]
# A causal LM's per-example held-out record (`held_out`): each example's mean loss per target token and its number
# of target tokens, in held-out order, and the digest of the held-out split. A classifier's is its predictions
# table. The paired tests of the verdicts and of the registry's champion read them back.
EXAMPLE_LOSSES = "held_out_losses.json"

# ---------------------------------------------------------------------------------------------- classify
PREDICTIONS_TABLE = "predictions.json"
CONFUSION_MATRIX = "confusion_matrix.json"
CONFUSION_FIGURE = "confusion_matrix.png"
CLASSIFICATION_REPORT = "classification_report.json"
CLASSIFY_METRICS = ["accuracy", "precision", "recall", "f1", "roc_auc", "eval_loss", *MEMORY_METRICS,
                    "train_runtime_s"]

# ---------------------------------------------------------------------------------------------- classify_sweep
CONFIGURATION_SUMMARY = "configuration_summary.json"
METRICS_BY_CONFIGURATION_FIGURE = "metrics_by_configuration.png"
BEST_CONFUSION_FIGURE = "best_confusion_matrix.png"
BEST_CONFUSION_MATRIX = "best_confusion_matrix.json"
# Averaged over seeds per configuration; with the speed and memory columns, the comparison table's columns.
CLASSIFY_SWEEP_SUMMARY_METRICS = ["accuracy", "precision", "recall", "f1", "roc_auc", "eval_loss"]
CLASSIFY_SWEEP_TABLE_METRICS = [*CLASSIFY_SWEEP_SUMMARY_METRICS, "train_loss", *MEMORY_METRICS,
                                "train_samples_per_s", "train_runtime_s"]

# ---------------------------------------------------------------------------------------------- sweep
COMPARISON_TABLE = "comparison_table.json"
# A sweep parent's verdicts (`sweep.log_summary`): the lines, and their numbers; the report shows the same lines.
VERDICTS_TEXT = "verdicts.txt"
VERDICTS_RECORD = "verdicts.json"
# Tag: "true" when the best configuration is shown better than the runner-up (the `verdict` tag's line).
BEST_SHOWN_BETTER_TAG = "best_shown_better"
RANK_SUMMARY = "rank_summary.json"
LOSS_VS_RANK_FIGURE = "loss_vs_rank.png"
MEMORY_VS_RANK_FIGURE = "memory_vs_rank.png"
LOSS_CURVES_FIGURE = "loss_curves.png"
METHODS_FIGURE = "methods_by_rank.png"
# Columns of the comparison table after the method and rank, in order; memory columns absent on CPU stay empty.
SWEEP_TABLE_METRICS = ["train_loss", "eval_loss", "eval_perplexity", "peak_cuda_mem_allocated_mb",
                       "peak_cuda_mem_reserved_mb", "peak_rss_mb", "train_tokens_per_s", "train_runtime_s",
                       "train_step_ms_median", "trainable_params", "adapter_size_bytes"]
# Averaged over seeds per method and rank in `rank_summary.json`.
SUMMARY_METRICS = ["train_loss", "eval_loss", "eval_perplexity", "peak_cuda_mem_allocated_mb", "peak_rss_mb",
                   "train_tokens_per_s", "train_step_ms_median", "trainable_params", "adapter_size_bytes"]
# Shown per child run in the report.
SWEEP_CHILD_METRICS = ["train_loss", "eval_loss", "eval_perplexity", *MEMORY_METRICS, "train_tokens_per_s",
                       "train_runtime_s"]
SWEEP_PARENT_METRICS = ["best_rank", "best_configuration_eval_loss_mean", "best_eval_loss", "failed_children",
                        "sweep_wall_s", "child_train_s_sum"]


# ---------------------------------------------------------------------------------------------- search (asha)
# On the parent of a search: every trial's sampled values, state, steps and held-out values at its rungs; the held-out
# objective against steps for every trial.
SEARCH_TABLE = "search_table.json"
SEARCH_CURVES_FIGURE = "search_curves.png"
# On every trial: its number in the study, its sampled values (JSON, exact), whether it was stopped at a rung.
TRIAL_TAG = "finetune_lab.trial"
TRIAL_PARAMS_TAG = "finetune_lab.trial_params"
EARLY_STOPPED_TAG = "finetune_lab.early_stopped"
# A trial's full budget (the steps it would have trained unstopped).
BUDGET_METRIC = "budget_steps"
SEARCH_PARENT_METRICS = ["trials_finished", "trials_stopped_early", "trial_steps_trained", "trial_steps_full_budget",
                         "best_trial_number"]


def rung_metric(objective: str) -> str:
    """The metric a trial logs at each rung, by step: its held-out objective there (`rung_accuracy`)."""
    return f"rung_{objective}"


# The LoRA method of the rank sweep as it was before there were methods.
DEFAULT_LORA_METHOD = "lora"


def lora_label(method: str, rank: int) -> str:
    """A LoRA configuration's name in child-run names and the report: `r8` for plain LoRA, `dora-r8`."""
    return f"r{rank}" if method == DEFAULT_LORA_METHOD else f"{method}-r{rank}"


# The statuses of runs, as MLflow names them (`mlflow.entities.RunStatus`), and, in a sweep's comparison table, the
# status of a planned child that never started (the sweep was stopped first). Every module names a status by these.
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
NOT_RUN = "NOT_RUN"


def summarise(table: pd.DataFrame, by: list[str] | tuple[str, ...] = ("rank",),
              metrics: list[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """A sweep's summary (`rank_summary.json`, `configuration_summary.json`): per configuration (the columns `by`),
    the number of seeds that finished, and the mean and std over them of each of `metrics` (std empty for a single
    seed). `table` has one row per child with the columns `by`, `status` and the metrics."""
    finished = table[table["status"] == FINISHED]
    grouped = finished.groupby(list(by))[metrics]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    summary.insert(0, "seeds", finished.groupby(list(by)).size())
    return summary.reset_index()


# ---------------------------------------------------------------------------------------------- probe
BEFORE = "before"
PROBE_COMPARISON_TABLE = "probe_comparison.json"
TARGET_NLL_FIGURE = "target_nll_vs_repeats.png"
SIMILARITY_FIGURE = "similarity_vs_repeats.png"
PROBE_FIGURES = [TARGET_NLL_FIGURE, SIMILARITY_FIGURE]
# Measured by every probe child; the parent pairs each as `<name>_before` / `<name>_after`.
PROBE_MEASURED = ("target_nll", "target_nll_new_input", "rouge_l", "eval_loss")
# The parent's headline comparison.
PROBE_METRICS = ["target_nll_before", "target_nll_after", "target_nll_drop", "rouge_l_before", "rouge_l_after",
                 "replies_differ", "forgetting"]
PROBE_CHILD_METRICS = ["target_nll", "target_nll_new_input", "rouge_l", "eval_loss", "train_loss",
                       "new_example_copies_seen", *MEMORY_METRICS, "train_runtime_s"]


def after_name(repeats: int, sweep: bool) -> str:
    """The run name of a probe child trained with `repeats` copies of the new example."""
    return f"after-r{repeats}" if sweep else "after"


# ---------------------------------------------------------------------------------------------- bench
BENCH_TABLE = "bench_table.md"
BENCH_RESULTS = "bench_results.json"
BASELINE = "baseline"
# Logged by every variant's child run (`bench.summarise`); the ratios are to the baseline's value.
BENCH_METRICS = ["bench_tokens", "bench_examples", "bench_steps", "bench_train_s", "bench_wall_s",
                 "bench_tokens_per_s", "bench_steady_tokens_per_s", "bench_wall_tokens_per_s", "bench_examples_per_s",
                 "bench_step_ms_median", "bench_warmup_s", "bench_peak_rss_mb", "bench_flops_per_token",
                 "bench_attended_tokens"]
BENCH_RATIOS = {"bench_tokens_per_s": "bench_tokens_per_s_ratio",
                "bench_steady_tokens_per_s": "bench_steady_tokens_per_s_ratio",
                "bench_wall_tokens_per_s": "bench_wall_tokens_per_s_ratio"}


def variant_name(workload: str, variant: str) -> str:
    """The run name of a bench variant."""
    return f"{workload}:{variant}"
