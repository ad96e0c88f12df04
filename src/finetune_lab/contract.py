"""What the experiments promise to write into a run, and what the report reads back: run kinds, artifact names,
metric lists, child-run names and the per-rank summary. One place, imported by both sides, so that the two can
never drift apart. Bottom of the stack: it imports nothing of the package."""

from __future__ import annotations

import pandas as pd

# Every top-level run says which experiment made it; the report sorts runs by this tag, never by guessing.
KIND_TAG = "finetune_lab.kind"
CLASSIFICATION, SWEEP, PROBE, GENERATE, REPORT = "classification", "sweep", "probe", "generate", "report"
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

# ---------------------------------------------------------------------------------------------- classify
PREDICTIONS_TABLE = "predictions.json"
CONFUSION_MATRIX = "confusion_matrix.json"
CONFUSION_FIGURE = "confusion_matrix.png"
CLASSIFICATION_REPORT = "classification_report.json"
CLASSIFY_METRICS = ["accuracy", "precision", "recall", "f1", "roc_auc", "eval_loss", *MEMORY_METRICS,
                    "train_runtime_s"]

# ---------------------------------------------------------------------------------------------- sweep
COMPARISON_TABLE = "comparison_table.json"
RANK_SUMMARY = "rank_summary.json"
LOSS_VS_RANK_FIGURE = "loss_vs_rank.png"
MEMORY_VS_RANK_FIGURE = "memory_vs_rank.png"
LOSS_CURVES_FIGURE = "loss_curves.png"
# Columns of the comparison table, in order; memory columns absent on CPU stay empty.
SWEEP_TABLE_METRICS = ["train_loss", "eval_loss", "eval_perplexity", "peak_cuda_mem_allocated_mb",
                       "peak_cuda_mem_reserved_mb", "peak_rss_mb", "train_tokens_per_s", "train_runtime_s",
                       "trainable_params", "adapter_size_bytes"]
# Averaged over seeds per rank in `rank_summary.json`.
SUMMARY_METRICS = ["train_loss", "eval_loss", "eval_perplexity", "peak_cuda_mem_allocated_mb", "peak_rss_mb",
                   "train_tokens_per_s"]
# Shown per child run in the report.
SWEEP_CHILD_METRICS = ["train_loss", "eval_loss", "eval_perplexity", *MEMORY_METRICS, "train_tokens_per_s",
                       "train_runtime_s"]
SWEEP_PARENT_METRICS = ["best_rank", "best_eval_loss", "failed_children"]


# The status, in the comparison table, of a planned child that never started (the sweep was stopped first).
NOT_RUN = "NOT_RUN"


def child_name(rank: int, seed: int) -> str:
    """The run name of a sweep child."""
    return f"r{rank}-seed{seed}"


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """`rank_summary.json`: per rank, mean and std over the seeds that finished (std empty for a single seed).
    `table` has one row per child with `rank`, `status` and the SUMMARY_METRICS."""
    finished = table[table["status"] == "FINISHED"]
    grouped = finished.groupby("rank")[SUMMARY_METRICS]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    summary.insert(0, "seeds", finished.groupby("rank").size())
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
