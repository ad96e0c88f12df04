"""Registering on the team's server: two registrations into one model name at the same moment leave `champion` on
the version shown better whatever the interleaving, and a member without permission on a registered model is refused
in one line before anything is trained."""

from __future__ import annotations

import threading

import mlflow
import numpy as np
import pytest
from support import mlflow_state
from test_team_server_e2e import refused_with_one_line
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from finetune_lab import device, models, registry
from finetune_lab.experiments import classify

# On the team's server (the session's `team_server`): `make test-team`; its tests share the worker that holds it.
pytestmark = [pytest.mark.team, pytest.mark.xdist_group("team_server")]

MODEL = "race"
GUARDED = "ginas-model"
CHECK_TEXTS = ["a fine film", "a dull film"]
MAX_LENGTH = 32


@pytest.fixture
def as_gina(team_server, monkeypatch):
    """This process's MLflow calls made by member gina (what she exports)."""
    mlflow_state.forget(monkeypatch)  # this process's earlier stores mean nothing here
    gina = team_server.env("gina") if "gina" in team_server.passwords else team_server.add_user("gina")
    for key, value in gina.items():
        monkeypatch.setenv(key, value)
    # both registrations load their model on the CPU (`device.serving_on` sets it for the process while they do)
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    return team_server.client("gina")


# Of 60 held-out reviews, the better registration's run got 50 right, the worse one's 36 of the same: McNemar's
# test shows the difference (14 discordant examples, all one way).
RIGHT = {"better": 50, "worse": 36}


def candidate(model, tokenizer, eval_loss: float, run_id: str) -> registry.Candidate:
    return registry.Candidate(
        log=lambda: registry.log_classifier_model(model, tokenizer, MAX_LENGTH, CHECK_TEXTS[0]),
        check_texts=CHECK_TEXTS,
        expected=registry.reference(model, tokenizer, CHECK_TEXTS, truncation=True, max_length=MAX_LENGTH),
        eval_loss=eval_loss, eval_set_digest="one-eval-set", tags={"run_id": run_id})


def log_predictions(right: int) -> None:
    """The active run's predictions table, right on the first `right` of 60 held-out reviews."""
    labels = np.arange(60) % 2
    predicted = np.where(np.arange(60) < right, labels, 1 - labels)
    classify._log_predictions([f"review {k}" for k in range(60)], labels, np.eye(2)[predicted] * 0.8 + 0.1,
                              ["negative", "positive"])


def test_two_registrations_at_once_leave_the_champion_on_the_better_version(as_gina, monkeypatch):
    """The interleaving that lost: both read the alias (none yet) before either writes it, the better registration
    finishes, then the worse one writes. Each would have moved the alias; the worse must not keep it."""
    source = models.tiny(models.CLASSIFIER, [*CHECK_TEXTS, "fine", "dull"] * 4, seed=3)
    model = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    experiment_id = as_gina.create_experiment("registrations")

    both_read, better_done = threading.Barrier(2, timeout=120), threading.Event()
    reads, results, failures = [], {}, []
    read_champion, set_alias = registry._champion, mlflow.MlflowClient.set_registered_model_alias

    def read_together(client, name):
        found = read_champion(client, name)
        if threading.current_thread().name not in [name for name, _ in reads]:
            reads.append((threading.current_thread().name, found))
            both_read.wait()
        return found

    def worse_writes_last(self, *args, **kwargs):
        if threading.current_thread().name == "worse":
            assert better_done.wait(120)
        return set_alias(self, *args, **kwargs)

    def register(eval_loss: float) -> None:
        try:
            with mlflow.start_run(experiment_id=experiment_id) as run:  # each thread's own active run
                log_predictions(RIGHT[threading.current_thread().name])
                results[threading.current_thread().name] = registry.register_verified(
                    MODEL, candidate(model, tokenizer, eval_loss, run.info.run_id), run.info.run_id)
        except Exception as error:  # noqa: BLE001 - collected for the test's assertion
            failures.append(repr(error))
        finally:
            if threading.current_thread().name == "better":
                better_done.set()

    monkeypatch.setattr(registry, "_champion", read_together)
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", worse_writes_last)
    threads = [threading.Thread(target=register, args=(loss,), name=name)
               for name, loss in (("better", 0.25), ("worse", 0.5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert failures == []
    assert sorted(reads) == [("better", None), ("worse", None)], "both decided before either wrote"

    better, worse = results["better"]["version"], results["worse"]["version"]
    champion = as_gina.get_model_version_by_alias(MODEL, registry.CHAMPION)
    assert champion.version == better and champion.tags["eval_loss"] == "0.25"
    versions = {v.version: v.tags["champion_decision"] for v in as_gina.search_model_versions(f"name='{MODEL}'")}
    assert versions[better] == "first version with an eval loss: alias set"
    assert versions[worse].startswith(f"kept on v{better}: v{worse} vs v{better}: accuracy 0.6 vs 0.8333 ")
    assert versions[worse].endswith(f": v{better} is better (on these held-out examples; training noise unmeasured)")
    assert (results["better"]["champion"], results["worse"]["champion"]) == ("True", "False")


def test_a_member_without_permission_on_the_model_is_refused_before_training(team_server, as_member, as_gina):
    """gina registered the name first: bob reads it (the default READ) but may not add versions."""
    as_gina.create_registered_model(GUARDED)
    bob = team_server.add_user("bob-registry")
    tiny = {"model": "tiny", "dataset": "sample", "max_steps": 1, "register_as": GUARDED}
    refused = as_member("classify", tiny, bob, "bobs-classifiers")
    refused_with_one_line(refused, f"register_as: user 'bob-registry' may not register versions of model "
                                   f"{GUARDED!r} on {team_server.url}: ask its owner or the server's administrator "
                                   "for EDIT permission on it, or choose another name")
    as_bob = team_server.client("bob-registry")
    [run] = as_bob.search_runs([as_bob.get_experiment_by_name("bobs-classifiers").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("InputError: register_as: user")
    assert "model_path" not in run.data.params, "no model was loaded"
    assert as_gina.search_model_versions(f"name='{GUARDED}'") == []
    # gina may, and so may anyone for a name nobody registered yet
    with team_server.as_user("gina", team_server.passwords["gina"]):
        registry.check_may_register(GUARDED)
    with team_server.as_user("bob-registry", team_server.passwords["bob-registry"]):
        registry.check_may_register("nobodys-model")
