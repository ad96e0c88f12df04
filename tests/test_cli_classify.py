"""Bad input to `classify` through its CLI: one line per problem, exit 2, no model loaded."""

import pandas as pd
import pytest
from click.testing import CliRunner
from support.paths import entrypoint
from support.store import runs_of


@pytest.fixture
def invoke(client, no_weights_loaded):
    command = entrypoint("classify").main

    def run(*args):
        return CliRunner().invoke(command, ["--experiment", "cli", *args])

    return run


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--learning-rate", "0"], "error: learning_rate: must be > 0"),
        (["--epochs", "-1"], "error: epochs: must be > 0"),
        (["--batch-size", "0"], "error: batch_size: must be >= 1"),
        (["--max-length", "4"], "error: max_length: must be >= 8"),
        (["--text-column", "review"], "error: text_column: column 'review' not in the dataset; available: text, label"),
        (["--label-column", "text"], "error: label_column: labels must be integers"),
        (["--dataset", "missing.csv"], "error: dataset: file 'missing.csv' not found"),
        (["--model", "nobody/nothing"], "error: model: cannot load 'nobody/nothing'"),
        (["--max-length", "1024"], "error: max_length: 1024 exceeds the 512 positions of the model "
                                   "(max_position_embeddings); use at most 512"),
        (["--dataset", "."], "error: dataset: '.' is a folder; pass one data file"),
        (["--label-names", "bad,good,ugly"], "error: label_names: names 3 classes, the data has 2 (0, 1)"),
        (["--label-names", "bad,bad"], "error: label_names: must be distinct non-empty names like negative,positive"),
        (["--register-as", "team/clf"], "error: register_as: Invalid model name 'team/clf'. Names cannot contain '/'"),
        (["--precision", "half"], "error: precision: must be one of auto, fp32, bf16, fp16, got 'half'"),
        # the Trainer would train in fp32 without a word (tests/test_training.py)
        (["--precision", "fp16"], "error: precision: fp16 trains only on a CUDA GPU, and this process sees none"),
    ],
)
def test_each_bad_input_is_one_clear_line(invoke, args, expected):
    outcome = invoke("--model", "tiny", "--dataset", "sample", *args)
    assert outcome.exit_code == 2
    assert expected in outcome.output
    assert "Traceback" not in outcome.output


def test_all_problems_are_reported_together_and_the_run_fails(invoke, client):
    outcome = invoke("--model", "nobody/nothing", "--dataset", "sample", "--learning-rate", "-1", "--batch-size", "x",
                     "--text-column", "body")
    lines = [line for line in outcome.output.splitlines() if line.startswith("error: ")]
    assert sorted(line.split(":")[1].strip() for line in lines) == ["batch_size", "learning_rate", "model",
                                                                     "text_column"]
    (run,) = runs_of(client, "cli")
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("InputError: ")
    assert all(name in run.data.tags["error"] for name in ["batch_size", "learning_rate", "model", "text_column"])


def test_malformed_file_and_empty_split(invoke, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok", "label": 1}\n\n{not json\n')
    assert (f"error: dataset: cannot read {str(broken)!r}: line 3: invalid JSON (Expecting property name enclosed in "
            "double quotes at column 2)") in invoke("--model", "tiny", "--dataset", str(broken)).output
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(f'{{"text": "review {i}", "label": {"null" if i == 3 else i % 2}}}\n'
                                  for i in range(10)) + '{"text": "no label at all"}\n')
    output = invoke("--model", "tiny", "--dataset", str(unlabelled)).output
    assert "error: label_column: rows without a label (" in output and "None" not in output
    one_split = tmp_path / "train_only.csv"
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1], "split": ["train", "train"]}).to_csv(one_split, index=False)
    assert "error: dataset: the test split is empty" in invoke("--model", "tiny", "--dataset", str(one_split)).output
