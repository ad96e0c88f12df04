"""The HF Trainer setup shared by every experiment: arguments, per-step MLflow logging, NaN guard, token-budget
batches, compilation for static shapes, peak memory, throughput and step times, and evaluation in dataset order.
The Trainer's own integrations stay off (`report_to="none"`): HF's MLflowCallback would end the run at train end,
and every metric belongs in the run we own.

Helpers here return their metrics; the experiment logs them into its run. The one exception is the per-step
logger, a Trainer callback, which is told the run it logs into."""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from finetune_lab import console, device, tracking
from finetune_lab.config import TrainingConfig
from finetune_lab.models import eval_mode
from finetune_lab.packing import TokenBudgetBatchSampler
from finetune_lab.prompts import IGNORE_INDEX

# Aim for about this many points on each loss curve, whatever the run length.
LOSS_CURVE_POINTS = 100
# How the Trainer logs training steps, in every training the project records (bench's baseline too): up to
# LOSS_CURVE_POINTS per run, the first step included, non-finite losses as they are (for the NaN guard).
STEP_LOGGING = {"logging_strategy": "steps", "logging_steps": 1 / LOSS_CURVE_POINTS, "logging_first_step": True,
                "logging_nan_inf_filter": False}
# Logged steps are handed to MLflow several at a time: the first at once, then at most one request this often. One
# request per step cost the training loop 0.3 to 7 ms a step on the 2-core development machine (docs/performance.md).
STEP_LOG_INTERVAL_S = 3.0
# MLflow's limit on the metrics of one log_batch call.
MAX_METRICS_PER_BATCH = 1000
# The shapes a compiled classifier trains on (`ClassifyConfig.compile_shapes`), and the shortest bucket.
DYNAMIC, BUCKETS = "dynamic", "buckets"
SMALLEST_BUCKET = 64
# torch.compile's backend for `compiled`; tests use "eager" (seconds on CPU instead of minutes).
COMPILE_BACKEND = "inductor"

warnings_log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def on_cuda() -> bool:
    return device.detect().cuda


def switch(value: str) -> bool:
    """Whether a speed-up set to `auto` | `on` | `off` is used: `auto` means on with CUDA."""
    return value == "on" or (value == "auto" and on_cuda())


def eval_batch_size(config: TrainingConfig) -> int:
    """Evaluation needs no gradients or optimizer state: larger batches fit (4x on a GPU, where large batches keep
    it busy; 2x on a CPU, where they only cost memory)."""
    return config.batch_size * (4 if on_cuda() else 2)


def training_arguments(output_dir: Path, config: TrainingConfig, seed: int, drop_last: bool = False,
                       capabilities: device.Capabilities | None = None) -> TrainingArguments:
    """`drop_last`: drop each epoch's last, smaller batch (a compiled model then sees one batch size). The
    precision is the config's on the device's `capabilities` (this process's by default): see `device.precision`.
    On CUDA, batches are copied from pinned host memory without waiting (`non_blocking`)."""
    capabilities = capabilities or device.detect()
    cuda = capabilities.cuda
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=eval_batch_size(config),
        seed=seed,
        data_seed=seed,
        **device.trainer_precision(device.precision(capabilities, config.precision)),
        use_cpu=not cuda,  # bf16 autocast on a CPU: the Trainer refuses bf16 without a GPU unless told
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        train_sampling_strategy="group_by_length",
        # `train` counts real tokens from the batches themselves; the Trainer's count would synchronise the GPU
        # every step, and with packing it cannot tell padding from a pad token that is also the EOS token.
        include_num_input_tokens_seen="no",
        dataloader_drop_last=drop_last,
        **STEP_LOGGING,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},  # pinned memory pays only with asynchronous copies
    )


class TokenBudgetTrainer(Trainer):
    """A Trainer whose training batches hold up to `batch_tokens` tokens (`packed`: real tokens; otherwise
    examples x longest) instead of a fixed number of examples. The data needs a `length` column."""

    def __init__(self, *args, batch_tokens: int, packed: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_tokens = batch_tokens
        self.packed = packed

    def get_train_dataloader(self) -> DataLoader:
        lengths = self.train_dataset["length"]  # read before the Trainer drops the columns the model does not take
        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        sampler = TokenBudgetBatchSampler(lengths, self.batch_tokens, self.packed, self.args.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)


def make_trainer(model, tokenizer, output_dir: Path, train_dataset, collator, config: TrainingConfig, seed: int,
                 run_id: str, phase: str, batch_tokens: int = 0, packed: bool = False,
                 drop_last: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """The HF Trainer every experiment uses: the config's optimisation settings, per-step metrics logged into run
    `run_id`, and on the console the line `<phase>: training N steps` then a progress bar (no per-step dicts).
    `batch_tokens` > 0: batches by that token budget (`packed`: counted in real tokens) instead of batch_size
    examples; `drop_last`: see `training_arguments`; `callbacks`: more of them (a search's held-out rungs)."""
    settings = dict(model=model, args=training_arguments(output_dir, config, seed, drop_last),
                    train_dataset=train_dataset, processing_class=tokenizer, data_collator=collator,
                    callbacks=[PhaseLine(phase), *callbacks])
    trainer = TokenBudgetTrainer(**settings, batch_tokens=batch_tokens, packed=packed) if batch_tokens else \
        Trainer(**settings)
    return step_logged(trainer, run_id)


def step_logged(trainer: Trainer, run_id: str) -> Trainer:
    """`trainer` with its logged steps recorded into run `run_id` (`MlflowStepLogger`) instead of written under its
    progress bar."""
    trainer.add_callback(MlflowStepLogger(run_id))
    if trainer.pop_callback(ProgressCallback) is not None:  # a notebook has its own progress widget instead
        trainer.add_callback(QuietProgress)
    return trainer


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bucket_lengths(max_length: int) -> list[int]:
    """The padded lengths of `buckets`: powers of two from SMALLEST_BUCKET, then max_length (64, 128, 256, 512)."""
    lengths, length = [], SMALLEST_BUCKET
    while length < max_length:
        lengths.append(length)
        length *= 2
    return [*lengths, max_length]


class BucketPadding:
    """Collator: the batch padded to the shortest bucket length that holds its longest example."""

    def __init__(self, tokenizer, max_length: int):
        self.pad_to = {length: DataCollatorWithPadding(tokenizer, padding="max_length", max_length=length)
                       for length in bucket_lengths(max_length)}

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(feature["input_ids"]) for feature in features)
        return self.pad_to[next(length for length in self.pad_to if length >= longest)](features)


def graph_budget(shapes: str, max_length: int) -> int:
    """The graphs a compiled training may build: one with a symbolic sequence length (`dynamic`), or one per bucket
    length (`buckets`)."""
    return 1 if shapes == DYNAMIC else len(bucket_lengths(max_length))


@contextlib.contextmanager
def compiled(model: torch.nn.Module, shapes: str, max_length: int) -> Iterator[None]:
    """Compile `model` in place for training on batches of one size: `dynamic` = one graph whose sequence length is
    symbolic (any padding), `buckets` = a static graph per bucket length (`BucketPadding`). Within the block about
    `graph_budget` graphs are built for a frame (beyond it, torch runs it eagerly). Compilation state is reset
    first, so the run compiles (and its `compile_s` counts) every graph it uses. Evaluation runs the model eagerly
    (`evaluating`)."""
    import torch._dynamo

    torch.compiler.reset()
    if model.config.problem_type is None and getattr(model.config, "num_labels", 0) > 1:
        # The first forward would set it, and the compiled graph would guard on it: one graph more.
        model.config.problem_type = "single_label_classification"
    # dynamic=True: the batch size is symbolic too, which costs nothing here (one batch size) and saves the static
    # first graph that automatic dynamic shapes (dynamic=None) would build before the symbolic one.
    model.compile(dynamic=shapes == DYNAMIC, backend=COMPILE_BACKEND)
    # One recompile of slack: inductor may specialise a graph once more than the eager backend does (on a CPU, over
    # lengths 40 to 512, dynamic=True built two graphs with inductor and one with the eager backend).
    with torch._dynamo.config.patch(recompile_limit=graph_budget(shapes, max_length) + 1):
        yield


# A watch on training (`search`): given how to measure the model on the held-out split (model → metrics), the
# callback that measures it at the steps the watch chooses and may stop training there.
Watch = Callable[[Callable[[torch.nn.Module], dict[str, float]]], TrainerCallback]


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


def log_steps(client: MlflowClient, run_id: str, entries: list[dict], synchronous: bool = True) -> list[Future]:
    """Trainer log entries (with their `step`) as per-step metrics of run `run_id`. `synchronous=False`: handed to
    MLflow's asynchronous logging (a background thread writes them); returns what to wait for."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, int(e["step"])) for e in entries for k, v in step_metrics(e).items()]
    pending = []
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        operations = client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH],
                                      synchronous=synchronous)
        if operations is not None:
            pending += operations._operation_futures  # RunOperations offers wait() only: no done(), no cause
    return pending


class MlflowStepLogger(TrainerCallback):
    """Per-step `train_loss`, `lr` and `grad_norm` into run `run_id`, off the training loop: logged steps are kept
    and handed to MLflow's asynchronous logging several at a time, in one request (the first step at once, then at
    most one request every `interval_s`), whose thread writes them while training goes on; `flush` hands over the
    rest and waits until every step is stored (at the end of training, also after a failure or a signal).
    `seconds` is the time the training loop spent in the logger, `flush_seconds` the time spent waiting in `flush`.
    Stops training on a non-finite loss. If the tracking server stays unreachable past MLflow's retries, training
    goes on unlogged (the Trainer keeps every step in its log history) and the experiment decides what to keep."""

    def __init__(self, run_id: str, interval_s: float = STEP_LOG_INTERVAL_S):
        self.run_id = run_id
        self.interval_s = interval_s
        self.client = MlflowClient()
        self.pending: list[Future] = []
        self.kept: list[dict] = []
        """Steps logged by the Trainer and not handed over yet."""
        self.sent: set[int] = set()
        """Steps handed over."""
        self.handed_at = -math.inf
        self.seconds = 0.0
        self.flush_seconds = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"training loss became {loss} at step {state.global_step}")
        started = time.perf_counter()
        try:
            self.kept.append({**logs, "step": state.global_step})
            if started - self.handed_at >= self.interval_s:
                self._settle(wait=False)
                self._send(self.kept)
        finally:
            self.seconds += time.perf_counter() - started

    def _send(self, entries: list[dict]) -> None:
        """Hand `entries` over in one request (MLflow's limit permitting); nothing while this process is offline."""
        if entries and not tracking.offline():
            self.pending += log_steps(self.client, self.run_id, entries, synchronous=False)
            self.sent.update(int(entry["step"]) for entry in entries)
        self.kept, self.handed_at = [], time.perf_counter()

    def _settle(self, wait: bool) -> None:
        """Forget the writes that are done (with `wait`: all of them, once done). A failed one: an unreachable
        server takes this process offline (the writes still queued then fail at once), anything else is raised."""
        still = []
        for future in self.pending:
            if not wait and not future.done():
                still.append(future)
            elif (error := future.exception()) is not None:
                if not tracking.unreachable(error):
                    raise error
                tracking.go_offline(error)
        self.pending = still

    def flush(self, entries: list[dict]) -> None:
        """Return once every step is stored: the steps kept, and those of `entries` (the Trainer's step log) never
        handed over (a signal interrupted the loop between a step and its logging), are handed over now, then
        every write is waited for."""
        started = time.perf_counter()
        try:
            unsent = {int(entry["step"]): entry for entry in [*self.kept, *entries]
                      if int(entry["step"]) not in self.sent}
            self._send([unsent[step] for step in sorted(unsent)])
            self._settle(wait=True)
        finally:
            self.flush_seconds += time.perf_counter() - started


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

    def __enter__(self) -> PeakMemory:
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


class BatchCounter:
    """A collator that also records the examples and real tokens of every batch it builds, in order. The first
    `steps` records are the batches trained on: the dataloader builds one batch ahead (one optimizer step is one
    batch here: no gradient accumulation)."""

    def __init__(self, collate):
        self.collate = collate
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features):
        self.batches.append((len(features), sum(len(f["input_ids"]) for f in features)))
        return self.collate(features)


@dataclass
class StepTime:
    seconds: float
    """Wall time since the previous step ended (the first: since training began), data loading included."""
    compiled: bool
    """Whether torch.compile built a graph during the step."""


class StepTimer(TrainerCallback):
    """The wall time of every optimizer step. Without a device synchronisation: in steady state the host cannot
    run ahead of the GPU by more than a fraction of a step, so the times between step ends are the GPU's."""

    def __init__(self):
        self.steps: list[StepTime] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._last, self._graphs = time.perf_counter(), compiled_graphs()

    def on_step_end(self, args, state, control, **kwargs):
        now, graphs = time.perf_counter(), compiled_graphs()
        self.steps.append(StepTime(now - self._last, graphs > self._graphs))
        self._last, self._graphs = now, graphs


def throughput(runtime: float, steps: list[StepTime], batches: list[tuple[int, int]]) -> dict[str, float]:
    """Speed metrics of a training run from its step times and the (examples, real tokens) of its batches.

    The median step is the steady state. Warm-up steps are the first one and every step that compiled a graph;
    `warmup_s` is the time they took beyond the median step, `compile_s` (compiled runs) the part of it in steps
    that compiled. `steady_tokens_per_s` is real tokens per second over the other steps."""
    trained = batches[:len(steps)]
    tokens = [count for _, count in trained]
    metrics = {
        "train_runtime_s": runtime,
        "train_steps": float(len(steps)),
        "train_examples": float(sum(examples for examples, _ in trained)),
        "train_tokens": float(sum(tokens)),
        "train_samples_per_s": sum(examples for examples, _ in trained) / runtime if runtime > 0 else 0.0,
        "train_tokens_per_s": sum(tokens) / runtime if runtime > 0 else 0.0,
    }
    if not steps:
        return metrics
    median = statistics.median(step.seconds for step in steps)
    warm = {i for i, step in enumerate(steps) if i == 0 or step.compiled}
    excess = {i: max(0.0, steps[i].seconds - median) for i in warm}
    steady = [i for i in range(len(steps)) if i not in warm]
    steady_seconds = sum(steps[i].seconds for i in steady)
    metrics.update({"train_step_ms_median": median * 1000, "warmup_s": sum(excess.values())})
    if steady_seconds > 0:
        metrics["steady_tokens_per_s"] = sum(tokens[i] for i in steady) / steady_seconds
    if any(step.compiled for step in steps):
        metrics["compile_s"] = sum(excess[i] for i in warm if steps[i].compiled)
    return metrics


def train(trainer: Trainer) -> dict[str, float]:
    """Train; return throughput, step-time and peak-memory metrics (see `throughput`; with compilation also
    `compile_graphs`; with a step logger `logging_ms_per_step`, what handing the step metrics over cost the
    training loop per step, and `logging_flush_s`, the wait for them to be stored after the last step).
    Works on any Trainer: it counts the batches through the Trainer's own collator. The step logger is flushed
    however training ends; a signal is told how far training got. The model is handed back with its own forward
    (`own_forward`)."""
    counter, timer, graphs = BatchCounter(trainer.data_collator), StepTimer(), compiled_graphs()
    logger = next((c for c in trainer.callback_handler.callbacks if isinstance(c, MlflowStepLogger)), None)
    trainer.data_collator = counter
    trainer.add_callback(timer)
    try:
        with PeakMemory() as memory:
            output = trainer.train()
    except BaseException as error:
        _flush_after(error, trainer, logger)
        raise
    finally:
        own_forward(trainer.model)
        trainer.data_collator = counter.collate
        trainer.remove_callback(timer)
    metrics = {**throughput(output.metrics["train_runtime"], timer.steps, counter.batches), **memory.metrics}
    if logger is not None:
        logger.flush(step_log(trainer))
        metrics["logging_ms_per_step"] = 1000 * logger.seconds / max(1, len(timer.steps))
        metrics["logging_flush_s"] = logger.flush_seconds
    if "compile_s" in metrics:
        metrics["compile_graphs"] = float(compiled_graphs() - graphs)
    return metrics


def own_forward(model: torch.nn.Module) -> None:
    """Give `model` its own forward back. Under bf16 or fp16, accelerate's `prepare` (the Trainer's) replaces
    `model.forward` for good with an autocast wrapper that casts the outputs to fp32, and keeps the original as
    `_original_forward`: left on, everything downstream of training (registry references, generation, the probe's
    answers) would compute in the autocast dtype, while the model they stand for (registered, reloaded, served)
    computes in its weights' own. Evaluation autocasts explicitly instead (`evaluating`). Not accelerate's
    `unwrap_model(..., keep_fp32_wrapper=False)`: that follows every `__wrapped__`, past transformers' own
    decorators of `forward`."""
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        model.forward = original


def _flush_after(error: BaseException, trainer: Trainer, logger: MlflowStepLogger | None) -> None:
    """Training ended with `error`: store its step metrics anyway (the error matters more than a failure to), and
    after a signal say up to which step they go."""
    steps = step_log(trainer)
    if logger is not None:
        try:
            logger.flush(steps)
        except Exception as failure:  # noqa: BLE001 - the error that ended training goes first
            warnings_log.warning("step metrics could not all be logged: %s", failure)
    if isinstance(error, KeyboardInterrupt):
        last = int(steps[-1]["step"]) if steps else 0
        console.say(f"training stopped at step {trainer.state.global_step} of {trainer.state.max_steps}; its step "
                    f"metrics are logged up to step {last}")


def stopped_early(trainer: Trainer) -> bool:
    """Whether a callback stopped training before its last step (a signal or an error raises instead)."""
    return trainer.state.global_step < trainer.state.max_steps


def step_log(trainer: Trainer) -> list[dict]:
    """The Trainer's log entries of training steps (step, loss, grad_norm, learning_rate), in order."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@contextlib.contextmanager
def evaluating(model, precision: str) -> Iterator[None]:
    """Eval mode under inference mode, autocast to `precision` as the Trainer trains (on a CPU too), and eager
    execution even for a model compiled for training (its graphs fit the training batches, not these)."""
    with eval_mode(model), torch.inference_mode(), device.autocast(precision, model.device.type), \
            torch.compiler.set_stance("force_eager"):
        yield


def by_length(model, dataset, collator, batch_size: int, columns: list[str]) -> tuple[np.ndarray, Iterator[dict]]:
    """Batches of `dataset` (only `columns`) on the model's device, made of examples of similar length (less
    padding), and the order they come in: batch rows concatenated are rows `order` of the dataset."""
    lengths = dataset["length"] if "length" in dataset.column_names else [len(ids) for ids in dataset["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    loader = DataLoader(dataset.select(order).select_columns(columns), batch_size=batch_size, shuffle=False,
                        collate_fn=collator)
    return order, ({key: value.to(model.device) for key, value in batch.items()} for batch in loader)


def predict_logits(model, dataset, collator, batch_size: int, precision: str) -> np.ndarray:
    """Classifier logits for every row of `dataset`, row i for example i, in eval mode, computed in `precision`."""
    inputs = [c for c in dataset.column_names if c not in ("labels", "length")]
    order, batches = by_length(model, dataset, collator, batch_size, inputs)
    with evaluating(model, precision):
        chunks = [model(**batch).logits.float().cpu().numpy() for batch in batches]
    logits = np.empty((len(order), chunks[0].shape[-1]), dtype=np.float64)
    logits[order] = np.concatenate(chunks)
    return logits


@dataclass
class ExampleLosses:
    """A causal LM's loss on every held-out example, row i for example i of the dataset."""

    sums: np.ndarray
    """The summed loss of each example's target tokens."""
    targets: np.ndarray
    """How many target tokens each example has (0 where truncation left none)."""

    @property
    def per_example(self) -> np.ndarray:
        """Each example's mean loss per target token (NaN for an example without targets)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.targets > 0, self.sums / np.maximum(self.targets, 1), np.nan)

    @property
    def mean(self) -> float:
        """The mean loss per target token over the whole split: every target token weighs the same."""
        total = int(self.targets.sum())
        return float(self.sums.sum() / total) if total else math.nan


def example_losses(model, dataset, collator, batch_size: int, precision: str) -> ExampleLosses:
    """A causal LM's loss on every example of `dataset`, in eval mode, computed in `precision`, however the examples
    are batched, padded or packed. A batch's row holds one example, except with a packing collator (one with
    `layout`, `packing.PackedRows`): its rows hold the examples `layout` puts there, one after the other, each
    starting where `position_ids` restart at 0 (a row may end with a block of filler, labels ignored). Each target
    token (a label other than the ignored index) belongs to the example it sits in: the token before it predicts
    it, and no example's first label is a target in a packed row, so no target straddles two examples."""
    columns = [c for c in dataset.column_names if c != "length"]
    lengths = np.asarray(dataset["length"] if "length" in dataset.column_names else
                         [len(ids) for ids in dataset["input_ids"]])
    order, batches = by_length(model, dataset, collator, batch_size, columns)
    sums, targets = np.zeros(len(order)), np.zeros(len(order), dtype=np.int64)
    layout = getattr(collator, "layout", None)
    with evaluating(model, precision):
        for start, batch in zip(range(0, len(order), batch_size), batches):
            members = order[start:start + batch_size]
            labels = batch.pop("labels")
            # use_cache=False: with a cache, transformers would not see packed examples (see `packing`)
            logits = model(**batch, use_cache=False).logits
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                       ignore_index=IGNORE_INDEX, reduction="none")
            if layout is None:  # one example per row
                owner = torch.as_tensor(members, device=labels.device)[:, None].expand_as(labels)
            else:
                rows = [[members[k] for k in row] for row in layout(lengths[members].tolist())]
                owner = _packed_owners(batch["position_ids"], rows)
            owner, target = owner[:, 1:], labels[:, 1:] != IGNORE_INDEX
            sums += np.bincount(owner[target].cpu().numpy(), weights=losses[target].double().cpu().numpy(),
                                minlength=len(order))
            targets += np.bincount(owner[target].cpu().numpy(), minlength=len(order))
    return ExampleLosses(sums, targets)


def _packed_owners(position_ids: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """The example each position of packed rows belongs to: row r holds `rows[r]` in turn, each a block that starts
    where the positions restart at 0; a block past them (the row's filler) belongs to none (-1)."""
    block = torch.cumsum((position_ids == 0).long(), dim=1) - 1
    owners = torch.full_like(position_ids, -1)
    for r, examples in enumerate(rows):
        for k, example in enumerate(examples):
            owners[r][block[r] == k] = example
    return owners
