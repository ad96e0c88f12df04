"""Fine-tuned models in the MLflow model registry, registered only after a verified reload.

- `AdapterModel`: a pyfunc holding only a LoRA adapter (+ tokenizer) and a reference to its base model
  (offline alias, Hub id + revision, or local path); `load_context` rebuilds base + adapter, `predict`
  answers prompts greedily with the logged generation settings. The transformers flavour is not used for
  adapters: it was seen to reload a PEFT model onto the wrong base weights without a word.
- `ClassifierModel`: a pyfunc holding a fine-tuned sequence classifier; `predict` returns labels and
  per-class probabilities.
- `register_verified`: log → reload from the logged URI → compare logits with the in-memory model →
  only then register, tag, and move the `champion` alias if the new version is better on the same eval set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import RunTag
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from finetune_lab import models, prompts, tracking, training
from finetune_lab.contract import MODEL_ARTIFACT

CHAMPION = "champion"
DEFAULT_MAX_NEW_TOKENS = 30
# The project itself brings every dependency of the pyfunc models.
PIP_REQUIREMENTS = ["finetune-lab"]


class RegistrationError(RuntimeError):
    pass


def _prompt_list(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):  # a list of strings arrives as a one-column frame
        return [str(x) for x in model_input.iloc[:, 0]]
    return [str(x) for x in model_input]


def _load_base(config: dict):
    """The base model named in `config`: offline alias (fetched if needed), tiny/local path, or Hub id + revision."""
    spec = config["base_spec"]
    if spec in models.OFFLINE_MODELS:
        source, problems = models.resolve(spec, models.CAUSAL_LM)
        if problems:
            raise RegistrationError(problems[0])
    elif spec == models.TINY:
        if not Path(config["base_path"], "config.json").is_file():
            raise RegistrationError(
                f"the tiny base model {config['base_path']} is not on this machine (tiny models are made per run)"
            )
        source = models.ModelSource(spec, config["base_path"], config["base_revision"])
    else:
        source = models.ModelSource(spec, spec, config["base_revision"])
    from transformers import AutoModelForCausalLM

    revision = {} if source.revision in ("", "local", "main") or spec in models.OFFLINE_MODELS else {
        "revision": source.revision}
    return AutoModelForCausalLM.from_pretrained(source.path, **revision, **models.model_kwargs(frozen_base=True))


class AdapterModel(mlflow.pyfunc.PythonModel):
    """A LoRA adapter on a referenced base model; predicts replies for a list of prompts."""

    def load_context(self, context) -> None:
        from peft import PeftModel
        from transformers import AutoTokenizer

        self.settings = dict(context.model_config)
        adapter_dir = context.artifacts["adapter"]
        self.tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        self.model = PeftModel.from_pretrained(_load_base(self.settings), adapter_dir).eval()

    def logits(self, text: str) -> torch.Tensor:
        with torch.no_grad():
            encoded = self.tokenizer(text, return_tensors="pt").to(self.model.device)
            return self.model(**encoded).logits.float().cpu()

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.settings["max_new_tokens"])
        return [
            prompts.generate_reply(self.model, self.tokenizer, prompt, self.settings["prompt_format"], max_new_tokens)
            for prompt in _prompt_list(model_input)
        ]


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """A fine-tuned sequence classifier; predicts a label and per-class probabilities per text."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.settings = dict(context.model_config)
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["model"])
        self.model = AutoModelForSequenceClassification.from_pretrained(context.artifacts["model"]).eval()

    def logits(self, text: str) -> torch.Tensor:
        with torch.no_grad():
            encoded = self.tokenizer(text, return_tensors="pt", truncation=True,
                                     max_length=self.settings["max_length"]).to(self.model.device)
            return self.model(**encoded).logits.float().cpu()

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        from finetune_lab.metrics import softmax

        probabilities = np.stack([softmax(self.logits(t).numpy()[0]) for t in _prompt_list(model_input)])
        frame = pd.DataFrame({"label": probabilities.argmax(axis=1), "score": probabilities.max(axis=1)})
        for k in range(probabilities.shape[1]):
            frame[f"prob_{k}"] = probabilities[:, k]
        return frame


def reference_logits(model, tokenizer, texts: list[str], **tokenizer_kwargs) -> list[torch.Tensor]:
    """Logits of the in-memory model, to check a reload against (eval mode: no dropout)."""
    with models.eval_mode(model):
        return [model(**tokenizer(t, return_tensors="pt", **tokenizer_kwargs).to(model.device)).logits.float().cpu()
                for t in texts]


@dataclass
class Candidate:
    """What to register: how to log it, how to check it, and how to compare it with the champion."""

    log: Callable[[], Any]
    """Logs the pyfunc model into the active run; returns its ModelInfo."""
    check_texts: list[str]
    expected_logits: list[torch.Tensor]
    eval_loss: float
    eval_set_digest: str
    tags: dict[str, str]


def _verify(model_uri: str, candidate: Candidate) -> float:
    """Reload from the logged URI and return the largest logit difference to the in-memory model."""
    reloaded = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    worst = 0.0
    for text, expected in zip(candidate.check_texts, candidate.expected_logits):
        worst = max(worst, (reloaded.logits(text) - expected).abs().max().item())
    return worst


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
    info = candidate.log()
    # bf16 matmuls on CUDA may differ in the last bits between two loads; on CPU the reload must be exact.
    tolerance = 1e-2 if training.on_cuda() else 0.0
    difference = _verify(info.model_uri, candidate)
    client = MlflowClient()
    client.log_metric(run_id, "registry_reload_max_logit_diff", difference)
    if difference > tolerance:
        raise RegistrationError(
            f"reloaded model differs from the in-memory one (max |logit diff| {difference:.3g}); not registered"
        )
    champion = _champion(client, name)
    move, decision = _champion_decision(champion, candidate)
    tags = {**candidate.tags, "eval_loss": repr(candidate.eval_loss), "eval_set_digest": candidate.eval_set_digest,
            "reload_max_logit_diff": repr(difference), "champion_decision": decision}
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


def log_adapter_model(adapter_dir: str, base: models.ModelSource, prompt_format: str, max_new_tokens: int,
                      example_prompt: str):
    """Log an AdapterModel pyfunc (adapter files only + base reference) into the active run."""
    config = {"base_spec": base.spec, "base_path": base.path, "base_revision": base.revision,
              "prompt_format": prompt_format, "max_new_tokens": max_new_tokens}
    signature = infer_signature([example_prompt], ["reply"],
                                params={"max_new_tokens": max_new_tokens})
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT, python_model=AdapterModel(), artifacts={"adapter": adapter_dir}, model_config=config,
        signature=signature, pip_requirements=PIP_REQUIREMENTS,
    )


def log_classifier_model(model, tokenizer, max_length: int, example_text: str):
    """Log a ClassifierModel pyfunc (the fine-tuned weights + tokenizer) into the active run."""
    with tracking.scratch_dir("classifier") as scratch:
        model.save_pretrained(scratch / "model")
        tokenizer.save_pretrained(scratch / "model")
        signature = infer_signature([example_text],
                                    pd.DataFrame({"label": [0], "score": [1.0]}))
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=ClassifierModel(), artifacts={"model": str(scratch / "model")},
            model_config={"max_length": max_length}, signature=signature, pip_requirements=PIP_REQUIREMENTS,
        )
