"""What an entry point prints: one line per phase and the progress bars; no per-step dicts, no library warnings
or notices; a new classification head explained in one line instead of transformers' table of missing weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.paths import REPO
from transformers import AutoModel, AutoTokenizer

from finetune_lab import models

CHATTER = ["{'loss'", "'train_runtime'", "Warning", "warnings.warn", "system_metrics", "CloudPickle", "LOAD REPORT",
           "MISSING", "Downloading artifacts"]


def run_entry(name: str, args: list[str], tracking_uri: str, cwd) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    finished = subprocess.run([sys.executable, str(REPO / "entrypoints" / f"{name}.py"), *args], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout + finished.stderr


@pytest.mark.slow  # the entry point in a process of its own, as `mlflow run` starts it
def test_a_sweep_prints_one_line_per_child_and_its_progress_bar(tracking_uri, tmp_path):
    output = run_entry("lora_sweep", ["--model", "tiny", "--dataset", "sample_chat", "--ranks", "2,4", "--seeds", "1",
                                      "--max-steps", "3", "--max-length", "32", "--register-as", "quiet"],
                       tracking_uri, tmp_path)
    lines = output.splitlines()
    assert "[1/2] r2-seed1: training 3 steps" in lines and "[2/2] r4-seed1: training 3 steps" in lines
    assert output.count("3/3 [") >= 2, "the progress bars stay"
    assert not [noise for noise in CHATTER if noise in output], output[-3000:]


def test_a_new_classification_head_is_one_line_that_says_it_is_expected(tracking_uri, tmp_path):
    tiny = models.tiny(models.CLASSIFIER, ["a fine day", "a dull day", "what a film"] * 5, seed=0)
    encoder = tmp_path / "encoder"  # a pretrained encoder without a classification head, like minilm-l6
    AutoModel.from_pretrained(tiny.path).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(tiny.path).save_pretrained(encoder)
    output = run_entry("classify", ["--model", str(encoder), "--dataset", "sample", "--max-train-samples", "32",
                                    "--max-eval-samples", "16", "--max-length", "32", "--seed", "3"],
                       tracking_uri, tmp_path)
    lines = output.splitlines()
    assert ("new classification head for 2 classes, initialised from seed 3 (classifier.bias, classifier.weight, "
            "pre_classifier.bias, pre_classifier.weight): expected, the pretrained model has none") in lines
    assert "[1/2] classify: training 2 steps" in lines
    assert "[2/2] classify: predicting the 16 held-out examples" in lines
    assert not [noise for noise in CHATTER if noise in output], output[-3000:]
