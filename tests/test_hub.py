"""A model or dataset id that is neither local nor an alias is checked on the Hub with one short request: a typo or
a silent network is one clear line at once, not minutes of retries."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest
from huggingface_hub import constants
from transformers import AutoConfig

from finetune_lab import data, hub, models


class NotFound(BaseHTTPRequestHandler):
    """Answers every request as the Hub answers for a repository that does not exist; counts the requests."""

    requests: list[str] = []

    def do_GET(self):
        NotFound.requests.append(self.path)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def online(monkeypatch):
    """The Hub reachable at a local endpoint (the tests' default is offline); loaders must not be reached."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def refuse(*args, **kwargs):
        raise AssertionError("the loader ran although the Hub check had failed")

    monkeypatch.setattr(AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    return lambda endpoint: monkeypatch.setattr(constants, "ENDPOINT", endpoint)


def test_an_unknown_id_is_one_request_and_one_line(online):
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    online(f"http://127.0.0.1:{server.server_port}")
    NotFound.requests.clear()
    try:
        _, model_problems = models.resolve("someone/typo-model", models.CLASSIFIER)
        _, data_problems = data.load("someone/typo-data", seed=0, test_fraction=0.2)
    finally:
        server.shutdown()
    repo_requests = [r for r in NotFound.requests if r.startswith(("/api/models/", "/api/datasets/"))]
    assert repo_requests == ["/api/models/someone/typo-model", "/api/datasets/someone/typo-data"], "no retries"
    assert model_problems == [
        "model: cannot load 'someone/typo-model': not a local folder, and not found on the Hugging Face Hub (or "
        "private: log in with `hf auth login`). Offline, use an alias (tiny, minilm-l6, smollm2-135m-instruct, "
        "random:distilbert-base, random:smollm2-135m; fetch ahead with `python -m finetune_lab.models fetch`) or a "
        "local folder"]
    assert data_problems == [
        "dataset: cannot load 'someone/typo-data': not a local file, and not found on the Hugging Face Hub (or "
        "private: log in with `hf auth login`); offline, pass a .csv/.jsonl/.json/.parquet path or `sample` / "
        "`sample_chat`"]


def test_a_silent_hub_is_given_up_after_the_timeout(online, monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    online(f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(hub, "TIMEOUT_S", 0.5)
    try:
        _, problems = data.load("someone/any-data", seed=0, test_fraction=0.2)
    finally:
        listener.close()
    assert problems == [
        "dataset: cannot load 'someone/any-data': not a local file, and the Hugging Face Hub did not answer within "
        "0.5 s (ReadTimeout); offline, pass a .csv/.jsonl/.json/.parquet path or `sample` / `sample_chat`"]


def test_offline_mode_asks_nothing_and_the_loader_fails_fast(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # would refuse, if it were asked
    assert hub.unavailable("someone/any-model", "model") is None
    _, problems = models.resolve("someone/any-model", models.CLASSIFIER)
    assert problems[0].startswith("model: cannot load 'someone/any-model': not a local folder, and not reachable on "
                                  "the Hugging Face Hub (")
