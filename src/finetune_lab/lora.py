"""The LoRA adapter lifecycle on a frozen causal LM: checks against the architecture, attach / detach on one base
model, a copy of its state and its restoration, its params, and the adapter folder as an artifact."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mlflow
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import set_seed

from finetune_lab import tracking, training
from finetune_lab.config import LoraTrainingConfig
from finetune_lab.contract import ADAPTER_ARTIFACT
from finetune_lab.errors import problem

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
                problem("target_modules",
                        f"{', '.join(unknown)} not in this model; linear modules: {', '.join(available)}")
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
    """The adapter's settings, as params. Its size (`trainable_params`) is a metric only, so that charts can use it
    and the compare view lists it once."""
    trainable, total = model.get_nb_trainable_parameters()
    alpha = config.alpha_for(rank)
    return {
        "lora_r": rank,
        "lora_alpha": alpha,
        "lora_scale": alpha / rank,
        "alpha_mode": "fixed" if config.lora_alpha > 0 else f"alpha_per_rank={config.alpha_per_rank}",
        "target_modules": ",".join(sorted(model.peft_config["default"].target_modules)),
        "seed": seed,
        "trainable_percent": round(100.0 * trainable / total, 4),
    }


def trainable_params(model: PeftModel) -> int:
    return model.get_nb_trainable_parameters()[0]


def log_adapter(model: PeftModel, tokenizer, artifact_path: str = ADAPTER_ARTIFACT) -> int:
    """Log the adapter folder (config + weights, no base weights) and the tokenizer into the active run; return
    the weights' size in bytes."""
    with tracking.scratch_dir("adapter") as scratch:
        folder = Path(scratch) / artifact_path
        # Only linear layers are ever targeted and the vocabulary is never resized: no embeddings to save (and no
        # lookup of the base's config by its name, which is an alias or a Hub id, not a folder).
        model.save_pretrained(folder, save_embedding_layers=False)
        tokenizer.save_pretrained(folder)
        mlflow.log_artifacts(str(folder), artifact_path)
        return (folder / ADAPTER_WEIGHTS).stat().st_size


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


@contextlib.contextmanager
def loaded(base: torch.nn.Module, adapter_dir: str) -> Iterator[PeftModel]:
    """The adapter saved in `adapter_dir` on `base` for the block; afterwards `base` is untouched again."""
    model = PeftModel.from_pretrained(base, adapter_dir)
    try:
        yield model
    finally:
        detach(model)
