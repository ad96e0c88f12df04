"""The HF Trainer setup shared by every experiment: arguments, per-step MLflow logging, NaN guard,
peak memory and throughput. The Trainer's own integrations stay off (`report_to="none"`): HF's
MLflowCallback would end the run at train end, and every metric belongs in the run we own."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import mlflow
import psutil
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

# Aim for about this many points on each loss curve, whatever the run length.
LOSS_CURVE_POINTS = 100


class NonFiniteLossError(RuntimeError):
    pass


def on_cuda() -> bool:
    return torch.cuda.is_available()


def training_arguments(
    output_dir: Path,
    *,
    learning_rate: float,
    epochs: float,
    batch_size: int,
    seed: int,
    max_steps: int = 0,
) -> TrainingArguments:
    cuda = on_cuda()
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps > 0 else -1,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size * 2,
        seed=seed,
        data_seed=seed,
        bf16=cuda and torch.cuda.is_bf16_supported(),
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


def make_trainer(model, tokenizer, output_dir: Path, train_dataset, collator, *, learning_rate: float, epochs: float,
                 batch_size: int, seed: int, max_steps: int = 0, eval_dataset=None) -> Trainer:
    """The HF Trainer every experiment uses: the shared arguments and our per-step MLflow logger."""
    return Trainer(
        model=model,
        args=training_arguments(output_dir, learning_rate=learning_rate, epochs=epochs, batch_size=batch_size,
                                seed=seed, max_steps=max_steps),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[MlflowStepLogger()],
    )


class MlflowStepLogger(TrainerCallback):
    """Per-step `train_loss`, `learning_rate` and `grad_norm` into the active run; stops on a non-finite loss."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"training loss became {loss} at step {state.global_step}")
        metrics = {"train_loss": loss}
        for key in ("learning_rate", "grad_norm"):
            if key in logs and math.isfinite(float(logs[key])):
                metrics[key] = float(logs[key])
        mlflow.log_metrics(metrics, step=state.global_step)


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
    """Train; return throughput and peak-memory metrics (also logged to the active run)."""
    with PeakMemory() as memory:
        output = trainer.train()
    runtime = output.metrics["train_runtime"]
    metrics = {
        "train_runtime_s": runtime,
        "train_samples_per_s": output.metrics["train_samples_per_second"],
        "train_tokens_per_s": trainer.state.num_input_tokens_seen / runtime if runtime > 0 else 0.0,
        "train_steps": float(trainer.state.global_step),
        **memory.metrics,
    }
    mlflow.log_metrics(metrics)
    return metrics
