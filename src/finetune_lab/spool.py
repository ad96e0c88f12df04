"""A child's finished training kept on local disk while the tracking server is unreachable, and handed to `resume`
once it is back, which records it as a child run instead of training it again.

One folder per child: `<cache>/pending/<parent run id>/<child run name>/` holding `adapter/` (PEFT adapter files
and the tokenizer, as the run's artifact would) and `record.json` (its params, tags, metrics and logged steps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune_lab import models
from finetune_lab.contract import ADAPTER_ARTIFACT

RECORD = "record.json"


def root() -> Path:
    return models.cache_home() / "pending"


def keep(parent_run_id: str, name: str, model, tokenizer, record: dict) -> Path:
    """Save the adapter of `model` and `record` for child `name` of the parent; return the folder."""
    folder = root() / parent_run_id / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder / ADAPTER_ARTIFACT)
    tokenizer.save_pretrained(folder / ADAPTER_ARTIFACT)
    (folder / RECORD).write_text(json.dumps(record, default=float), encoding="utf-8")
    return folder


def kept(parent_run_id: str) -> dict[str, Path]:
    """Child run name → its folder, for every child of the parent kept on this machine."""
    parent = root() / parent_run_id
    if not parent.is_dir():
        return {}
    return {folder.name: folder for folder in sorted(parent.iterdir()) if (folder / RECORD).is_file()}


def load(folder: Path) -> dict:
    return json.loads((folder / RECORD).read_text(encoding="utf-8"))


def discard(folder: Path) -> None:
    """Remove a child's folder once it is recorded (and the parent's, when it is left empty)."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.is_dir() and not any(folder.parent.iterdir()):
        folder.parent.rmdir()
