"""Adapters and classifiers in the model registry: exact reload in a fresh process, adapter-only artifacts,
champion alias moves only on improvement, nothing registered when the reload check fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import REPO, entrypoint, load_table
from finetune_lab import classify, lora, prompts, registry, sweep
from finetune_lab.config import ClassifyConfig, SweepConfig

PROMPT = "Hello, how are you?"
NAME = "chat-adapter"


def tiny_sweep(**overrides) -> SweepConfig:
    settings = dict(model="tiny", dataset="sample_chat", ranks=(2, 4), seeds=(5,), max_steps=6, batch_size=8,
                    max_length=48, learning_rate=1e-2, experiment="registry", register_as=NAME)
    return SweepConfig(**{**settings, **overrides})


@pytest.fixture
def in_memory(monkeypatch):
    """Logits and greedy tokens of every child's trained model, captured while it is still in memory."""
    captured = {}
    original = lora.log_adapter

    def capture(model, tokenizer, *args, **kwargs):
        text = prompts.prompt_text(tokenizer, PROMPT, "plain")
        encoded = tokenizer(text, return_tensors="pt")
        model.eval()
        with torch.no_grad():
            captured[mlflow.active_run().info.run_id] = {
                "logits": model(**encoded).logits,
                "tokens": model.generate(**encoded, max_new_tokens=12, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id),
            }
        return original(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(lora, "log_adapter", capture)
    return captured


FRESH_PROCESS = """
import sys, torch, mlflow
from finetune_lab import prompts
model = mlflow.pyfunc.load_model(sys.argv[1])
inner = model.unwrap_python_model()
text = prompts.prompt_text(inner.tokenizer, sys.argv[2], "plain")
encoded = inner.tokenizer(text, return_tensors="pt")
with torch.no_grad():
    result = {"logits": inner.model(**encoded).logits,
              "tokens": inner.model.generate(**encoded, max_new_tokens=12, do_sample=False,
                                             pad_token_id=inner.tokenizer.pad_token_id),
              "reply": model.predict([sys.argv[2]])[0]}
torch.save(result, sys.argv[3])
"""


def test_registered_adapter_reloads_exactly_in_a_fresh_process(client, in_memory, tmp_path, tracking_uri):
    result = sweep.run(tiny_sweep())
    parent = client.get_run(result["run_id"])
    champion = client.get_model_version_by_alias(NAME, registry.CHAMPION)
    best_run_id = parent.data.tags["best_run_id"]
    assert champion.tags["run_id"] == best_run_id and champion.tags["rank"] == parent.data.tags["best_rank"]
    assert float(champion.tags["eval_loss"]) == client.get_run(best_run_id).data.metrics["eval_loss"]
    assert champion.tags["dataset_digest"] == parent.data.params["dataset_digest"]

    out = tmp_path / "fresh.pt"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    reload = subprocess.run([sys.executable, "-c", FRESH_PROCESS, f"models:/{NAME}@champion", PROMPT, str(out)],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert reload.returncode == 0, reload.stderr[-3000:]
    fresh = torch.load(out)
    expected = in_memory[best_run_id]
    assert torch.equal(fresh["logits"], expected["logits"]), "reloaded logits must equal the in-memory ones"
    assert torch.equal(fresh["tokens"], expected["tokens"])

    # The `generate` entry point answers from the registry in its own process, with the same greedy reply.
    answer = subprocess.run([sys.executable, str(REPO / "entrypoints" / "generate.py"), "--model-uri",
                             f"models:/{NAME}@champion", "--prompt", PROMPT, "--max-new-tokens", "12"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert f"reply:  {fresh['reply']}".strip() in answer.stdout

    # Only the adapter travels: no base weights, far smaller than the base model.
    files = {}
    for path in Path(client.download_artifacts(parent.info.run_id, registry.MODEL_ARTIFACT, str(tmp_path / "m"))).rglob("*"):
        if path.is_file():
            files[path.name] = path.stat().st_size
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    base_size = (Path(parent.data.params["model_path"]) / "model.safetensors").stat().st_size
    assert sum(files.values()) < base_size / 2


def test_champion_moves_only_on_improvement(client):
    sweep.run(tiny_sweep(max_steps=2, learning_rate=1e-3))
    sweep.run(tiny_sweep(max_steps=12))
    sweep.run(tiny_sweep(max_steps=1, learning_rate=1e-4))
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{NAME}'")}
    assert sorted(versions) == ["1", "2", "3"]
    loss = {k: float(v.tags["eval_loss"]) for k, v in versions.items()}
    assert loss["2"] < loss["1"] and loss["3"] >= loss["2"], loss
    assert str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version) == "2"
    assert versions["2"].tags["champion_decision"].startswith("moved from v1")
    assert versions["3"].tags["champion_decision"].startswith("kept on v2")


def test_champion_stays_when_the_eval_set_differs(client):
    """Losses on different eval sets are not comparable: a lower loss on a smaller eval set must not win."""
    base = dict(model="tiny", dataset="sample", max_train_samples=64, max_length=32, learning_rate=1e-3,
                experiment="registry", register_as="sentiment")
    classify.run(ClassifyConfig(**base, max_eval_samples=100, epochs=1))
    classify.run(ClassifyConfig(**base, max_eval_samples=20, epochs=3))
    versions = {str(v.version): v for v in client.search_model_versions("name='sentiment'")}
    first, second = versions["1"].tags, versions["2"].tags
    assert first["eval_set_digest"] != second["eval_set_digest"], "the digest must describe the eval set used"
    assert second["champion_decision"] == "kept on v1: its eval set differs, losses are not comparable"
    assert str(client.get_model_version_by_alias("sentiment", registry.CHAMPION).version) == "1"


def test_failed_reload_check_registers_nothing(client, monkeypatch):
    monkeypatch.setattr(registry, "_verify", lambda uri, candidate: 0.5)
    with pytest.raises(registry.RegistrationError, match="not registered"):
        sweep.run(tiny_sweep(ranks=(2,)))
    assert client.search_model_versions(f"name='{NAME}'") == []
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("registry").experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED" and "RegistrationError" in parent.data.tags["error"]


def test_a_failure_after_the_version_is_created_leaves_no_version_behind(client, monkeypatch):
    """Registration is all or nothing: a version (created with its tags in one call) is deleted again when a later
    step fails, the champion alias goes back where it was, and a registered model this call created goes too."""
    sweep.run(tiny_sweep(ranks=(2,), max_steps=2, learning_rate=1e-3))
    original = MlflowClient.log_batch

    def fail_on_the_registration_tags(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
        if any(tag.key == "registered_model" for tag in tags):
            raise RuntimeError("injected failure after the version was created")
        return original(self, run_id, metrics, params, tags, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", fail_on_the_registration_tags)
    with pytest.raises(RuntimeError, match="injected failure"):
        sweep.run(tiny_sweep(ranks=(2,), max_steps=12))  # a lower loss: the alias moves, then the failure
    assert [(str(v.version), v.status) for v in client.search_model_versions(f"name='{NAME}'")] == [("1", "READY")]
    assert str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version) == "1"
    failed = [r for r in client.search_runs([client.get_experiment_by_name("registry").experiment_id])
              if "mlflow.parentRunId" not in r.data.tags and r.info.status == "FAILED"]
    assert len(failed) == 1 and "injected failure" in failed[0].data.tags["error"]
    assert "registered_model" not in failed[0].data.tags

    with pytest.raises(RuntimeError, match="injected failure"):
        sweep.run(tiny_sweep(ranks=(2,), max_steps=2, register_as="never-registered"))
    assert client.search_registered_models(filter_string="name='never-registered'") == []


def test_registered_classifier_predicts_what_the_run_logged(client, tmp_path):
    config = ClassifyConfig(model="tiny", dataset="sample", max_train_samples=64, max_eval_samples=24, max_length=32,
                            learning_rate=1e-3, experiment="registry", register_as="sentiment")
    result = classify.run(config)
    table = load_table(client, result["run_id"], "predictions.json", tmp_path)
    loaded = mlflow.pyfunc.load_model("models:/sentiment@champion")
    predicted = loaded.predict(list(table["text"]))
    assert list(predicted["label"]) == list(table["prediction"])
    # The run scored padded batches, the model scores one text at a time: equal up to float rounding.
    assert predicted["prob_1"].to_numpy() == pytest.approx(table["prob_1"].to_numpy(), abs=1e-4)
    version = client.get_model_version_by_alias("sentiment", registry.CHAMPION)
    assert float(version.tags["reload_max_logit_diff"]) == 0.0


@pytest.mark.parametrize("args, expected", [
    ([], "error: model_uri: is required, e.g. models:/NAME@champion"),
    (["--model-uri", "models:/nobody@champion"], "error: model_uri: cannot load 'models:/nobody@champion'"),
    (["--model-uri", "models:/x/1", "--prompt", " ", "--max-new-tokens", "-1"], "error: prompt: must not be empty"),
])
def test_generate_bad_input_is_one_clear_line(client, args, expected):
    outcome = CliRunner().invoke(entrypoint("generate").main, args)
    assert outcome.exit_code == 2 and expected in outcome.output and "Traceback" not in outcome.output
