"""The HF Trainer setup shared by every experiment: arguments, per-step MLflow logging, NaN guard, peak memory and
throughput, and evaluation in dataset order. The Trainer's own integrations stay off (`report_to="none"`): HF's
MLflowCallback would end the run at train end, and every metric belongs in the run we own.

Helpers here return their metrics; the experiment logs them into its run. The one exception is the per-step
logger, a Trainer callback, which is told the run it logs into."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from finetune_lab import console, tracking
from finetune_lab.config import TrainingConfig
from finetune_lab.models import eval_mode
from finetune_lab.prompts import IGNORE_INDEX

# Aim for about this many points on each loss curve, whatever the run length.
LOSS_CURVE_POINTS = 100
# MLflow's limit on the metrics of one log_batch call.
MAX_METRICS_PER_BATCH = 1000


class NonFiniteLossError(RuntimeError):
    pass


def on_cuda() -> bool:
    return torch.cuda.is_available()


def bf16() -> bool:
    return on_cuda() and torch.cuda.is_bf16_supported()


def eval_batch_size(config: TrainingConfig) -> int:
    """Evaluation needs no gradients or optimizer state: twice the training batch fits."""
    return config.batch_size * 2


def training_arguments(output_dir: Path, config: TrainingConfig, seed: int) -> TrainingArguments:
    cuda = on_cuda()
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=eval_batch_size(config),
        seed=seed,
        data_seed=seed,
        bf16=bf16(),
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        logging_strategy="steps",
        logging_steps=1 / LOSS_CURVE_POINTS,  # a ratio of the total steps
        logging_first_step=True,
        logging_nan_inf_filter=False,  # let the NaN guard see non-finite losses
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=cuda,
    )


def make_trainer(model, tokenizer, output_dir: Path, train_dataset, collator, config: TrainingConfig, seed: int,
                 run_id: str, phase: str) -> Trainer:
    """The HF Trainer every experiment uses: the config's optimisation settings, per-step metrics logged into run
    `run_id`, and on the console the line `<phase>: training N steps` then a progress bar (no per-step dicts)."""
    trainer = Trainer(
        model=model,
        args=training_arguments(output_dir, config, seed),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[MlflowStepLogger(run_id), PhaseLine(phase)],
    )
    if trainer.pop_callback(ProgressCallback) is not None:  # a notebook has its own progress widget instead
        trainer.add_callback(QuietProgress)
    return trainer


class PhaseLine(TrainerCallback):
    """Announces the training phase, with its real number of steps (known once training begins)."""

    def __init__(self, phase: str):
        self.phase = phase

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            console.say(f"{self.phase}: training {state.max_steps} steps")


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar without the log dict it writes under the bar at every logging step (the values
    go to MLflow)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def step_metrics(entry: dict) -> dict[str, float]:
    """A Trainer log entry as the per-step metrics a run records: `train_loss`, `lr`, `grad_norm` (finite ones)."""
    values = {"train_loss": float(entry["loss"])}
    for logged, name in (("learning_rate", "lr"), ("grad_norm", "grad_norm")):
        if logged in entry and math.isfinite(float(entry[logged])):
            values[name] = float(entry[logged])
    return values


def log_steps(client: MlflowClient, run_id: str, entries: list[dict]) -> None:
    """Trainer log entries (with their `step`) as per-step metrics of run `run_id`."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, int(e["step"])) for e in entries for k, v in step_metrics(e).items()]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])


class MlflowStepLogger(TrainerCallback):
    """Per-step `train_loss`, `lr` and `grad_norm` into run `run_id`; stops on a non-finite loss. If the tracking
    server stays unreachable past MLflow's retries, training goes on unlogged (the Trainer keeps every step in its
    log history) and the experiment decides what to keep."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"training loss became {loss} at step {state.global_step}")
        if tracking.offline():
            return
        try:
            log_steps(self.client, self.run_id, [{**logs, "step": state.global_step}])
        except Exception as error:  # noqa: BLE001 - only an unreachable server is survivable here
            if not tracking.unreachable(error):
                raise
            tracking.go_offline(error)


class PeakMemory:
    """Peak resident memory (sampled) and, on CUDA, peak allocated/reserved memory within the block."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.metrics: dict[str, float] = {}
        self._process = psutil.Process()
        self._peak_rss = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        if on_cuda():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._peak_rss = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        self.metrics = {"peak_rss_mb": self._peak_rss / 2**20}
        if on_cuda():
            torch.cuda.synchronize()
            self.metrics["peak_cuda_mem_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            self.metrics["peak_cuda_mem_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20


def train(trainer: Trainer) -> dict[str, float]:
    """Train; return throughput and peak-memory metrics."""
    with PeakMemory() as memory:
        output = trainer.train()
    runtime = output.metrics["train_runtime"]
    return {
        "train_runtime_s": runtime,
        "train_samples_per_s": output.metrics["train_samples_per_second"],
        "train_tokens_per_s": trainer.state.num_input_tokens_seen / runtime if runtime > 0 else 0.0,
        "train_steps": float(trainer.state.global_step),
        **memory.metrics,
    }


def step_log(trainer: Trainer) -> list[dict]:
    """The Trainer's log entries of training steps (step, loss, grad_norm, learning_rate), in order."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@contextlib.contextmanager
def _autocast() -> Iterator[None]:
    """bf16 autocast on CUDA, as the Trainer trains; nothing on CPU."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16()) if on_cuda() else contextlib.nullcontext():
        yield


def in_order(model, dataset, collator, batch_size: int, columns: list[str]) -> Iterator[dict]:
    """Batches of `dataset` in its own order (never length-grouped), on the model's device, for evaluation."""
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, shuffle=False, collate_fn=collator)
    for batch in loader:
        yield {key: value.to(model.device) for key, value in batch.items()}


def predict_logits(model, dataset, collator, batch_size: int) -> np.ndarray:
    """Classifier logits for every row of `dataset`, row i for example i, in eval mode."""
    inputs = [c for c in dataset.column_names if c not in ("labels", "length")]
    with eval_mode(model), _autocast():
        chunks = [model(**batch).logits.float().cpu().numpy() for batch in in_order(model, dataset, collator,
                                                                                     batch_size, inputs)]
    return np.concatenate(chunks).astype(np.float64)


def mean_token_loss(model, dataset, collator, batch_size: int) -> float:
    """A causal LM's mean loss per target token over the whole of `dataset` (every labelled token weighs the
    same, however the examples are batched), in eval mode."""
    columns = [c for c in dataset.column_names if c != "length"]
    total, count = 0.0, 0
    with eval_mode(model), _autocast():
        for batch in in_order(model, dataset, collator, batch_size, columns):
            targets = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * targets  # the model's loss is the mean over these targets
            count += targets
    return total / count if count else math.nan
