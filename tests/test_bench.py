"""The bench's parts that need no training: synthetic lengths, the summary of a variant's trainings, the
problems it reports, all at once, before any weights are loaded."""

from __future__ import annotations

import math
import statistics

import pytest
from click.testing import CliRunner
from support.paths import entrypoint
from support.store import runs_of

from finetune_lab import causal_lm
from finetune_lab.config import BenchConfig
from finetune_lab.experiments import bench


def test_synthetic_data_has_the_stated_lengths():
    config = BenchConfig(classify_examples=4000, lora_examples=4000, eval_examples=1000)
    texts = bench.synthetic_frame("classify", config)
    words = texts["text"].str.split().str.len() + 2  # [CLS] and [SEP]
    assert len(texts) == 5000 and texts["split"].value_counts().to_dict() == {"train": 4000, "test": 1000}
    assert words.between(32, 512).all() and statistics.median(words) == pytest.approx(230, rel=0.05)
    assert set(texts["label"]) == {0, 1}
    assert {w for text in texts["text"] for w in text.split()} <= set(bench.WORDS)
    pairs = bench.synthetic_frame("lora_sweep", config)
    total = pairs["input"].str.split().str.len() + pairs["output"].str.split().str.len() + 2  # newline, EOS
    assert total.between(8, 256).all() and statistics.median(total) == pytest.approx(40, rel=0.05)
    short = bench.synthetic_frame("lora_sweep", BenchConfig(lora_max_length=48))
    assert (short["input"].str.split().str.len() + short["output"].str.split().str.len() + 2).max() <= 48


def test_a_variant_sums_its_trainings_and_weighs_steady_speed_by_tokens():
    first = {"train_tokens": 1000.0, "train_examples": 10.0, "train_steps": 5.0, "train_runtime_s": 2.0,
             "train_step_ms_median": 300.0, "warmup_s": 0.5, "steady_tokens_per_s": 800.0, "peak_rss_mb": 900.0,
             "compile_s": 0.4, "compile_graphs": 2.0, "logging_ms_per_step": 1.0, "logging_flush_s": 0.02}
    second = {"train_tokens": 3000.0, "train_examples": 30.0, "train_steps": 15.0, "train_runtime_s": 4.0,
              "train_step_ms_median": 500.0, "warmup_s": 0.1, "steady_tokens_per_s": 1000.0, "peak_rss_mb": 950.0,
              "logging_ms_per_step": 3.0, "logging_flush_s": 0.03}
    summary = bench.summarise([(first, 6e6), (second, 8e6)], wall_s=10.0, peak_flops=1e12)
    assert summary["bench_tokens"] == 4000 and summary["bench_examples"] == 40 and summary["bench_steps"] == 20
    assert summary["bench_tokens_per_s"] == pytest.approx(4000 / 6) and summary["bench_wall_tokens_per_s"] == 400
    steady_s = 1000 / 800 + 3000 / 1000  # each training's tokens at its own steady rate
    assert summary["bench_steady_tokens_per_s"] == pytest.approx(4000 / steady_s)
    assert summary["bench_flops_per_token"] == pytest.approx((6e6 * 1000 + 8e6 * 3000) / 4000)
    assert summary["bench_mfu"] == pytest.approx(summary["bench_flops_per_token"] * 4000 / steady_s / 1e12)
    assert summary["bench_step_ms_median"] == 400 and summary["bench_warmup_s"] == pytest.approx(0.6)
    assert summary["bench_compile_s"] == 0.4 and summary["bench_compile_graphs"] == 2
    assert summary["bench_peak_rss_mb"] == 950
    assert summary["bench_logging_ms_per_step"] == pytest.approx((1.0 * 5 + 3.0 * 15) / 20), "per step trained"
    assert summary["bench_logging_flush_s"] == pytest.approx(0.05)
    assert "bench_peak_cuda_mem_allocated_mb" not in summary
    unlogged = {k: v for k, v in first.items() if not k.startswith("logging_")}  # the baseline's
    assert "bench_mfu" not in bench.summarise([(first, 6e6)], 10.0, peak_flops=None)
    assert "bench_logging_ms_per_step" not in bench.summarise([(unlogged, 6e6)], 10.0, peak_flops=None)


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 NVL", 835),
                                          ("NVIDIA H200 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("Tesla T4", 65)])
def test_peak_flops_are_known_for_the_cards_people_have(name, tflops):
    assert bench.peak_flops(BenchConfig(), name) == (tflops * 1e12, "")
    assert bench.peak_flops(BenchConfig(peak_tflops=100), name) == (100e12, ""), "the config's own figure wins"


def test_an_unknown_card_gets_no_mfu_and_a_note_saying_why():
    peak, note = bench.peak_flops(BenchConfig(), "NVIDIA GeForce RTX 4090")
    assert peak is None and note.startswith("MFU left empty: no peak FLOP/s is known for NVIDIA GeForce RTX 4090")
    assert "peak_tflops" in note and bench.peak_flops(BenchConfig(), "cpu")[0] is None
    assert bench.table([], [note]).endswith(f"\n\n{note}\n")


def test_every_variant_trains_every_example_or_the_config_is_refused():
    """A compiled classifier drops an epoch's last, smaller batch: the examples must fill every batch size."""
    assert bench.check(BenchConfig(classify_examples=1600, large_batch=64)) == []
    assert bench.check(BenchConfig(classify_examples=1600, large_batch=48)) == [
        "classify_examples: must be a multiple of 16 and 48 (the batch sizes), so that every variant trains every "
        "example, got 1600"]
    assert bench.check(BenchConfig(workloads="lora_sweep", classify_examples=1601)) == [], "classify is not run"


def test_problems_of_the_derived_workload_configs_are_named_after_the_bench_fields_that_set_them():
    config = BenchConfig(classify_max_length=4, lora_ranks=(0, 4), lora_target_modules=" ", seed=-1, large_batch=48,
                         variants="baseline,project_large")
    assert bench.check(config) == [
        "seed: must be in 0..4294967295, got -1",  # the bench's own, and the same line of every workload's
        "classify_max_length: must be >= 8, got 4",
        "classify_examples: must be a multiple of 16 and 48 (the batch sizes), so that every variant trains every "
        "example, got 1600",
        "lora_target_modules: must be `all-linear` or a comma list of module names",
        "lora_ranks: must be integers >= 1, got 0,4",
    ]
    assert bench.check(BenchConfig(workloads="classify", lora_ranks=(0,))) == [], "lora_sweep is not run"


def test_flops_per_token_follow_the_stated_formula():
    workload = bench.BenchWorkload("lora_sweep", None, None, None, None, linear_params=1000, layers=2, hidden=8,
                              attended=10.0)
    assert workload.flops_per_token(adapter_params=50) == 4 * 1000 + 6 * 50 + 12 * 2 * 8 * 10
    workload.name = "classify"
    assert workload.flops_per_token() == 6 * 1000 + 12 * 2 * 8 * 10


def test_shown_numbers():
    assert [bench.shown("bench_tokens_per_s", v) for v in (93456.7, 12.345, 0.0)] == ["93457", "12.3", "0"]
    assert bench.shown("bench_tokens_per_s_ratio", 25.04) == "25.04×" and bench.shown("bench_mfu", 0.2512) == "25.1 %"
    assert bench.shown("bench_mfu", None) == "–"
    assert math.isclose(float(bench.shown("bench_wall_s", 1234.4)), 1234)


def test_bad_bench_input_is_reported_all_at_once_before_any_weights(client, no_weights_loaded):
    outcome = CliRunner().invoke(entrypoint("bench").main, [
        "--experiment", "bad-bench", "--variants", "baseline,turbo", "--tiny", "maybe", "--peak-tflops", "-1",
        "--large-batch-tokens", "100", "--classify-examples", "0", "--precision", "fp16"])
    assert outcome.exit_code == 2, outcome.output
    errors = sorted(line for line in outcome.output.splitlines() if line.startswith("error: "))
    assert errors == [
        "error: classify_examples: must be >= 1, got 0",
        "error: peak_tflops: must be >= 0 (0 = known from the device name), got -1.0",
        "error: precision: fp16 trains only on a CUDA GPU, and this process sees none (on a CPU the Trainer would "
        "silently train in fp32: accelerate neither autocasts to fp16 nor scales the loss there); use bf16 or fp32 on "
        "a CPU",
        "error: tiny: must be true or false, got 'maybe'",
        "error: variants: must be a comma list of baseline, project, project_large, dynamic_padding, compile_buckets, "
        "got 'baseline,turbo'",
    ]
    outcome = CliRunner().invoke(entrypoint("bench").main, [
        "--experiment", "bad-bench", "--large-batch-tokens", "100", "--lora-max-length", "128"])
    assert "error: large_batch_tokens: must be 0 (= batch_size examples) or at least max_length (128)" in outcome.output
    (_, run) = runs_of(client, "bad-bench")
    assert run.info.status == "FAILED" and "large_batch_tokens" in run.data.tags["error"]


def test_data_and_model_problems_of_every_workload_come_together(client, no_weights_loaded, tmp_path):
    outcome = CliRunner().invoke(entrypoint("bench").main, [
        "--experiment", "bad-bench", "--tiny", "true", "--lora-dataset", str(tmp_path / "missing.jsonl"),
        "--classify-dataset", "sample_chat"])
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("error: ")]
    assert any(e.startswith("error: classify_text_column: column 'text' not in the dataset") for e in errors), errors
    assert f"error: lora_dataset: file '{tmp_path / 'missing.jsonl'}' not found" in errors


def test_every_variant_trains_the_same_examples_of_a_real_lora_dataset(tmp_path):
    """A real `lora_dataset` cut to `lora_examples`: the baseline trains the prepared splits, the project's variants
    prepare their config's dataset again; both must be the same examples."""
    config = BenchConfig(tiny=True, workloads="lora_sweep", lora_dataset="sample_chat").effective()
    (workload,) = bench.prepare(config, tmp_path)
    assert len(workload.prepared.data.splits["train"]) == config.lora_examples == 32
    project = bench.variant_config(workload.name, workload.config, "project", config)
    again = causal_lm.prepare(project, project.ranks, config.seed)
    assert again.data.digest == workload.prepared.data.digest
    assert again.data.eval_digest == workload.prepared.data.eval_digest
