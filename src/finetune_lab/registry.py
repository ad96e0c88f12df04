"""Fine-tuned models in the MLflow model registry, registered only after a verified reload.

The pyfunc classes live in `pyfunc_models` (lean: it is what runs wherever a registered model is loaded). Here:
- `log_adapter_model` / `log_classifier_model`: log them so that they travel: this package's code goes with the
  model (`code_paths`), the requirements are pinned to the versions used (never `finetune-lab`: an unrelated
  project of that name is on PyPI), and a signature plus an input example describe the call.
- `register_verified`: log → reload from the logged URI on the device and in the dtype the in-memory model ran in
  → compare logits (exactly on a CPU, within rounding of the dtype on a GPU: `device.reload_tolerance`) → only
  then register, tag, and move the `champion` alias if the new version is better on the same eval set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import RunTag
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from finetune_lab import console, device, models, tracking
from finetune_lab.contract import MODEL_ARTIFACT
from finetune_lab.pyfunc_models import AdapterModel, ClassifierModel, base_settings

CHAMPION = "champion"
DEFAULT_MAX_NEW_TOKENS = 30
# The package folder itself (not its parent `src/`): it is copied to `<model>/code/finetune_lab`, which MLflow
# puts first on sys.path before unpickling the model.
PACKAGE_DIR = str(Path(__file__).resolve().parent)
# What every registered model imports when it loads (see `pyfunc_models`); adapters also need peft.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")


class RegistrationError(RuntimeError):
    pass


def pinned(packages) -> list[str]:
    """`name==version` as installed here (without a local build tag such as `+cpu`, so that the pin resolves on
    PyPI)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in packages]


@dataclass
class Reference:
    """Logits of a model in memory, to check its reload against, and where they were computed."""

    logits: list[torch.Tensor]
    device: str
    """`cpu` or `cuda`: the reload is made there too."""
    dtype: torch.dtype
    """The dtype of the model's weights outside the trained parts (an adapter's frozen base; a classifier's)."""


def reference(model, tokenizer, texts: list[str], **tokenizer_kwargs) -> Reference:
    """Logits of the in-memory model (eval mode: no dropout), as a registered model computes them (`pyfunc_models`:
    no autocast, the weights' own dtype). The model computes with its own forward: a trained one has it back from
    `training.train` (the Trainer's autocast wrapper removed)."""
    with models.eval_mode(model):
        logits = [model(**tokenizer(t, return_tensors="pt", **tokenizer_kwargs).to(model.device)).logits.float().cpu()
                  for t in texts]
    return Reference(logits, model.device.type, model.get_input_embeddings().weight.dtype)


@dataclass
class Candidate:
    """What to register: how to log it, how to check it, and how to compare it with the champion."""

    log: Callable[[], Any]
    """Logs the pyfunc model into the active run; returns its ModelInfo."""
    check_texts: list[str]
    expected: Reference
    eval_loss: float
    eval_set_digest: str
    tags: dict[str, str]


def _verify(model_uri: str, candidate: Candidate) -> tuple[float, float]:
    """Reload from the logged URI (on the device the in-memory model ran on: see `register_verified`); return the
    largest logit difference to it and the tolerance for its dtype. RegistrationError if the reload is not like
    for like."""
    expected = candidate.expected
    reloaded = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    where = (reloaded.model.device.type, reloaded.model.get_input_embeddings().weight.dtype)
    if where != (expected.device, expected.dtype):
        raise RegistrationError(f"reloaded on {where[0]} in {where[1]}, trained on {expected.device} in "
                                f"{expected.dtype}: the check would not compare like with like; not registered")
    worst = max((reloaded.logits(text) - logits).abs().max().item()
                for text, logits in zip(candidate.check_texts, expected.logits))
    magnitude = max(logits.abs().max().item() for logits in expected.logits)
    return worst, device.reload_tolerance(expected.dtype, expected.device, magnitude)


def _champion(client: MlflowClient, name: str):
    """The version the `champion` alias points at, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def _champion_decision(current, candidate: Candidate) -> tuple[bool, str]:
    """Whether `candidate` takes the alias from `current` (the champion version, or None), and why."""
    if current is None:
        return True, "first version with an eval loss: alias set"
    old_loss = float(current.tags.get("eval_loss", "inf"))
    if current.tags.get("eval_set_digest") != candidate.eval_set_digest:
        return False, f"kept on v{current.version}: its eval set differs, losses are not comparable"
    if candidate.eval_loss < old_loss:
        return True, f"moved from v{current.version}: eval_loss {candidate.eval_loss:.4f} < {old_loss:.4f}"
    return False, f"kept on v{current.version}: eval_loss {candidate.eval_loss:.4f} >= {old_loss:.4f}"


def _ensure_registered_model(client: MlflowClient, name: str) -> bool:
    """Create registered model `name` if it does not exist; True if this call created it."""
    try:
        client.create_registered_model(name)
        return True
    except mlflow.exceptions.MlflowException as error:
        if error.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            return False
        raise


def register_verified(name: str, candidate: Candidate, run_id: str) -> dict[str, str]:
    """Log into run `run_id` (the active run), verify the reload, register as a new version of `name` with all its
    tags, maybe move `champion`; the outcome is also tagged on the run.

    Nothing is registered when the reload differs from the in-memory model (RegistrationError). Registration is
    all or nothing: the version is created with its tags in one call, and deleted again (with the registered
    model, if this call created it and it is left empty) when anything after that fails.
    """
    console.say(f"registering in {name!r}: log the model, reload it, compare its logits with the trained model's")
    # On the trained model's device, in its dtype; MLflow loads the model to check its input example too.
    with device.serving_on(candidate.expected.device, device.PRECISION_OF[candidate.expected.dtype]):
        info = candidate.log()
        difference, tolerance = _verify(info.model_uri, candidate)
    client = MlflowClient()
    client.log_metric(run_id, "registry_reload_max_logit_diff", difference)
    client.log_metric(run_id, "registry_reload_tolerance", tolerance)
    if difference > tolerance:
        raise RegistrationError(
            f"reloaded model differs from the in-memory one (max |logit diff| {difference:.3g} > {tolerance:.3g} "
            f"allowed on {candidate.expected.device} in {candidate.expected.dtype}); not registered"
        )
    champion = _champion(client, name)
    move, decision = _champion_decision(champion, candidate)
    tags = {**candidate.tags, "eval_loss": repr(candidate.eval_loss), "eval_set_digest": candidate.eval_set_digest,
            "reload_max_logit_diff": repr(difference), "reload_tolerance": repr(tolerance),
            "reload_device": f"{candidate.expected.device} {device.dtype_name(candidate.expected.dtype)}",
            "champion_decision": decision}
    created_model = _ensure_registered_model(client, name)
    version = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags,
                                          model_id=info.model_id).version
    try:
        if move:
            client.set_registered_model_alias(name, CHAMPION, version)
        client.log_batch(run_id, tags=[RunTag("registered_model", f"{name}/{version}"),
                                       RunTag("champion_decision", decision)])
    except BaseException:  # noqa: BLE001 - also on SIGTERM: never leave a half-registered version behind
        client.delete_model_version(name, version)  # also drops the alias if it already moved here...
        if move and champion is not None:  # ...so give it back to the version that held it
            client.set_registered_model_alias(name, CHAMPION, champion.version)
        if created_model and not client.search_model_versions(f"name='{name}'"):
            client.delete_registered_model(name)
        raise
    return {"name": name, "version": str(version), "champion": str(move), "decision": decision,
            "model_uri": f"models:/{name}/{version}"}


def log_adapter_model(adapter_dir: str, base: models.ModelSource, base_dtype: torch.dtype, prompt_format: str,
                      max_new_tokens: int, example_prompt: str):
    """Log an AdapterModel pyfunc (adapter files only + base reference, and the dtype the base was trained in) into
    the active run."""
    settings = {**base_settings(base, base_dtype), "prompt_format": prompt_format, "max_new_tokens": max_new_tokens}
    example_params = {"max_new_tokens": max_new_tokens}
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT, python_model=AdapterModel(settings), artifacts={"adapter": adapter_dir},
        signature=infer_signature([example_prompt], ["reply"], params=example_params),
        input_example=([example_prompt], example_params), metadata=settings, code_paths=[PACKAGE_DIR],
        pip_requirements=pinned([*MODEL_REQUIREMENTS, "peft", *models.requirements(base)]),
    )


def log_classifier_model(model, tokenizer, max_length: int, example_text: str):
    """Log a ClassifierModel pyfunc (the fine-tuned weights + tokenizer, loaded back in their dtype) into the active
    run."""
    settings = {"max_length": max_length, "dtype": device.dtype_name(model.dtype)}
    outputs = Schema([ColSpec("long", "label"), ColSpec("string", "label_name"), ColSpec("double", "score"),
                      *(ColSpec("double", f"prob_{k}") for k in range(model.config.num_labels))])
    signature = ModelSignature(inputs=infer_signature([example_text]).inputs, outputs=outputs)
    with tracking.scratch_dir("classifier") as scratch:
        model.save_pretrained(scratch / "model")
        tokenizer.save_pretrained(scratch / "model")
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=ClassifierModel(settings), artifacts={"model": str(scratch / "model")},
            signature=signature, input_example=[example_text], metadata=settings,
            code_paths=[PACKAGE_DIR], pip_requirements=pinned(MODEL_REQUIREMENTS),
        )
