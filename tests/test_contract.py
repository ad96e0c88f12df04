"""The names in `contract` are the ones MLflow and every module use."""

import ast

from mlflow.entities import RunStatus
from support.paths import REPO

from finetune_lab import contract

STATUSES = {contract.RUNNING, contract.FINISHED, contract.FAILED, contract.KILLED, contract.NOT_RUN}


def test_run_statuses_are_mlflows_names():
    assert [contract.RUNNING, contract.FINISHED, contract.FAILED, contract.KILLED] == [
        RunStatus.to_string(status) for status in (RunStatus.RUNNING, RunStatus.FINISHED, RunStatus.FAILED,
                                                   RunStatus.KILLED)]


def test_no_module_spells_a_run_status_itself():
    spelled = [f"{path.relative_to(REPO)}:{node.lineno} {node.value}"
               for path in sorted((REPO / "src").rglob("*.py")) if path.name != "contract.py"
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.Constant) and node.value in STATUSES]
    assert spelled == []
