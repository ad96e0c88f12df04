"""Preparing and training a causal-LM experiment (the sweep and the probe): data and model checked together before
anything is loaded, the frozen base loaded once, the pairs tokenized once, and one training pass with its
held-out loss. The counterpart of `classify.prepare` for language models; the adapter itself is `lora`'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from finetune_lab import data as data_lib
from finetune_lab import device, health, lora, models, prompts, tracking, training
from finetune_lab.config import LoraTrainingConfig
from finetune_lab.data import TRAIN
from finetune_lab.errors import problem, raise_if_any
from finetune_lab.metrics import perplexity
from finetune_lab.packing import PackedRows
from finetune_lab.prompts import IGNORE_INDEX


@dataclass
class PreparedCausalLM:
    """Checked data and model source of a causal-LM experiment."""

    data: data_lib.LoadedData
    source: models.ModelSource


def prepare(config: LoraTrainingConfig, ranks: tuple[int, ...], seed: int, rank_param: str = "ranks",
            found: Sequence[str] = (), methods: Sequence[str] = ()) -> PreparedCausalLM:
    """Load and check data, model spec and architecture (and the LoRA `methods` against peft and the model); raise
    InputError with every problem, config's included. Rank problems are reported under `rank_param`, the parameter
    that set them; `found` are problems the caller found already (e.g. with the environment), reported together with
    these."""
    problems = [*config.problems(), *device.precision_problems(config.precision, device.detect()), *found]
    data, data_problems = data_lib.load(config.dataset, seed, config.eval_fraction,
                                         max_text_chars=data_lib.text_limit(config.max_length))
    problems += data_problems
    texts = None
    if data is not None and not data_problems:
        columns = {"input_column": config.input_column, "output_column": config.output_column}
        column_problems = data_lib.check_columns(data, columns)
        problems += column_problems
        if not column_problems:
            for param, column in columns.items():
                problems += data_lib.check_text(data, param, column)
        if len(data.splits[TRAIN]) < config.batch_size:
            problems.append(
                problem("batch_size", f"the train split has {len(data.splits[TRAIN])} examples, fewer than one batch "
                                      f"of {config.batch_size}")
            )
        if not problems:
            train = data.splits[TRAIN]
            texts = list(train[config.input_column]) + list(train[config.output_column])
    source, model_problems = models.resolve(config.model, models.CAUSAL_LM, texts, seed)
    problems += model_problems
    if source is not None:
        problems += models.check_max_length(source, config.max_length)
        skeleton = models.skeleton(source, AutoModelForCausalLM)
        problems += lora.check_architecture(skeleton, config, ranks, rank_param, methods)
        problems += lora.check_methods(skeleton, methods)
    raise_if_any(problems)
    return PreparedCausalLM(data, source)


def load_tokenizer(source: models.ModelSource):
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    tokenizer = models.load_tokenizer(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(source: models.ModelSource, precision: str):
    """The frozen base model and its tokenizer (with a pad token), loaded once per experiment, onto the device it
    trains on, in the dtype of the training `precision` (`fp32`, `bf16`, `fp16`: `device.training_precision`)."""
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source.path, **models.model_kwargs(device.frozen_dtype(precision)))
    model.to(device.training_device())
    # PEFT writes these into every adapter (adapter_config.json, its model card) as the base model: the base's
    # identity (alias or Hub id), not the cache folder it happened to be loaded from on this machine.
    model.name_or_path = model.config.name_or_path = models.identity(source)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tokenize(splits: datasets.DatasetDict, tokenizer, config: LoraTrainingConfig) -> datasets.DatasetDict:
    """Input/output pairs → training tokens with the config's format, loss mask and truncation."""
    return prompts.tokenize_pairs(
        splits, tokenizer, input_column=config.input_column, output_column=config.output_column,
        prompt_format=config.prompt_format, loss_on=config.loss_on, max_length=config.max_length,
    )


def packed(config: LoraTrainingConfig) -> bool:
    """Whether batches are packed (padding-free) rather than padded."""
    return training.switch(config.packing)


def collator(tokenizer, config: LoraTrainingConfig):
    """Packed rows of up to max_length tokens (see `packing`), or padding per batch: input_ids with the pad token,
    labels with the ignored index."""
    if packed(config):
        return PackedRows(tokenizer.pad_token_id, config.max_length)
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8 if training.on_cuda() else None
    )


@dataclass
class FitResult:
    metrics: dict[str, float]
    """Throughput, peak memory, held-out loss and perplexity: one value each, for the run to log."""
    steps: list[dict]
    """The Trainer's log entry of every logged step (step, loss, grad_norm, learning_rate)."""
    held_out: training.ExampleLosses
    """The loss on every held-out example, from which `eval_loss` is computed."""

    @property
    def curve(self) -> list[tuple[int, float]]:
        """(step, training loss) as logged per step."""
        return [(entry["step"], entry["loss"]) for entry in self.steps]

    @property
    def train_loss(self) -> float:
        """The last logged training loss."""
        return self.steps[-1]["loss"] if self.steps else float("nan")


def fit(model, tokenizer, train_split, eval_split, config: LoraTrainingConfig, seed: int, run_id: str, phase: str,
        collate=None, watch: training.Watch | None = None) -> FitResult:
    """Train the adapter on `train_split` (per-step metrics into run `run_id`, `phase` names it on the console),
    then measure the loss on every example of `eval_split` and their mean per target token. `collate` replaces the
    training collator (e.g. one that also records what each batch held); batches are packed and sized by the config
    either way. `watch` measures the held-out loss where it chooses, and may stop training. Raises
    health.TrainingCollapsed if training diverged or left a dead model (not judged when the watch stopped it
    early)."""

    def held_out(trained) -> training.ExampleLosses:
        return training.example_losses(trained, eval_split, collator(tokenizer, config),
                                       training.eval_batch_size(config), device.training_precision(config.precision))

    def held_out_loss(trained) -> dict[str, float]:
        return {"eval_loss": held_out(trained).mean}

    with tracking.scratch_dir("lora") as scratch:
        trainer = training.make_trainer(model, tokenizer, scratch, train_split, collate or collator(tokenizer, config),
                                        config, seed, run_id, phase, batch_tokens=config.batch_tokens,
                                        packed=packed(config), callbacks=[watch(held_out_loss)] if watch else [])
        metrics = training.train(trainer)
    losses = held_out(model)
    metrics.update({"eval_loss": losses.mean, "eval_perplexity": perplexity(losses.mean)})
    steps = training.step_log(trainer)
    if not training.stopped_early(trainer):  # stopped by its watch: never registered, its last steps prove nothing
        health.check(steps, losses.mean, model.config.vocab_size, metrics)
    return FitResult(metrics, steps, losses)
