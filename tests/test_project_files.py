"""The files `make generate` writes from the table of entry points are what it would write, MLflow reads the
MLproject as the scripts parse it, and pyproject.toml, python_env.yaml and conda.yaml agree with each other."""

import re
import shlex
from dataclasses import fields

import pytest
import tomllib
import yaml
from mlflow.projects import _project_spec
from support.paths import REPO

from finetune_lab import project_files
from finetune_lab.cli import entry_point
from finetune_lab.entry_points import ENTRY_POINTS
from finetune_lab.schema import from_strings

ROWS = {row.name: row for row in ENTRY_POINTS}


@pytest.mark.parametrize("path", sorted(project_files.generated()))
def test_each_generated_file_is_what_make_generate_writes(path):
    assert (REPO / path).read_text() == project_files.generated()[path], f"{path} is stale: make generate"


def test_every_script_and_mlproject_entry_point_has_a_row():
    assert sorted(p.stem for p in (REPO / "entrypoints").glob("*.py")) == sorted(ROWS)
    assert list(yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]) == list(ROWS)


@pytest.mark.parametrize("entry", sorted(ROWS))
def test_mlflow_runs_each_entry_point_with_its_config_defaults(entry):
    """MLflow's own reading of the MLproject: every field a parameter, and the command it starts without `-P`
    parses into the config's defaults (no problem the defaults do not have: generate needs a model_uri)."""
    spec = _project_spec.load_project(REPO).get_entry_point(entry)
    config_cls = ROWS[entry].config
    assert list(spec.parameters) == [f.name for f in fields(config_cls)]
    script, *arguments = shlex.split(spec.compute_command({}, None))[1:]
    assert script == f"entrypoints/{entry}.py"
    context = entry_point(entry).make_context(entry, arguments)
    declared = from_strings(config_cls, context.params)
    assert declared.problems() == config_cls().problems() and declared == config_cls()


def dependencies():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    python_env = [d for d in yaml.safe_load((REPO / "python_env.yaml").read_text())["dependencies"] if d != "-e ."]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
    conda_pip = [d for d in next(x["pip"] for x in conda if isinstance(x, dict)) if d != "-e ."]
    return pyproject, python_env, conda_pip


def test_the_three_environment_files_list_the_same_dependencies():
    pyproject, python_env, conda_pip = dependencies()
    assert pyproject == python_env == conda_pip


def test_make_install_installs_every_extra():
    """The extras are what `make server`, `make test`, Ray and serving with uv need: `make install` installs them
    all, each pinned."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = re.search(r'pip install -q -e "\.\[([a-z,]+)\]"', (REPO / "Makefile").read_text()).group(1)
    assert sorted(installed.split(",")) == sorted(extras)
    assert all("==" in requirement for requirements in extras.values() for requirement in requirements)


def test_the_gpu_measurement_finds_its_kit_and_fits_its_budget(tmp_path):
    """scripts/gpu_bench.sh, called from any folder, finds the checkout's src/, the wheels and the tokenizers that
    `make gpu-kit` prepares next to it; its worst case (every step's limit reached, plus the kill grace) fits
    6 minutes, with a limit of its own for each compiled classify variant."""
    import re
    import shutil
    import subprocess

    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "gpu_bench.sh", checkout / "scripts")
    (checkout / ".whl").mkdir()
    (checkout / ".whl" / "a-1.0-py3-none-any.whl").write_text("")
    (checkout / ".gpu-cache" / "models").mkdir(parents=True)
    planned = subprocess.run(["bash", str(checkout / "scripts" / "gpu_bench.sh")], cwd=tmp_path, text=True,
                             capture_output=True, env={"PATH": "/usr/bin:/bin", "PLAN_ONLY": "1",
                                                       "OUT": str(tmp_path / "out")})
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.splitlines()[:3] == [f"src: {checkout}/src", "wheels: 1 in .whl/",
                                               f"FINETUNE_LAB_CACHE: {checkout}/.gpu-cache"]
    limits = dict((name, int(s)) for name, s in re.findall(r"(install|imports|lora_sweep|classify project|classify "
                                                          r"project_large) (\d+) s", planned.stdout))
    grace = int(re.search(r"\+ (\d+) s kill grace each", planned.stdout)[1])
    assert set(limits) == {"install", "imports", "lora_sweep", "classify project", "classify project_large"}
    assert sum(limits.values()) + len(limits) * grace <= 6 * 60, planned.stdout
    script = (REPO / "scripts" / "gpu_bench.sh").read_text()
    assert '--variants baseline,project\n' in script and "--variants baseline,project_large\n" in script
