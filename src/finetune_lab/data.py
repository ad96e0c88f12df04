"""Dataset specs → train/test `datasets.DatasetDict`, with the checks every entry point needs.

A spec is a Hub id, a local .csv/.jsonl/.json/.parquet file, or an alias of the embedded data in
`data/sample/`. Local files with a `split` column keep it; others are split deterministically by seed.
All problems are returned as lines (see `config.problem`), never raised one at a time.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import mlflow.data
import pandas as pd
from mlflow.data.dataset import Dataset as MlflowDataset

from finetune_lab import hub, tracking
from finetune_lab.errors import problem

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
SAMPLES = {"sample": SAMPLE_DIR / "sentiment.csv", "sample_chat": SAMPLE_DIR / "chat.jsonl"}
# Class names of the embedded sets' label columns (see data/sample/README.md).
SAMPLE_LABEL_NAMES = {("sample", "label"): ["negative", "positive"]}
LOCAL_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
SPLIT_COLUMN = "split"
TRAIN, TEST = "train", "test"
# Names a `split` column or a Hub dataset may use for the held-out part.
TEST_SPLIT_NAMES = ("test", "validation", "eval")
# No token of a real tokenizer spans more characters than this: `max_length` tokens never need more than
# max_length x CHARS_PER_TOKEN characters of a text, so longer texts are cut when read (see `text_limit`).
CHARS_PER_TOKEN = 64
TRUNCATED_TAG = "dataset_truncated_texts"

logger = logging.getLogger(__name__)


def text_limit(max_length: int) -> int | None:
    """The most characters of a text that `max_length` tokens can use (None for a max_length that is invalid,
    and reported as such)."""
    return max_length * CHARS_PER_TOKEN if max_length > 0 else None


@dataclass(frozen=True)
class LoadedData:
    """Train/test splits plus what MLflow records about them. The digests are computed from `splits` when the
    object is made (`describe`), so they always describe the data a run uses: whoever changes the splits
    (`limit`, `with_train_rows`) gets a new object with new digests."""

    splits: datasets.DatasetDict
    name: str
    source: str
    from_hub: bool
    targets: str | None
    tracked: dict[str, MlflowDataset]
    truncated: str = ""
    """What was cut when reading (texts longer than `text_limit`), for the record; "" if nothing."""

    @property
    def digest(self) -> str:
        """Digest of the training split."""
        return self.tracked[TRAIN].digest

    @property
    def eval_digest(self) -> str:
        """Digest of the held-out split: losses are comparable only between runs that share it."""
        return self.tracked[TEST].digest


def describe(splits: datasets.DatasetDict, name: str, source: str, from_hub: bool,
             targets: str | None = None, truncated: str = "") -> LoadedData:
    """`splits` with an MLflow dataset (name, source, digest, schema) per split, computed from these very rows."""
    tracked = {}
    with warnings.catch_warnings():
        # MLflow registers two equivalent local-file sources and warns that it picked one of them.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        for key, split in splits.items():
            split_targets = targets if targets in split.column_names else None
            if from_hub:
                tracked[key] = mlflow.data.from_huggingface(split, path=source, name=f"{name}:{key}",
                                                            targets=split_targets)
            else:
                tracked[key] = mlflow.data.from_pandas(split.to_pandas(), source=source, name=f"{name}:{key}",
                                                       targets=split_targets)
    return LoadedData(splits, name, source, from_hub, targets, tracked, truncated)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped); a bad line is reported by its number, not by pandas'
    character position in the whole file."""
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return pd.DataFrame(rows)


def _read_local(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            return pd.read_json(path)
        except ValueError:
            return _read_jsonl(path)
    return pd.read_parquet(path)


def _cut(texts: list, limit: int) -> tuple[list, int]:
    """`texts` with every string longer than `limit` cut to it, and how many were cut."""
    long = [isinstance(t, str) and len(t) > limit for t in texts]
    return [t[:limit] if too_long else t for t, too_long in zip(texts, long)], sum(long)


def _truncate(splits: datasets.DatasetDict, limit: int | None) -> tuple[datasets.DatasetDict, str]:
    """Every string column cut to `limit` characters (None = no limit); what was cut, as one line."""
    if not limit:
        return splits, ""
    counts: dict[str, int] = {}
    for key, split in splits.items():
        for column, feature in split.features.items():
            if getattr(feature, "dtype", None) not in ("string", "large_string"):
                continue
            values, count = _cut(split[column], limit)
            if count:
                splits[key] = split = split.remove_columns(column).add_column(column, values, feature=feature)
                counts[column] = counts.get(column, 0) + count
    if not counts:
        return splits, ""
    note = (", ".join(f"{n} text(s) of column {c!r}" for c, n in counts.items())
            + f" cut to {limit} characters, all that max_length tokens can use")
    logger.warning("dataset: %s", note)
    return splits, note


def _split_frame(frame: pd.DataFrame, seed: int, test_fraction: float) -> dict[str, pd.DataFrame]:
    if SPLIT_COLUMN in frame.columns:
        names = frame[SPLIT_COLUMN].astype(str).str.strip().str.lower()
        return {
            TRAIN: frame[names == TRAIN].drop(columns=SPLIT_COLUMN),
            TEST: frame[names.isin(TEST_SPLIT_NAMES)].drop(columns=SPLIT_COLUMN),
        }
    shuffled = frame.sample(frac=1.0, random_state=seed)
    n_test = int(round(len(shuffled) * test_fraction))
    return {TRAIN: shuffled.iloc[n_test:], TEST: shuffled.iloc[:n_test]}


def _load_local(spec: str, path: Path, seed: int, test_fraction: float, targets: str | None, limit: int | None):
    try:
        frame = _read_local(path)
    except Exception as error:  # noqa: BLE001 - pandas raises many types for malformed files
        return None, [problem("dataset", f"cannot read {str(path)!r}: {' '.join(str(error).split())[:300]}")]
    frames = {k: v.reset_index(drop=True) for k, v in _split_frame(frame, seed, test_fraction).items()}
    empty = _empty_splits(frames)
    if empty:
        return None, empty
    splits = datasets.DatasetDict({k: datasets.Dataset.from_pandas(v, preserve_index=False) for k, v in frames.items()})
    splits, truncated = _truncate(splits, limit)
    return describe(splits, spec if spec in SAMPLES else path.name, str(path), from_hub=False, targets=targets,
                    truncated=truncated), []


def _load_hub(spec: str, seed: int, test_fraction: float, targets: str | None, limit: int | None):
    reason = hub.unavailable(spec, "dataset")
    if reason is None:
        try:
            loaded = datasets.load_dataset(spec)
        except Exception as error:  # noqa: BLE001 - offline, missing or gated datasets all end here
            reason = f"cannot be loaded from the Hugging Face Hub ({type(error).__name__})"
    if reason is not None:
        return None, [problem("dataset", f"cannot load {spec!r}: not a local file, and {reason}; offline, pass a "
                                         f".csv/.jsonl/.json/.parquet path or `sample` / `sample_chat`")]
    test_name = next((n for n in TEST_SPLIT_NAMES if n in loaded), None)
    if TRAIN in loaded and test_name:
        splits = datasets.DatasetDict({TRAIN: loaded[TRAIN], TEST: loaded[test_name]})
    else:
        parts = loaded[TRAIN if TRAIN in loaded else next(iter(loaded))].train_test_split(
            test_size=test_fraction, seed=seed
        )
        splits = datasets.DatasetDict({TRAIN: parts["train"], TEST: parts["test"]})
    empty = _empty_splits(splits)
    if empty:
        return None, empty
    splits, truncated = _truncate(splits, limit)
    return describe(splits, spec, spec, from_hub=True, targets=targets, truncated=truncated), []


def load(spec: str, seed: int, test_fraction: float, targets: str | None = None,
         max_text_chars: int | None = None) -> tuple[LoadedData | None, list[str]]:
    """Load `spec` into train/test splits, texts cut to `max_text_chars` (see `text_limit`; None = whole); returns
    (data, problems) and never raises on bad input."""
    path = SAMPLES.get(spec, Path(spec).expanduser())
    is_local = spec in SAMPLES or path.suffix.lower() in LOCAL_SUFFIXES or path.exists()
    if is_local:
        if path.is_dir():
            inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in LOCAL_SUFFIXES)[:5]
            return None, [problem("dataset", f"{str(path)!r} is a folder; pass one data file "
                                             f"({', '.join(LOCAL_SUFFIXES)})"
                                             + (f", e.g. one of {', '.join(inside)}" if inside else ""))]
        if not path.is_file():
            return None, [problem("dataset", f"file {str(path)!r} not found")]
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            return None, [problem("dataset", f"unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}")]
        return _load_local(spec, path, seed, test_fraction, targets, max_text_chars)
    return _load_hub(spec, seed, test_fraction, targets, max_text_chars)


def _empty_splits(splits: dict) -> list[str]:
    return [problem("dataset", f"the {k} split is empty") for k, v in splits.items() if len(v) == 0]


def check_columns(data: LoadedData, wanted: dict[str, str]) -> list[str]:
    """`wanted` maps parameter name → column name; one problem per missing column."""
    available = data.splits[TRAIN].column_names
    return [
        problem(param, f"column {column!r} not in the dataset; available: {', '.join(available)}")
        for param, column in wanted.items()
        if any(column not in split.column_names for split in data.splits.values())
    ]


def check_text(data: LoadedData, param: str, column: str) -> list[str]:
    """Every value of `column` must be a non-empty string."""
    problems = []
    for name, split in data.splits.items():
        bad = sum(1 for value in split[column] if not isinstance(value, str) or not value.strip())
        if bad:
            problems.append(problem(param, f"{bad} row(s) of the {name} split have an empty or non-text {column!r}"))
    return problems


def check_labels(data: LoadedData, param: str, column: str) -> tuple[list[int], list[str]]:
    """Labels must be integers 0..K-1 and every test label must occur in training."""
    missing = {k: sum(1 for x in v[column] if _is_missing(x)) for k, v in data.splits.items()}
    if any(missing.values()):
        where = ", ".join(f"{n} in the {k} split" for k, n in missing.items() if n)
        return [], [problem(param, f"rows without a label ({where}): every row needs an integer 0..K-1 in "
                                   f"column {column!r}")]
    found: dict[str, set[Any]] = {k: set(v[column]) for k, v in data.splits.items()}
    non_integers = sorted(
        {repr(x) for values in found.values() for x in values if isinstance(x, bool) or not _is_integer(x)}
    )
    if non_integers:
        return [], [problem(param, f"labels must be integers 0..K-1, found {', '.join(non_integers[:5])}")]
    classes = sorted(int(x) for x in found[TRAIN])
    problems = []
    if len(classes) < 2:
        problems.append(problem(param, f"need at least 2 classes in the train split, found {classes}"))
    elif classes != list(range(len(classes))):
        problems.append(problem(param, f"labels must be 0..K-1, found {classes}"))
    unseen = sorted(int(x) for x in found[TEST] - found[TRAIN])
    if unseen:
        problems.append(problem(param, f"test labels {unseen} never occur in the train split"))
    return classes, problems


def label_names(data: LoadedData, column: str, classes: list[int]) -> list[str]:
    """Names of the classes 0..K-1: the column's own (a Hub `ClassLabel`), the embedded set's, else the numbers."""
    feature = data.splits[TRAIN].features.get(column)
    names = getattr(feature, "names", None) or SAMPLE_LABEL_NAMES.get((data.name, column))
    return list(names) if names and len(names) == len(classes) else [str(c) for c in classes]


def _is_missing(value: Any) -> bool:
    """None, or the NaN pandas puts where a value is null or absent."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_integer(value: Any) -> bool:
    try:
        return float(value).is_integer()
    except (TypeError, ValueError):
        return False


def _first(split: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    """The first `n` examples after a seeded shuffle (0 = all, unshuffled)."""
    if n <= 0 or n >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(n))


def limit(data: LoadedData, sizes: dict[str, int], seed: int) -> LoadedData:
    """The data with each split of `sizes` cut to its first N examples after a seeded shuffle (0 = all), and
    digests of what is left."""
    splits = datasets.DatasetDict({k: _first(v, sizes.get(k, 0), seed) for k, v in data.splits.items()})
    if all(len(splits[k]) == len(data.splits[k]) for k in splits):
        return data
    return describe(splits, data.name, data.source, data.from_hub, data.targets, data.truncated)


def with_train_rows(data: LoadedData, rows: dict[str, list]) -> LoadedData:
    """The data with `rows` (column → values) appended to the training split, and digests of the result; only
    the columns of `rows` are kept."""
    columns = list(rows)
    train = data.splits[TRAIN].select_columns(columns)
    extra = datasets.Dataset.from_dict(rows, features=train.features)
    splits = datasets.DatasetDict({**data.splits, TRAIN: datasets.concatenate_datasets([train, extra])})
    return describe(splits, data.name, data.source, data.from_hub, data.targets, data.truncated)


def log_inputs(data: LoadedData) -> None:
    """Record the splits (name, source, digest, schema) on the active run."""
    tracking.write_shared(lambda: mlflow.log_input(data.tracked[TRAIN], context="training"))
    tracking.write_shared(lambda: mlflow.log_input(data.tracked[TEST], context="evaluation"))
    if data.truncated:
        mlflow.set_tag(TRUNCATED_TAG, data.truncated)
