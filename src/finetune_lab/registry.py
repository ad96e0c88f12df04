"""Fine-tuned models in the MLflow model registry, registered only after a verified reload.

The pyfunc classes live in `pyfunc_models` (lean: it is what runs wherever a registered model is loaded). Here:
- `log_adapter_model` / `log_classifier_model`: log them so that they travel: this package's code goes with the
  model (`code_paths`), the requirements are pinned to the versions used (never `finetune-lab`: an unrelated
  project of that name is on PyPI), and a signature plus an input example describe the call.
- `register_verified`: log → reload from the logged URI on the device and in the dtype the in-memory model ran in
  → compare logits (exactly on a CPU, within rounding of the dtype on a GPU: `device.reload_tolerance`) → only
  then register, tag, and settle the `champion` alias (`champion_decision` compares two versions: the alias moves
  only to a version shown better on the same held-out examples by the paired test; the settling holds when
  registrations into one name run at the same moment).
- `check_may_register`: on a server with accounts, refuse a `register_as` the account may not write, up front.
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

from finetune_lab import console, device, held_out, models, tracking, verdicts
from finetune_lab.contract import MODEL_ARTIFACT
from finetune_lab.errors import InputError, problem
from finetune_lab.pyfunc_models import AdapterModel, ClassifierModel, base_settings

CHAMPION = "champion"
# Moves of the alias one registration makes at most while settling it (`settle_champion`); with a comparison that
# orders versions it needs one more than the registrations that run at the same moment.
SETTLE_ROUNDS = 10
# A registered-model tag no model has: deleting it asks the server for the permission to change the model.
PERMISSION_PROBE_TAG = "finetune_lab.permission_probe"
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


def champion_decision(current, challenger, records: held_out.Records | None = None) -> tuple[bool, str]:
    """Whether model version `challenger` takes the `champion` alias from `current` (the champion version, or None),
    and why. The one place where two versions are compared: every move of the alias asks it.

    The alias moves only when the challenger is shown better on the same held-out examples (same `eval_set_digest`)
    by the paired test of the per-example records of the runs their `run_id` tags name (`held_out`): McNemar's exact
    test for classifiers, the paired t-test of per-example losses for adapters, at the 5 % level. One model each:
    the test set's noise is measured, training's is not. `records`: the records read so far (a settle call reads
    each run's once)."""
    if current is None:
        return True, "first version with an eval loss: alias set"
    kept = f"kept on v{current.version}"
    if current.tags.get("eval_set_digest") != challenger.tags.get("eval_set_digest"):
        return False, f"{kept}: its eval set differs, the versions are not comparable"
    records = records or held_out.Records()
    challenging, holding = (records.of(v.tags.get("run_id", "")) for v in (challenger, current))
    if challenging is None:
        return False, (f"{kept}: this version's run {challenger.tags.get('run_id', '(none named)')} has no per-example "
                       "held-out record to test it with")
    if holding is None:
        return False, (f"{kept}: its run {current.tags.get('run_id', '(none named)')} has no per-example held-out "
                       "record, so it cannot be shown worse")
    if (challenging.kind, challenging.examples) != (holding.kind, holding.examples):
        return False, f"{kept}: their held-out records are not on the same examples"
    new, old = f"v{challenger.version}", f"v{current.version}"
    if challenging.kind == verdicts.CORRECT:  # the accuracy McNemar's test compares
        metric, means = "accuracy", [float(record.values.mean()) for record in (challenging, holding)]
    else:
        metric, means = "eval_loss", [float(version.tags["eval_loss"]) for version in (challenger, current)]
    (verdict,) = verdicts.compare({new: [means[0]], old: [means[1]]}, metric, metric == "eval_loss", reference=old,
                                  held_out={new: challenging.held_out(), old: holding.held_out()})
    if verdict.winner == new:
        return True, f"moved from v{current.version}: {verdict.line()}"
    return False, f"{kept}: {verdict.line()}"


def _best_version(client: MlflowClient, name: str, current, records: held_out.Records):
    """The version that ends with the alias when every version of `name` with an eval loss, oldest first,
    challenges the champion (`current`) in turn."""
    best = current
    for version in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        if "eval_loss" in version.tags and (best is None or version.version != best.version):
            if champion_decision(best, version, records)[0]:
                best = version
    return best


def settle_champion(client: MlflowClient, name: str, records: held_out.Records | None = None):
    """Move `champion` until it rests on the best version of `name`; return that version and, for each version this
    call moved the alias to, the version it took it from. Registrations into one name at the same moment each read
    the alias, decide and write it: the last writer would win, whatever its loss. Each of them settles after
    creating its version instead, re-reading the versions after every move: the last to move the alias has then seen
    every version created before its move, and a version created later is settled by its own registration. The
    alias only moves to a version shown better than the one holding it, so it cannot go round in circles. `records`:
    the runs' per-example records read so far (default: none yet); each is downloaded once per call."""
    taken_from, records = {}, records or held_out.Records(client)
    for _ in range(SETTLE_ROUNDS):
        current = _champion(client, name)
        best = _best_version(client, name, current, records)
        if best is None or (current is not None and best.version == current.version):
            return best, taken_from
        client.set_registered_model_alias(name, CHAMPION, best.version)
        taken_from[best.version] = current
    console.say(f"the {CHAMPION} alias of {name!r} was still moving after {SETTLE_ROUNDS} rounds; left on "
                f"v{best.version}")
    return best, taken_from


def _ensure_registered_model(client: MlflowClient, name: str) -> bool:
    """Create registered model `name` if it does not exist; True if this call created it."""
    try:
        client.create_registered_model(name)
        return True
    except mlflow.exceptions.MlflowException as error:
        if error.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            return False
        raise


def check_may_register(name: str) -> None:
    """Refuse (one line, InputError) before anything is trained when this account may not add versions to the
    registered model `name` or move its alias (a tracking server with accounts: EDIT on the model). A model that does
    not exist yet is created by the registration, which any account may do."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
        # The permission a new version and the alias need (update), asked by a write that changes nothing: the tag
        # deleted is one no model has.
        client.delete_registered_model_tag(name, PERMISSION_PROBE_TAG)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        if error.error_code == "PERMISSION_DENIED":
            user = tracking.credentials().get("MLFLOW_TRACKING_USERNAME", "")
            raise InputError([problem("register_as", f"user {user!r} may not register versions of model {name!r} on "
                                      f"{mlflow.get_tracking_uri()}: ask its owner or the server's administrator for "
                                      "EDIT permission on it, or choose another name")]) from None
        raise


def register_verified(name: str, candidate: Candidate, run_id: str) -> dict[str, str]:
    """Log into run `run_id` (the active run), verify the reload, register as a new version of `name` with all its
    tags, settle `champion` (`settle_champion`) and tag the version with the decision; the outcome is also tagged on
    the run.

    Nothing is registered when the reload differs from the in-memory model (RegistrationError). Registration is
    all or nothing: the version is created with its tags in one call, and deleted again (with the registered
    model, if this call created it and it is left empty) when anything after that fails; the alias then settles
    on the best version left."""
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
    previous = _champion(client, name)
    tags = {**candidate.tags, "eval_loss": repr(candidate.eval_loss), "eval_set_digest": candidate.eval_set_digest,
            "reload_max_logit_diff": repr(difference), "reload_tolerance": repr(tolerance),
            "reload_device": f"{candidate.expected.device} {device.dtype_name(candidate.expected.dtype)}"}
    created_model = _ensure_registered_model(client, name)
    version = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)
    try:
        records = held_out.Records(client)
        champion, taken_from = settle_champion(client, name, records)
        won = champion is not None and champion.version == version.version
        # the winner is compared with the version it took the alias from (the champion it found, unless a
        # registration at the same moment moved it meanwhile), the others with the champion they end under
        decision = champion_decision(taken_from.get(version.version, previous) if won else champion, version,
                                     records)[1]
        client.set_model_version_tag(name, version.version, "champion_decision", decision)
        client.log_batch(run_id, tags=[RunTag("registered_model", f"{name}/{version.version}"),
                                       RunTag("champion_decision", decision)])
    except BaseException:  # noqa: BLE001 - also on SIGTERM: never leave a half-registered version behind
        client.delete_model_version(name, version.version)  # also drops the alias if it moved here...
        if previous is not None and _champion(client, name) is None:  # ...so give it back to the one that held it
            client.set_registered_model_alias(name, CHAMPION, previous.version)
        if created_model and not client.search_model_versions(f"name='{name}'"):
            client.delete_registered_model(name)
        else:
            settle_champion(client, name)
        raise
    return {"name": name, "version": str(version.version), "champion": str(won), "decision": decision,
            "model_uri": f"models:/{name}/{version.version}"}


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
