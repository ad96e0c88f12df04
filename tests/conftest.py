"""Fixtures and hooks; the helpers are in tests/support/ (its __init__ lists them by concern)."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
from pathlib import Path

import pytest
from support import mlflow_state, signals, tiers
from support.launch import invoke_as, run_entry

_collecting = contextlib.ExitStack()


def pytest_addoption(parser):
    parser.addoption("--regenerate-expected-losses", action="store_true",
                     help="rewrite tests/expected_losses.json from this run (see tests/test_expected_losses.py)")


def pytest_configure(config):
    # Tests never reach the Hub: a missing model or dataset must fail fast, not after minutes of retries.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The test modules import the training stack: collected with the collector paused, which then skips what they
    # made (finetune_lab/heap.py says what that saves).
    from finetune_lab import heap

    _collecting.enter_context(heap.long_lived())


def pytest_collection_finish(session):
    _collecting.close()


def pytest_sessionfinish(session):
    _collecting.close()  # not collected in this process (xdist's controller)
    # pytest's last full collection would walk every object the session made: minutes on these machines.
    gc.freeze()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the markers
def pytest_collection_modifyitems(config, items):
    """The slow tier and the workers' groups: support/tiers.py."""
    for item in items:
        tiers.mark_location(item)
        if getattr(config.option, "loadgroup", False):
            tiers.tell_xdist_the_group(item)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Tiny models are rebuilt per session; offline models reuse the user's cache unless overridden."""
    cache = tmp_path_factory.mktemp("finetune_lab_cache")
    os.environ["FINETUNE_LAB_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A sqlite store with MLflow's schema, made once: creating the tables and running the migrations takes
    seconds, copying the file takes milliseconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, empty_store) -> str:
    """A store of the test's own, this process pointed at it; the working directory is tmp_path, so that a new
    experiment's artifacts (./mlruns) stay out of the user's."""
    import mlflow

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_state.forget(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def client(tracking_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


@pytest.fixture
def mlflow_run(request, client, tmp_path):
    """Run `mlflow run <repo> -e ENTRY --env-manager local -P k=v ...`; return the CompletedProcess."""
    tiers.require_slow(request, "`mlflow run`")
    return lambda entry, params, experiment="e2e": run_entry(client, tmp_path, entry, params, experiment)


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if any model's weights are loaded (every loader ends in PreTrainedModel.from_pretrained,
    whichever module imports it under whichever name)."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} weights were loaded before the input was validated")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.fixture
def local_ray(request, monkeypatch):
    """A local Ray instance's settings for the code under test (support/ray_processes.py); yields its temp folder,
    and kills whatever of that instance is still alive at the end (the tests assert there is none)."""
    from support.ray_processes import isolate_ray, kill_ray_processes

    tiers.require_slow(request, "Ray")
    folder = isolate_ray(monkeypatch)
    yield folder
    kill_ray_processes(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sigterm_at_second_child(monkeypatch) -> signals.Trigger:
    """SIGTERM to this very process at the second logged step of the second child of a sweep (while armed)."""
    return signals.sigterm_at_second_child(monkeypatch)


@pytest.fixture
def as_member(monkeypatch, tmp_path):
    """Run an entry point's click command in this process with a member's environment (what they export)."""
    monkeypatch.chdir(tmp_path)
    mlflow_state.forget(monkeypatch)  # this process's earlier stores mean nothing here
    return lambda entry, params, env, experiment="team": invoke_as(monkeypatch, entry, params, env, experiment)


@pytest.fixture(scope="session")
def team_server():
    """One team's tracking server (`finetune_lab.team.server`: PostgreSQL, proxied artifacts, accounts) for the
    session's tests, each with accounts and experiments of its own (support/team_server.py); all in tests/e2e/."""
    from support.team_server import running

    with running() as server:
        yield server
