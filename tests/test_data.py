import json

import pandas as pd
import pytest

from finetune_lab import data
from finetune_lab.data import SAMPLES, TEST, TRAIN


def test_embedded_sentiment_set_is_balanced_unique_and_leak_free():
    frame = pd.read_csv(SAMPLES["sample"])
    assert list(frame.columns) == ["text", "label", "split"] and len(frame) >= 600
    normalised = frame["text"].str.lower().str.strip()
    assert not normalised.duplicated().any()
    assert set(frame["split"]) == {TRAIN, TEST} and (frame["split"] == TEST).sum() >= 150
    for _, part in frame.groupby("split"):
        counts = part["label"].value_counts()
        assert set(counts.index) == {0, 1} and counts[0] == counts[1]
    train = set(normalised[frame["split"] == TRAIN])
    assert not train & set(normalised[frame["split"] == TEST])


def test_embedded_chat_set_excludes_the_probe_pair():
    rows = [json.loads(line) for line in SAMPLES["sample_chat"].read_text().splitlines()]
    assert len(rows) >= 300 and all(set(r) == {"input", "output"} for r in rows)
    inputs = [" ".join(r["input"].lower().split()) for r in rows]
    assert len(set(inputs)) == len(inputs)
    assert "hi, how are you doing?" not in inputs
    assert not any("thank you for asking" in r["output"].lower() for r in rows)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_local_files_without_split_column_split_deterministically(tmp_path, suffix):
    frame = pd.DataFrame({"text": [f"review number {i}" for i in range(50)], "label": [i % 2 for i in range(50)]})
    path = tmp_path / f"reviews{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".json": lambda: frame.to_json(path, orient="records"),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    first, problems = data.load(str(path), seed=7, test_fraction=0.2)
    again, _ = data.load(str(path), seed=7, test_fraction=0.2)
    other, _ = data.load(str(path), seed=8, test_fraction=0.2)
    assert problems == []
    assert len(first.splits[TEST]) == 10 and len(first.splits[TRAIN]) == 40
    assert first.splits[TEST]["text"] == again.splits[TEST]["text"] != other.splits[TEST]["text"]
    assert not set(first.splits[TEST]["text"]) & set(first.splits[TRAIN]["text"])
    assert first.digest == again.digest


def test_problems_are_lines_naming_the_parameter(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["good", "", "bad", "fine"], "label": ["pos", 1, 0, 1]}).to_csv(path, index=False)
    loaded, problems = data.load(str(path), seed=0, test_fraction=0.5)
    assert problems == []
    assert data.check_columns(loaded, {"text_column": "body"})[0].startswith("text_column: column 'body' not in")
    assert any(p.startswith("text_column:") for p in data.check_text(loaded, "text_column", "text"))
    _, label_problems = data.check_labels(loaded, "label_column", "label")
    assert label_problems and label_problems[0].startswith("label_column: labels must be integers")


def test_missing_malformed_and_empty_inputs(tmp_path):
    assert data.load(str(tmp_path / "nope.csv"), 0, 0.2)[1][0].startswith("dataset: file")
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    assert "cannot read" in data.load(str(broken), 0, 0.2)[1][0]
    only_train = tmp_path / "only_train.csv"
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1], "split": ["train", "train"]}).to_csv(only_train, index=False)
    assert data.load(str(only_train), 0, 0.2)[1] == ["dataset: the test split is empty"]


def test_labels_must_be_contiguous_and_seen_in_training(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"text": list("abcdef"), "label": [0, 2, 0, 2, 3, 3],
                  "split": ["train"] * 4 + ["test"] * 2}).to_csv(path, index=False)
    loaded, _ = data.load(str(path), 0, 0.2)
    _, problems = data.check_labels(loaded, "label_column", "label")
    assert any("0..K-1" in p for p in problems) and any("never occur" in p for p in problems)


def test_unreachable_hub_dataset_is_a_problem_not_a_crash():
    _, problems = data.load("someone/not-a-dataset", 0, 0.2)
    assert problems and problems[0].startswith("dataset: cannot load") and "sample" in problems[0]


def test_limited_splits_carry_digests_of_the_rows_kept():
    import mlflow.data

    full, _ = data.load("sample", seed=0, test_fraction=0.2)
    small = data.limit(full, {TEST: 20}, seed=0)
    larger = data.limit(full, {TEST: 100}, seed=0)
    assert len(small.splits[TEST]) == 20 and len(larger.splits[TEST]) == 100
    assert len({full.eval_digest, small.eval_digest, larger.eval_digest}) == 3
    assert small.digest == larger.digest == full.digest, "the train split was not limited"
    # Independently: the digest is MLflow's digest of exactly the rows kept.
    assert small.eval_digest == mlflow.data.from_pandas(small.splits[TEST].to_pandas()).digest
    assert data.limit(full, {TEST: 0, TRAIN: 10_000}, seed=0) is full, "nothing cut, nothing changed"


def test_rows_added_to_the_training_split_change_its_digest_and_nothing_else():
    chat, _ = data.load("sample_chat", seed=0, test_fraction=0.1)
    more = data.with_train_rows(chat, {"input": ["hi"] * 2, "output": ["hello"] * 2})
    assert len(more.splits[TRAIN]) == len(chat.splits[TRAIN]) + 2 and more.splits[TRAIN][-1] == {
        "input": "hi", "output": "hello"}
    assert more.digest != chat.digest and more.eval_digest == chat.eval_digest


def test_jsonl_problems_name_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n[1, 2]\n')
    assert data.load(str(path), 0, 0.2)[1] == [
        f"dataset: cannot read {str(path)!r}: line 3: expected a JSON object, got list"]


def test_texts_longer_than_max_length_can_use_are_cut_when_read(tmp_path, caplog):
    """A 50 MB row once took 5.9 GB and 7 minutes to tokenize: no tokenizer needs more than CHARS_PER_TOKEN
    characters per token, so a text is cut to max_length x that, with a warning and a tag-ready note."""
    path = tmp_path / "huge.csv"
    huge = "word " * 100_000
    pd.DataFrame({"text": [huge, "short one", "short two", "short three"], "label": [0, 1, 0, 1],
                  "split": ["train", "train", "test", "test"]}).to_csv(path, index=False)
    limit = data.text_limit(max_length=64)
    assert limit == 64 * data.CHARS_PER_TOKEN
    loaded, problems = data.load(str(path), 0, 0.2, max_text_chars=limit)
    assert problems == []
    assert loaded.splits[TRAIN]["text"] == [huge[:limit], "short one"], "only the long text is cut, to the limit"
    assert loaded.splits[TEST]["text"] == ["short two", "short three"]
    assert loaded.truncated == (f"1 text(s) of column 'text' cut to {limit} characters, "
                                "all that max_length tokens can use")
    assert loaded.truncated in caplog.text
    # The digest describes the rows as used, cut.
    import mlflow.data

    assert loaded.digest == mlflow.data.from_pandas(loaded.splits[TRAIN].to_pandas()).digest
    assert data.load(str(path), 0, 0.2)[0].splits[TRAIN]["text"][0] == huge, "no limit, nothing cut"


def test_class_names_come_from_the_data_or_are_the_numbers():
    sample, _ = data.load("sample", seed=0, test_fraction=0.2)
    assert data.label_names(sample, "label", [0, 1]) == ["negative", "positive"]
    chat, _ = data.load("sample_chat", seed=0, test_fraction=0.2)
    assert data.label_names(chat, "input", [0, 1]) == ["0", "1"]


def test_a_run_logging_the_splits_another_run_just_logged_in_the_same_experiment_records_them(client, monkeypatch):
    """Runs starting together in one experiment insert the same dataset rows; on PostgreSQL all but the first insert
    fail on the row's key (BAD_REQUEST). The loser logs its inputs again and gets the rows the winner wrote."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    chat, _ = data.load("sample_chat", seed=0, test_fraction=0.1)
    experiment_id = client.create_experiment("together")
    winner = client.create_run(experiment_id).info.run_id
    log_input, attempts = mlflow.log_input, []

    def the_other_run_inserts_first(dataset, context):
        attempts.append(context)
        if len(attempts) == 1:
            client.log_inputs(winner, [DatasetInput(dataset._to_mlflow_entity(),
                                                    [InputTag("mlflow.data.context", context)])])
            raise MlflowException('duplicate key value violates unique constraint "dataset_pk"', error_code=BAD_REQUEST)
        log_input(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", the_other_run_inserts_first)
    with mlflow.start_run(experiment_id=experiment_id) as loser:
        data.log_inputs(chat)
    assert attempts == ["training", "training", "evaluation"]
    for run_id in (winner, loser.info.run_id):
        logged = client.get_run(run_id).inputs.dataset_inputs
        assert chat.digest in {i.dataset.digest for i in logged}
    logged = {i.tags[0].value: i.dataset.digest for i in client.get_run(loser.info.run_id).inputs.dataset_inputs}
    assert logged == {"training": chat.digest, "evaluation": chat.eval_digest}
