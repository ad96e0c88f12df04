"""The LoRA adapter lifecycle on a frozen causal LM: checks against the architecture and the installed peft, attach /
detach on one base model (for every LoRA variant: `METHOD_SETTINGS`), a copy of its state and its restoration, its
params, and the adapter folder as an artifact.

PiSSA and OLoRA initialise the adapter from the base weights and subtract that part from them: while such an
adapter is attached the base holds residual weights. `adapter` puts the base's own weights back afterwards, and
`log_adapter` saves such an adapter converted to a plain LoRA adapter of twice the rank (peft's conversion) that
applies to the untouched base, like every other adapter of the sweep (a registered adapter is reloaded on the base
as published)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import warnings
from collections.abc import Iterator, Sequence
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
# Each method's settings of peft's LoraConfig (the names of `config.LORA_METHODS`).
METHOD_SETTINGS = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
}
# Methods whose initialisation changes the base weights (see the module's docstring).
MUTATE_BASE = ("pissa", "olora")
# The layer initialiser each of those needs in the installed peft.
INITIALISERS = {"pissa": "pissa_init", "olora": "olora_init"}
# Weight types peft's PiSSA / OLoRA initialisers decompose.
DECOMPOSABLE = (torch.float32, torch.float16, torch.bfloat16)


def check_methods(skeleton: torch.nn.Module, methods: list[str]) -> list[str]:
    """Whether the installed peft has each method, and the model's weights suit it (a weightless skeleton is enough);
    reported under `methods`."""
    import peft
    from peft.tuners.lora import LoraLayer

    options = {f.name for f in dataclasses.fields(LoraConfig)}
    missing = [m for m in methods
               if any(option not in options for option in METHOD_SETTINGS[m])
               or (m in INITIALISERS and not hasattr(LoraLayer, INITIALISERS[m]))]
    problems = []
    if missing:
        problems.append(problem("methods", f"{', '.join(missing)} not supported by the installed peft "
                                           f"{peft.__version__}: pip install -U peft"))
    dtype = next(skeleton.parameters()).dtype
    decomposed = [m for m in methods if m in MUTATE_BASE and m not in missing]
    if decomposed and dtype not in DECOMPOSABLE:
        problems.append(problem("methods", f"{', '.join(decomposed)} decompose the base weights, which this model "
                                           f"holds as {dtype}: choose lora, dora or rslora"))
    return problems


def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers LoRA can target, by path; the output head is left out (as peft's `all-linear` does)."""
    head = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


def _short(path: str) -> str:
    """A layer's name as target_modules gives it: the last component of its path."""
    return path.rsplit(".", 1)[-1]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names (last path component) of the linear layers LoRA can target; the output head is left out."""
    return sorted({_short(path) for path in _linear_layers(model)})


def check_architecture(skeleton: torch.nn.Module, config: LoraTrainingConfig, ranks: list[int],
                       rank_param: str = "ranks", methods: Sequence[str] = ()) -> list[str]:
    """Ranks and target modules against the model (a weightless skeleton is enough), and the ranks of the `methods`
    that decompose the layers they target; rank problems are reported under `rank_param`, the parameter that set
    them."""
    problems = []
    available = linear_module_names(skeleton)
    targets = config.target_module_list
    unknown = [t for t in targets if t not in available] if targets != "all-linear" else []
    if unknown:
        problems.append(
            problem("target_modules", f"{', '.join(unknown)} not in this model; linear modules: {', '.join(available)}")
        )
    hidden = skeleton.config.hidden_size
    too_large = [r for r in ranks if r > hidden]
    if too_large:
        problems.append(problem(rank_param, f"{too_large} exceed the model's hidden size {hidden}"))
    elif not unknown:
        targeted = {path: layer for path, layer in _linear_layers(skeleton).items()
                    if targets == "all-linear" or _short(path) in targets}
        problems += _check_decomposed_ranks(targeted, ranks, [m for m in methods if m in MUTATE_BASE], rank_param)
    return problems


def _check_decomposed_ranks(targeted: dict[str, torch.nn.Linear], ranks: list[int], methods: list[str],
                            rank_param: str) -> list[str]:
    """PiSSA and OLoRA factor each targeted weight (out x in) at rank r, which its smaller side bounds: above it peft
    makes factors of that side instead, and the child fails after training, when its adapter is saved."""
    if not methods or not targeted:
        return []
    smallest = min(min(layer.in_features, layer.out_features) for layer in targeted.values())
    too_large = [r for r in ranks if r > smallest]
    if not too_large:
        return []
    narrow = {_short(path): layer for path, layer in targeted.items()
              if min(layer.in_features, layer.out_features) == smallest}
    shapes = ", ".join(sorted({f"{layer.in_features} x {layer.out_features}" for layer in narrow.values()}))
    return [problem(rank_param, f"{too_large} exceed {smallest}, the smaller side of {', '.join(sorted(narrow))} "
                                f"({shapes}), which {' and '.join(methods)} "
                                f"{'decompose' if len(methods) > 1 else 'decomposes'} into rank-r factors: choose "
                                f"{rank_param} up to {smallest}, or target_modules without those layers")]


def attach(base: torch.nn.Module, config: LoraTrainingConfig, rank: int, seed: int, method: str = "lora"
           ) -> PeftModel:
    """A fresh adapter of `method` on `base`, initialised from `seed`; the first forward equals the base's (B = 0,
    or, for PiSSA / OLoRA, base weights that the adapter's part was subtracted from)."""
    set_seed(seed)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=config.alpha_for(rank),
        lora_dropout=config.lora_dropout,
        target_modules=config.target_module_list,
        task_type="CAUSAL_LM",
        **METHOD_SETTINGS[method],
    )
    return get_peft_model(base, lora_config)


def method_of(model: PeftModel) -> str:
    """The method of the adapter `model` carries (its LoraConfig read back)."""
    settings = model.peft_config["default"]
    return next((m for m, options in METHOD_SETTINGS.items()
                 if options and all(getattr(settings, k) == v for k, v in options.items())), "lora")


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
        # rank-stabilised LoRA scales the update by alpha / sqrt(r) instead of alpha / r
        "lora_scale": alpha / math.sqrt(rank) if model.peft_config["default"].use_rslora else alpha / rank,
        "alpha_mode": "fixed" if config.lora_alpha > 0 else f"alpha_per_rank={config.alpha_per_rank}",
        "target_modules": ",".join(sorted(model.peft_config["default"].target_modules)),
        "lora_method": method_of(model),
        "seed": seed,
        "trainable_percent": round(100.0 * trainable / total, 4),
    }


def trainable_params(model: PeftModel) -> int:
    return model.get_nb_trainable_parameters()[0]


def log_adapter(model: PeftModel, tokenizer, artifact_path: str = ADAPTER_ARTIFACT, keep_in: Path | None = None
                ) -> int:
    """Log the adapter folder (config + weights, no base weights; PiSSA / OLoRA converted to apply to the untouched
    base) and the tokenizer into the active run; return the weights' size in bytes. `keep_in`: a folder that keeps
    a copy of what was logged."""
    with tracking.scratch_dir("adapter") as scratch:
        folder = (keep_in or Path(scratch)) / artifact_path
        # Only linear layers are ever targeted and the vocabulary is never resized: no embeddings to save (and no
        # lookup of the base's config by its name, which is an alias or a Hub id, not a folder).
        with warnings.catch_warnings():
            # The conversion loads the initial adapter next to the trained one, and peft warns against mixing
            # PiSSA / OLoRA with other adapters: the conversion is what undoes that mix.
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
            model.save_pretrained(folder, save_embedding_layers=False,
                                  path_initial_model_for_weight_conversion=getattr(model, "initial_adapter", None))
        tokenizer.save_pretrained(folder)
        mlflow.log_artifacts(str(folder), artifact_path)
        return (folder / ADAPTER_WEIGHTS).stat().st_size


@contextlib.contextmanager
def adapter(base: torch.nn.Module, config: LoraTrainingConfig, rank: int, seed: int, method: str = "lora"
            ) -> Iterator[PeftModel]:
    """A fresh adapter of `method` for the block; afterwards `base` is the untouched frozen model again."""
    with _base_kept(base, method) as initial_adapter:
        model = attach(base, config, rank, seed, method=method)
        try:
            if initial_adapter:
                _save_initial(model, initial_adapter)
            yield model
        finally:
            detach(model)
            if training.on_cuda():
                torch.cuda.empty_cache()


@contextlib.contextmanager
def _base_kept(base: torch.nn.Module, method: str) -> Iterator[str]:
    """For a method that changes the base weights: a copy of the linear layers' weights, put back at the end, and a
    folder for the adapter as initialised (yielded; "" for the other methods)."""
    if method not in MUTATE_BASE:
        yield ""
        return
    kept = {name: module.weight.detach().clone() for name, module in base.named_modules()
            if isinstance(module, torch.nn.Linear)}
    try:
        with tempfile.TemporaryDirectory(prefix="finetune_lab_initial_") as folder:
            yield str(Path(folder) / "initial")
    finally:
        with torch.no_grad():
            for name, module in base.named_modules():
                if name in kept:
                    module.weight.copy_(kept[name])


def _save_initial(model: PeftModel, folder: str) -> None:
    """The adapter as initialised, saved for peft's conversion to a plain LoRA adapter (`log_adapter`); its config
    says a plain initialisation, as that conversion requires."""
    settings = model.peft_config["default"]
    method_init, settings.init_lora_weights = settings.init_lora_weights, True
    try:
        model.save_pretrained(folder, save_embedding_layers=False)
    finally:
        settings.init_lora_weights = method_init
    model.initial_adapter = folder


@contextlib.contextmanager
def loaded(base: torch.nn.Module, adapter_dir: str) -> Iterator[PeftModel]:
    """The adapter saved in `adapter_dir` on `base` for the block; afterwards `base` is untouched again."""
    model = PeftModel.from_pretrained(base, adapter_dir)
    try:
        yield model
    finally:
        detach(model)
