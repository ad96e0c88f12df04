"""`bench`: how fast the project trains, as a ratio against the reference baseline, measured in one process on
one device on the same data.

Workloads: `classify` (sequence classification; default a full-size DistilBERT-base with random weights on texts
of IMDB-like token lengths) and `lora_sweep` (a 4-rank LoRA sweep; default a full-size SmolLM2-135M with random
weights on chat pairs of chat-like lengths). Variants, run one after another, each training every example of its
workload once (per rank for LoRA: one epoch), so that every variant does the same work and a ratio of times is the
time for that work:
- `baseline`: the reference recipe. fp32 weights, eager attention, every batch padded to max_length, adamw_torch, fixed
  batches (16 / 8) in random order, held-out evaluation with `Trainer.evaluate`; LoRA on one base loaded once. Its
  steps are logged as the project logs them (`training.MlflowStepLogger`), so that both pay the same for it.
- `project`: the entry point's own code path (`classify.execute`, `lora_sweep.execute`) with its defaults, in the
  bench's `precision`.
- `project_large`: the same with larger batches (`large_batch` examples; `large_batch_tokens` per LoRA batch).
- `dynamic_padding`: the project without compilation or packing (what it was before them).
- `compile_buckets`: `classify` compiled for a few bucket lengths instead of one symbolic length.
Every training reports the same measurements (`training.train`): real tokens (padding excluded), examples, step
times, warm-up and compile time (and graphs), what logging the steps cost the training loop, peak memory. A
variant sums them over its trainings (the sweep's ranks) and adds its wall time (loading, tokenization,
evaluation, logging: everything), then MFU and ratios to `baseline`. The device is warmed up before the first
variant (CUDA's start-up is nobody's cost) and every variant compiles in a fresh, empty inductor cache.

MFU = model FLOPs per real token x steady real tokens per second / the device's peak dense bf16 FLOP/s. FLOPs per
token follow PaLM (Chowdhery et al. 2022, app. B), as torchtitan does: each weight of a matrix multiply costs 2
FLOPs forward, 2 for the input gradient and 2 for its own gradient, so 6 for a trained weight and 4 for a frozen
one (the LoRA base); attention scores and their weighted sum cost 12 x layers x hidden size x T per token, with T
the tokens the token's example holds (token-weighted over the data: sum T^2 / sum T, whatever the padding or
packing; causal masking not discounted). Embedding lookups are not multiplies; a tied output head is. The same
useful work is credited to every variant, so the fp32 baseline's MFU is also measured against the peak of the
device's training precision (bf16; fp16 on a GPU without bf16).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from finetune_lab import causal_lm, contract, device, lora, models, tracking, training
from finetune_lab import data as data_lib
from finetune_lab.config import SYNTHETIC, BenchConfig, ClassifyConfig, LoraSweepConfig, TrainingConfig
from finetune_lab.contract import BASELINE, variant_name
from finetune_lab.data import TEST, TRAIN
from finetune_lab.errors import InputError, field_of, one_line, problem, raise_if_any
from finetune_lab.experiments import classify, lora_sweep
from finetune_lab.prompts import IGNORE_INDEX
from finetune_lab.schema import as_params

CLASSIFY, LORA_SWEEP = "classify", "lora_sweep"
# Common English words that are one token each for the BERT-uncased and SmolLM2 tokenizers (after a space), so a
# synthetic text of n words has about n tokens.
WORDS = tuple("""the a of and to in is was it for on with as his at by he film movie story time good bad great best
people very just like well one all would there their what so out about more up when who she them then than only
some could make even after first also made new way any years most life love young old man world work back over
think see still real right never show plot scene music actor""".split())
# Dense peak TFLOP/s in the training precision by device name, first match wins (torchtitan's `get_peak_flops`;
# NVIDIA's data sheets): bf16, and fp16 for the T4, which has no bf16 (`device.precision`).
PEAK_TFLOPS = (("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
               ("A100", 312.0), ("T4", 65.0))


@dataclass(frozen=True)
class Lengths:
    """Token lengths drawn from a lognormal distribution, rounded and clipped."""

    median: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: np.random.Generator, count: int, max_length: int) -> list[int]:
        drawn = np.round(rng.lognormal(math.log(self.median), self.sigma, count))
        return [int(n) for n in np.clip(drawn, self.low, min(self.high, max_length))]


IMDB_LIKE = Lengths(median=230, sigma=0.7, low=32, high=512)
CHAT_LIKE = Lengths(median=40, sigma=0.6, low=8, high=256)


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join(rng.choice(WORDS, size=max(count, 1)))


def synthetic_frame(workload: str, config: BenchConfig) -> pd.DataFrame:
    """The workload's training examples + `eval_examples` rows with a `split` column, in the workload's columns.
    `classify`: texts of IMDB-like token lengths ([CLS] and [SEP] included) with random labels; `lora_sweep`:
    input/output pairs of chat-like total lengths (a third input; newline and EOS included)."""
    rng = np.random.default_rng(config.seed)
    trained = config.classify_examples if workload == CLASSIFY else config.lora_examples
    count = trained + config.eval_examples
    split = [TRAIN] * trained + [TEST] * config.eval_examples
    columns = config.derive(workload)
    if workload == CLASSIFY:
        lengths = IMDB_LIKE.sample(rng, count, columns.max_length)
        return pd.DataFrame({columns.text_column: [_words(rng, n - 2) for n in lengths],
                             columns.label_column: rng.integers(0, 2, count).tolist(), "split": split})
    lengths = CHAT_LIKE.sample(rng, count, columns.max_length)
    inputs = [max(1, round(n / 3)) for n in lengths]
    return pd.DataFrame({columns.input_column: [_words(rng, n) for n in inputs],
                         columns.output_column: [_words(rng, n - i - 2) for n, i in zip(lengths, inputs)],
                         "split": split})


# ------------------------------------------------------------------------------------------- workloads


@dataclass
class BenchWorkload:
    """One workload: the entry point's config (the `project` variant's), its checked data and model, the data
    tokenized once (for the baseline and the FLOP count), and the model's FLOPs per token."""

    name: str
    config: ClassifyConfig | LoraSweepConfig
    prepared: classify.PreparedClassification | causal_lm.PreparedCausalLM
    tokenizer: object
    tokenized: object
    linear_params: int
    """Weights of the model's matrix multiplies (nn.Linear), output head included."""
    layers: int
    hidden: int
    attended: float
    """Token-weighted mean tokens per example of the training split: sum T^2 / sum T."""

    def flops_per_token(self, adapter_params: int = 0) -> float:
        """Training FLOPs per real token (see the module doc): full fine-tuning, or a frozen base with
        `adapter_params` trained LoRA weights."""
        if self.name == CLASSIFY:
            return 6 * self.linear_params + 12 * self.layers * self.hidden * self.attended
        return 4 * self.linear_params + 6 * adapter_params + 12 * self.layers * self.hidden * self.attended


# What a variant changes in its workload's config: fields that one of the bench's sets (its problems are reported
# under that name), then fixed settings.
VARIANT_SET_BY = {"project_large": {CLASSIFY: {"batch_size": "large_batch"},
                                    LORA_SWEEP: {"batch_tokens": "large_batch_tokens"}}}
VARIANT_SETTINGS = {"dynamic_padding": {CLASSIFY: {"compile": "off"}, LORA_SWEEP: {"packing": "off"}},
                    "compile_buckets": {CLASSIFY: {"compile_shapes": training.BUCKETS}}}


def set_by_variant(workload: str, variant: str) -> dict[str, str]:
    """The fields of the workload's config that the variant sets from the bench's: field → the bench's field."""
    return VARIANT_SET_BY.get(variant, {}).get(workload, {})


def variant_config(workload: str, project_config: ClassifyConfig | LoraSweepConfig, variant: str,
                   config: BenchConfig) -> ClassifyConfig | LoraSweepConfig:
    """The workload's config as a variant runs it (`project_config`: the `project` variant's)."""
    return dataclasses.replace(project_config, **config.values(workload, set_by_variant(workload, variant)),
                               **VARIANT_SETTINGS.get(variant, {}).get(workload, {}))


def _every_example_trained(config: BenchConfig, batch_sizes: set[int]) -> list[str]:
    """A compiled classifier drops an epoch's last, smaller batch: every batch size must divide the examples."""
    if all(config.classify_examples % size == 0 for size in batch_sizes):
        return []
    sizes = " and ".join(map(str, sorted(batch_sizes)))
    return [problem("classify_examples", f"must be a multiple of {sizes} (the batch sizes), so that every variant "
                                         f"trains every example, got {config.classify_examples}")]


def check(config: BenchConfig) -> list[str]:
    """Every problem of the bench's config (and of its precision on this device) and of the configs it derives for
    each workload and variant (those named after the bench's fields), before any data or model is read."""
    problems = [*config.problems(), *device.precision_problems(config.precision, device.detect())]
    if any(field_of(p) in ("workloads", "variants") for p in problems):
        return problems
    for name in config.workload_list:
        project = config.derive(name)
        variants = {variant: variant_config(name, project, variant, config) for variant in config.variant_list}
        for variant, variant_cfg in variants.items():
            named = config.named(variant_cfg.problems(), name, set_by_variant(name, variant))
            problems += [p for p in named if p not in problems]
        if name == CLASSIFY:
            problems += _every_example_trained(config, {variant.batch_size for variant in variants.values()})
    return problems


def prepare(config: BenchConfig, scratch: Path) -> list[BenchWorkload]:
    """Every workload's data and model checked (the synthetic data made first) before any weights are loaded;
    raise InputError with every problem of every workload, under the bench's field names."""
    problems, checked = [], []
    for name in config.workload_list:
        project = config.derive(name)
        if project.dataset == SYNTHETIC:
            project = dataclasses.replace(project, dataset=str(scratch / f"{name}.jsonl"))
            synthetic_frame(name, config).to_json(project.dataset, orient="records", lines=True)
        try:
            if name == CLASSIFY:
                prepared = classify.prepare(project)
            else:
                project, prepared = _lora_examples(project, causal_lm.prepare(project, project.ranks, config.seed),
                                                   config, scratch)
        except InputError as error:
            problems += config.named(error.problems, name)
            continue
        checked.append((name, project, prepared))
    raise_if_any(problems)
    return [_tokenized(name, project, prepared) for name, project, prepared in checked]


def _lora_examples(project: LoraSweepConfig, prepared: causal_lm.PreparedCausalLM, config: BenchConfig, scratch: Path
                   ) -> tuple[LoraSweepConfig, causal_lm.PreparedCausalLM]:
    """The LoRA workload on its first `lora_examples` training examples (after a seeded shuffle), for every variant:
    the baseline trains on the prepared splits, the project's variants prepare them again from their config's
    dataset. So when the data has more, the splits as cut are written to a file of `scratch` (with a `split`
    column) and the workload's dataset is that file."""
    limited = data_lib.limit(prepared.data, {TRAIN: config.lora_examples}, config.seed)
    if limited is prepared.data:
        return project, prepared
    path = scratch / f"{LORA_SWEEP}.jsonl"
    pd.concat([split.to_pandas().assign(**{data_lib.SPLIT_COLUMN: key}) for key, split in limited.splits.items()]
              ).to_json(path, orient="records", lines=True)
    project = dataclasses.replace(project, dataset=str(path))
    return project, causal_lm.prepare(project, project.ranks, config.seed)


def _tokenized(name: str, project, prepared) -> BenchWorkload:
    if name == CLASSIFY:
        tokenizer = models.load_tokenizer(prepared.source)
        tokenized = classify.tokenize(prepared, tokenizer, project)
        skeleton = models.skeleton(prepared.source, AutoModelForSequenceClassification)
    else:
        tokenizer = causal_lm.load_tokenizer(prepared.source)
        tokenized = causal_lm.tokenize(prepared.data.splits, tokenizer, project)
        skeleton = models.skeleton(prepared.source, AutoModelForCausalLM)
    lengths = np.asarray(tokenized[TRAIN]["length"], dtype=np.float64)
    linear = sum(m.in_features * m.out_features for m in skeleton.modules() if isinstance(m, torch.nn.Linear))
    return BenchWorkload(name, project, prepared, tokenizer, tokenized, linear, skeleton.config.num_hidden_layers,
                    skeleton.config.hidden_size, float((lengths ** 2).sum() / lengths.sum()))


# ------------------------------------------------------------------------------------------- variants


def reference_arguments(output_dir: Path, config: TrainingConfig, seed: int) -> TrainingArguments:
    """The reference recipe's Trainer settings: fp32, adamw_torch, fixed batches in random order, the epochs (or steps)
    of `config`; its steps logged as the project's are (`training.STEP_LOGGING`)."""
    return TrainingArguments(output_dir=str(output_dir), learning_rate=config.learning_rate,
                             max_steps=config.max_steps or -1, num_train_epochs=config.epochs,
                             per_device_train_batch_size=config.batch_size,
                             per_device_eval_batch_size=config.batch_size, optim="adamw_torch", seed=seed,
                             report_to="none", save_strategy="no", eval_strategy="no", **training.STEP_LOGGING)


def baseline(workload: BenchWorkload, seed: int, scratch: Path) -> list[tuple[dict, float]]:
    """The reference recipe on the workload: (training metrics, FLOPs per token) per training (per rank for LoRA)."""
    config, source = workload.config, workload.prepared.source
    reference_settings = {"dtype": torch.float32, "attn_implementation": "eager"}
    run_id = mlflow.active_run().info.run_id
    tracking.log_params({"effective_precision": device.FP32, "attention": "eager", "padding": "max_length",
                         "optimizer": "adamw_torch", "batch_size": config.batch_size, "max_length": config.max_length,
                         "max_steps": config.max_steps, **models.source_params(source)})
    arguments = reference_arguments(scratch, config, seed)
    if workload.name == CLASSIFY:
        model = AutoModelForSequenceClassification.from_pretrained(
            source.path, num_labels=len(workload.prepared.classes), **reference_settings)
        model.config.pad_token_id = workload.tokenizer.pad_token_id
        collator = DataCollatorWithPadding(workload.tokenizer, padding="max_length", max_length=config.max_length)
        trainer = training.step_logged(Trainer(model=model, args=arguments, train_dataset=workload.tokenized[TRAIN],
                                               eval_dataset=workload.tokenized[TEST], data_collator=collator,
                                               processing_class=workload.tokenizer), run_id)
        metrics = training.train(trainer)
        trainer.evaluate()
        return [(metrics, workload.flops_per_token())]
    base = AutoModelForCausalLM.from_pretrained(source.path, **reference_settings)
    base.config.pad_token_id = workload.tokenizer.pad_token_id
    collator = DataCollatorForSeq2Seq(workload.tokenizer, padding="max_length", max_length=config.max_length,
                                      label_pad_token_id=IGNORE_INDEX)
    trained = []
    for rank in config.ranks:
        with lora.adapter(base, config, rank, seed) as model:
            trainer = training.step_logged(Trainer(model=model, args=arguments,
                                                   train_dataset=workload.tokenized[TRAIN],
                                                   eval_dataset=workload.tokenized[TEST], data_collator=collator,
                                                   processing_class=workload.tokenizer), run_id)
            metrics = training.train(trainer)
            trainer.evaluate()
            trained.append((metrics, workload.flops_per_token(model.get_nb_trainable_parameters()[0])))
    return trained


def project(workload: BenchWorkload, config: ClassifyConfig | LoraSweepConfig) -> list[tuple[dict, float]]:
    """The entry point's own path, run inside the variant's run (a sweep's children nest under it)."""
    if workload.name == CLASSIFY:
        return [(classify.execute(config)["training"], workload.flops_per_token())]
    children = lora_sweep.execute(config)["children"]
    failed = [c for c in children if c.status != contract.FINISHED]
    if failed:
        raise RuntimeError(f"{len(failed)} of the sweep's {len(children)} children failed; first: "
                           f"{failed[0].name}: {failed[0].error}")
    return [(c.metrics, workload.flops_per_token(int(c.metrics["trainable_params"]))) for c in children]


def summarise(trainings: list[tuple[dict, float]], wall_s: float, peak_flops: float | None) -> dict[str, float]:
    """A variant's metrics from its trainings' (metrics, FLOPs per token): sums, the median of the median step
    times, steady throughput over all of them (each training's tokens at its own steady rate), peaks, and MFU."""
    metrics = [m for m, _ in trainings]
    tokens = [m["train_tokens"] for m in metrics]
    train_s = sum(m["train_runtime_s"] for m in metrics)
    summary = {
        "bench_tokens": sum(tokens),
        "bench_examples": sum(m["train_examples"] for m in metrics),
        "bench_steps": sum(m["train_steps"] for m in metrics),
        "bench_train_s": train_s,
        "bench_wall_s": wall_s,
        "bench_tokens_per_s": sum(tokens) / train_s,
        "bench_wall_tokens_per_s": sum(tokens) / wall_s,
        "bench_examples_per_s": sum(m["train_examples"] for m in metrics) / train_s,
        "bench_step_ms_median": statistics.median(m["train_step_ms_median"] for m in metrics),
        "bench_warmup_s": sum(m["warmup_s"] for m in metrics),
        "bench_flops_per_token": sum(f * n for (_, f), n in zip(trainings, tokens)) / sum(tokens),
    }
    if any("compile_s" in m for m in metrics):
        summary["bench_compile_s"] = sum(m.get("compile_s", 0.0) for m in metrics)
        summary["bench_compile_graphs"] = sum(m.get("compile_graphs", 0.0) for m in metrics)
    if all("logging_ms_per_step" in m for m in metrics):
        summary["bench_logging_ms_per_step"] = sum(m["logging_ms_per_step"] * m["train_steps"]
                                                   for m in metrics) / summary["bench_steps"]
        summary["bench_logging_flush_s"] = sum(m["logging_flush_s"] for m in metrics)
    for name in ("peak_rss_mb", "peak_cuda_mem_allocated_mb", "peak_cuda_mem_reserved_mb"):
        if any(name in m for m in metrics):
            summary[f"bench_{name}"] = max(m[name] for m in metrics if name in m)
    if all("steady_tokens_per_s" in m for m in metrics):
        summary["bench_steady_tokens_per_s"] = sum(tokens) / sum(
            n / m["steady_tokens_per_s"] for m, n in zip(metrics, tokens))
        if peak_flops:
            summary["bench_mfu"] = summary["bench_flops_per_token"] * summary["bench_steady_tokens_per_s"] / peak_flops
    return summary


@dataclass
class Outcome:
    workload: str
    variant: str
    batch: str
    """The batch as the variant sets it, for the table."""
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


def batch_of(config: ClassifyConfig | LoraSweepConfig, variant: str) -> str:
    if variant == BASELINE:
        return f"{config.batch_size} padded to {config.max_length}"
    if getattr(config, "batch_tokens", 0):
        return f"{config.batch_tokens} tokens" + (" packed" if causal_lm.packed(config) else "")
    if isinstance(config, LoraSweepConfig):
        return f"{config.batch_size}" + (" packed" if causal_lm.packed(config) else "")
    return f"{config.batch_size}" + (f" compiled, {config.compile_shapes}" if training.switch(config.compile) else "")


def run_variant(workload: BenchWorkload, variant: str, config: BenchConfig, peak_flops: float | None) -> Outcome:
    """One variant in its own child run; a failure ends that run FAILED and is returned, not raised."""
    variant_cfg = variant_config(workload.name, workload.config, variant, config)
    outcome = Outcome(workload.name, variant, batch_of(variant_cfg, variant))
    gc.collect()  # the previous variant's model and optimizer state must not count in this one's memory
    if training.on_cuda():
        torch.cuda.empty_cache()
    from torch._inductor.utils import fresh_cache

    try:
        # An empty inductor (and Triton) cache: the variant compiles every graph it uses, whatever ran before.
        with fresh_cache(), tracking.child_run(variant_name(workload.name, variant)) as child:
            outcome.run_id = child.info.run_id
            tracking.log_params({"workload": workload.name, "variant": variant, "batch": outcome.batch})
            started = time.perf_counter()
            with tracking.scratch_dir("bench") as scratch:
                trainings = (baseline(workload, config.seed, scratch) if variant == BASELINE
                             else project(workload, variant_cfg))
            outcome.metrics = summarise(trainings, time.perf_counter() - started, peak_flops)
            outcome.metrics["bench_attended_tokens"] = workload.attended
            mlflow.log_metrics(outcome.metrics)
    except Exception as error:  # noqa: BLE001 - OOM or anything: record it, bench the other variants
        outcome.error = one_line(error)
    return outcome


def log_ratios(outcome: Outcome, reference: dict[str, float]) -> None:
    """The variant's throughputs over its workload's baseline's (`reference`), into its run and the outcome."""
    ratios = {ratio: outcome.metrics[name] / reference[name] for name, ratio in contract.BENCH_RATIOS.items()
              if name in outcome.metrics and name in reference}
    outcome.metrics.update(ratios)
    client = MlflowClient()
    for name, value in ratios.items():
        client.log_metric(outcome.run_id, name, value)


def peak_flops(config: BenchConfig, device_name: str) -> tuple[float | None, str]:
    """Peak dense FLOP/s of the device in its training precision: the config's, or known from `device_name`
    (torch's name of the GPU, or `cpu`); None and why when neither."""
    if config.peak_tflops:
        return config.peak_tflops * 1e12, ""
    known = next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in device_name), None)
    if known is None:
        return None, (f"MFU left empty: no peak FLOP/s is known for {device_name}; pass its dense peak TFLOP/s in "
                      f"its training precision as peak_tflops")
    return known, ""


def warm_up_device(precision: str) -> float:
    """Start CUDA (context, cuBLAS, the caching allocator) and run its matrix multiplies in fp32 and in `precision`
    once, before the first variant, so that the baseline does not pay CUDA's start-up; the seconds it took (0 on a
    CPU)."""
    if not training.on_cuda():
        return 0.0
    started = time.perf_counter()
    for dtype in (torch.float32, device.frozen_dtype(precision)):
        square = torch.randn(2048, 2048, device="cuda", dtype=dtype)
        for _ in range(8):
            square = torch.nn.functional.normalize(square @ square)
    torch.cuda.synchronize()
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------- the table

# The ratios are to the baseline, for the same work: "incl. warm-up" over the whole training, "excl. warm-up" over
# its steady steps, "wall" over the variant's whole time (loading, evaluation and logging included).
COLUMNS = [("tokens trained", "bench_tokens"), ("real tok/s", "bench_tokens_per_s"),
           ("× incl. warm-up", "bench_tokens_per_s_ratio"), ("steady tok/s", "bench_steady_tokens_per_s"),
           ("× excl. warm-up", "bench_steady_tokens_per_s_ratio"), ("tok/s over wall", "bench_wall_tokens_per_s"),
           ("× wall", "bench_wall_tokens_per_s_ratio"), ("ex/s", "bench_examples_per_s"),
           ("step ms", "bench_step_ms_median"), ("log ms/step", "bench_logging_ms_per_step"),
           ("warm-up s", "bench_warmup_s"), ("compile s", "bench_compile_s"), ("graphs", "bench_compile_graphs"),
           ("train s", "bench_train_s"), ("wall s", "bench_wall_s"),
           ("peak alloc MB", "bench_peak_cuda_mem_allocated_mb"),
           ("peak reserved MB", "bench_peak_cuda_mem_reserved_mb"), ("peak RSS MB", "bench_peak_rss_mb"),
           ("MFU", "bench_mfu")]


def shown(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    if metric.endswith("_ratio"):
        return f"{value:.2f}×"
    if metric == "bench_mfu":
        return f"{100 * value:.1f} %"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(outcomes: list[Outcome], notes: list[str] = ()) -> str:
    """The markdown table: one row per variant, every number a logged metric; then `notes`, one line each."""
    lines = ["| workload | variant | batch | " + " | ".join(title for title, _ in COLUMNS) + " |",
             "|---" * (3 + len(COLUMNS)) + "|"]
    for o in outcomes:
        cells = ([f"failed: {o.error}"] + [""] * (len(COLUMNS) - 1) if o.error else
                 [shown(metric, o.metrics.get(metric)) for _, metric in COLUMNS])
        lines.append(f"| {o.workload} | {o.variant} | {o.batch} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, *(f"\n{note}" for note in notes)]) + "\n"


def run(config: BenchConfig) -> dict:
    """Every workload x variant in one parent run (a child run each); return the parent's id, the ratios and
    the table."""
    with tracking.experiment_run(contract.BENCH, config.experiment, config.run_name) as parent:
        tracking.log_config(as_params(config))
        effective = config.effective()
        raise_if_any(check(effective))
        peak, mfu_note = peak_flops(effective, device.detect().name)
        notes = [mfu_note] if mfu_note else []
        precision = device.training_precision(config.precision)
        tracking.log_params({**tracking.environment_params(), "peak_tflops_used": peak / 1e12 if peak else "",
                             "effective_precision": precision, **({"tiny_preset": "on"} if config.tiny else {})})
        if mfu_note:
            mlflow.set_tag("mfu_note", mfu_note)
        mlflow.log_metric("bench_device_warmup_s", warm_up_device(precision))
        outcomes: list[Outcome] = []
        with tracking.scratch_dir("bench-data") as scratch:
            for workload in prepare(effective, scratch):
                reference: dict[str, float] = {}
                for variant in effective.variant_list:  # the baseline first
                    outcome = run_variant(workload, variant, effective, peak)
                    if variant == BASELINE:
                        reference = outcome.metrics
                    if outcome.metrics and reference:
                        log_ratios(outcome, reference)
                    outcomes.append(outcome)
                    if config.output:  # so far: a run cut short by a time limit still leaves its rows
                        Path(config.output).expanduser().write_text(table(outcomes, notes))
        markdown = table(outcomes, notes)
        mlflow.log_text(markdown, contract.BENCH_TABLE)
        mlflow.log_table(pd.DataFrame([{"workload": o.workload, "variant": o.variant, "batch": o.batch,
                                        "run_id": o.run_id, "error": o.error, **o.metrics} for o in outcomes]),
                         contract.BENCH_RESULTS)
        headline = {f"{o.workload}/{o.variant}/{ratio}": o.metrics[ratio] for o in outcomes
                    for ratio in contract.BENCH_RATIOS.values() if ratio in o.metrics}
        mlflow.log_metrics(headline)
        failed = [o for o in outcomes if o.error]
        mlflow.log_metric("failed_variants", len(failed))
        return {"run_id": parent.info.run_id, "metrics": headline,
                "notes": ["", markdown, *(f"failed: {variant_name(o.workload, o.variant)}: {o.error}"
                                          for o in failed)],
                "ui": tracking.ui_hint(parent.info.experiment_id)}
