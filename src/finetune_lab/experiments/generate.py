"""Experiment: answer a prompt with a registered model (`models:/NAME@champion`) or any pyfunc model URI, in a run
of its own that records the prompt and the reply."""

from __future__ import annotations

import os

import mlflow

from finetune_lab import contract, device, tracking
from finetune_lab.config import GenerateConfig
from finetune_lab.errors import InputError, one_line, problem, raise_if_any
from finetune_lab.schema import as_params

MAX_REPLY_TAG_CHARS = 5000


def served_precision(loaded) -> dict[str, str]:
    """`effective_precision`: the dtype a model of this project loaded its weights in (an adapter's base; a
    classifier's weights); nothing for another pyfunc model."""
    try:
        served = getattr(loaded.unwrap_python_model(), "model", None)
    except mlflow.exceptions.MlflowException:  # not a Python model
        return {}
    if served is None or not hasattr(served, "get_input_embeddings"):
        return {}
    return {"effective_precision": device.PRECISION_OF[served.get_input_embeddings().weight.dtype]}


def run(config: GenerateConfig) -> dict:
    """Load the model, answer `config.prompt`; return the run id and the reply."""
    with tracking.experiment_run(contract.GENERATE, config.experiment, config.run_name) as active:
        tracking.log_config(as_params(config))
        raise_if_any(config.problems())
        setting = config.device or os.environ.get(device.DEVICE_ENV, "")
        try:
            on = device.choose(setting, device.detect())
        except ValueError as error:
            raise InputError([problem("device", str(error))]) from error
        tracking.log_params({"serving_device": on})
        # A registry name means something only in the store that registered it: say which one was read.
        store = mlflow.get_tracking_uri()
        try:
            with device.serving_on(on, config.precision):
                loaded = mlflow.pyfunc.load_model(config.model_uri)
        except mlflow.exceptions.MlflowException as error:
            raise InputError([problem("model_uri", f"cannot load {config.model_uri!r} from the tracking store {store} "
                                                   f"(set MLFLOW_TRACKING_URI to the store that registered it): "
                                                   f"{one_line(error)}")]) from error
        tracking.log_params(served_precision(loaded))
        params = {"max_new_tokens": config.max_new_tokens} if config.max_new_tokens else None
        reply = loaded.predict([config.prompt], params=params)[0]
        mlflow.set_tag("reply", reply[:MAX_REPLY_TAG_CHARS])
        mlflow.log_text(f"prompt: {config.prompt}\nreply: {reply}\n", "reply.txt")
        return {"run_id": active.info.run_id, "metrics": {},
                "notes": [f"model:  {config.model_uri} from the tracking store {store}, on {on}",
                          f"prompt: {config.prompt}", f"reply:  {reply}"],
                "ui": tracking.ui_hint(active.info.experiment_id)}
