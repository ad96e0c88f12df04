"""LoRA adapters on a frozen causal LM: checks against the architecture, attach / detach on one base
model, one training pass through the shared Trainer setup, and the adapter folder as an artifact."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlflow
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, set_seed

from finetune_lab import data as data_lib
from finetune_lab import metrics as metrics_lib
from finetune_lab import models, prompts, tracking, training
from finetune_lab.config import InputError, LoraTrainingConfig, problem
from finetune_lab.data import TRAIN
from finetune_lab.prompts import IGNORE_INDEX

ADAPTER_ARTIFACT = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names (last path component) of the linear layers LoRA can target; the output head is left out."""
    head = model.get_output_embeddings()
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
         if isinstance(module, torch.nn.Linear) and module is not head}
    )


def check_architecture(skeleton: torch.nn.Module, config: LoraTrainingConfig, ranks: list[int],
                       rank_param: str = "ranks") -> list[str]:
    """Ranks and target modules against the model (a weightless skeleton is enough); rank problems are reported
    under `rank_param`, the parameter that set them."""
    problems = []
    available = linear_module_names(skeleton)
    targets = config.target_module_list
    if targets != "all-linear":
        unknown = [t for t in targets if t not in available]
        if unknown:
            problems.append(
                problem("target_modules", f"{', '.join(unknown)} not in this model; linear modules: {', '.join(available)}")
            )
    hidden = skeleton.config.hidden_size
    too_large = [r for r in ranks if r > hidden]
    if too_large:
        problems.append(problem(rank_param, f"{too_large} exceed the model's hidden size {hidden}"))
    return problems


def attach(base: torch.nn.Module, config: LoraTrainingConfig, rank: int, seed: int) -> PeftModel:
    """A fresh adapter on `base`, initialised from `seed` (B = 0, so the first forward equals the base's)."""
    set_seed(seed)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=config.alpha_for(rank),
        lora_dropout=config.lora_dropout,
        target_modules=config.target_module_list,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora_config)


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of the adapter's weights (training goes on in place), for `restore_adapter`."""
    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}


def restore_adapter(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Put the adapter's weights back to `state`, exactly."""
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"adapter state does not fit the model: unexpected keys {unexpected[:3]}")


def detach(model: PeftModel) -> torch.nn.Module:
    """Remove the adapter and give back the untouched base, ready for the next child."""
    return model.unload()


def lora_params(model: PeftModel, config: LoraTrainingConfig, rank: int, seed: int) -> dict:
    trainable, total = model.get_nb_trainable_parameters()
    alpha = config.alpha_for(rank)
    return {
        "lora_r": rank,
        "lora_alpha": alpha,
        "lora_scale": alpha / rank,
        "alpha_mode": "fixed" if config.lora_alpha > 0 else f"alpha_per_rank={config.alpha_per_rank}",
        "target_modules": ",".join(sorted(model.peft_config["default"].target_modules)),
        "seed": seed,
        "trainable_params": trainable,
        "trainable_percent": round(100.0 * trainable / total, 4),
    }


@dataclass
class FitResult:
    metrics: dict[str, float]
    curve: list[tuple[int, float]] = field(default_factory=list)


def collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Pads input_ids with the pad token and labels with the ignored index, per batch (dynamic padding)."""
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8 if training.on_cuda() else None
    )


def fit(model, tokenizer, train_split, eval_split, config: LoraTrainingConfig, seed: int, collate=None) -> FitResult:
    """Train the adapter on `train_split`, evaluate on `eval_split`; log and return the metrics.
    `collate` replaces the default collator (e.g. one that also records what each batch held)."""
    with tracking.scratch_dir("lora") as scratch:
        trainer = training.make_trainer(
            model, tokenizer, scratch, train_split, collate or collator(tokenizer),
            learning_rate=config.learning_rate, epochs=config.epochs, batch_size=config.batch_size, seed=seed,
            max_steps=config.max_steps, eval_dataset=eval_split,
        )
        result = training.train(trainer)
        eval_loss = float(trainer.evaluate()["eval_loss"])
    curve = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    result.update(
        {"train_loss": curve[-1][1], "eval_loss": eval_loss, "eval_perplexity": metrics_lib.perplexity(eval_loss)}
    )
    mlflow.log_metrics({k: result[k] for k in ("eval_loss", "eval_perplexity")})
    return FitResult(result, curve)


def log_adapter(model: PeftModel, tokenizer, artifact_path: str = ADAPTER_ARTIFACT) -> int:
    """Log the adapter folder (config + weights, no base weights) and the tokenizer; return the weights' size."""
    with tracking.scratch_dir("adapter") as scratch:
        folder = Path(scratch) / artifact_path
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        size = (folder / ADAPTER_WEIGHTS).stat().st_size
        mlflow.log_artifacts(str(folder), artifact_path)
    mlflow.log_metric("adapter_size_bytes", size)
    return size


@contextlib.contextmanager
def adapter(base: torch.nn.Module, config: LoraTrainingConfig, rank: int, seed: int) -> Iterator[PeftModel]:
    """A fresh adapter for the block; afterwards `base` is the untouched frozen model again."""
    model = attach(base, config, rank, seed)
    try:
        yield model
    finally:
        detach(model)
        if training.on_cuda():
            torch.cuda.empty_cache()


@dataclass
class Prepared:
    """Checked data and model source of a LoRA experiment."""

    data: data_lib.LoadedData
    source: models.ModelSource


def prepare(config: LoraTrainingConfig, config_problems: list[str], ranks: list[int], seed: int,
            rank_param: str = "ranks") -> Prepared:
    """Load and check data, model spec and architecture; raise InputError with every problem, config's included."""
    problems = list(config_problems)
    data, data_problems = data_lib.load(config.dataset, seed, config.eval_fraction)
    problems += data_problems
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
    source = None
    if config.model == models.TINY:
        if data is not None and not problems:
            train = data.splits[TRAIN]
            source = models.tiny("causal_lm", list(train[config.input_column]) + list(train[config.output_column]), seed)
    else:
        source, model_problems = models.resolve(config.model)
        problems += model_problems
    if source is not None:
        problems += check_architecture(models.skeleton(source, AutoModelForCausalLM), config, ranks, rank_param)
    if problems:
        raise InputError(problems)
    return Prepared(data, source)


def load_base(source: models.ModelSource):
    """The frozen base model and its tokenizer (with a pad token), loaded once per experiment."""
    model, tokenizer = models.load(source, AutoModelForCausalLM, **models.model_kwargs(frozen_base=True))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tokenize(prepared: Prepared, tokenizer, config: LoraTrainingConfig):
    return tokenize_splits(prepared.data.splits, tokenizer, config)


def tokenize_splits(splits, tokenizer, config: LoraTrainingConfig):
    """Input/output pairs → training tokens with the config's format, loss mask and truncation."""
    return prompts.tokenize_pairs(
        splits, tokenizer, input_column=config.input_column, output_column=config.output_column,
        prompt_format=config.prompt_format, loss_on=config.loss_on, max_length=config.max_length,
    )
