"""The MLproject, pyproject.toml, python_env.yaml and conda.yaml agree with the code and each other."""

import re
from dataclasses import fields

import pytest
import tomllib
import yaml
from conftest import REPO

from finetune_lab.config import (
    BenchConfig,
    ClassifyConfig,
    ClassifySweepConfig,
    GenerateConfig,
    ProbeConfig,
    ReportConfig,
    SweepConfig,
    from_strings,
)

ENTRY_POINTS = {"classify": ClassifyConfig, "classify_sweep": ClassifySweepConfig, "lora_sweep": SweepConfig,
                "retrain_probe": ProbeConfig, "generate": GenerateConfig, "report": ReportConfig, "bench": BenchConfig}


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


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mlproject_parameters_match_the_config(entry):
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"][entry]
    config_cls = ENTRY_POINTS[entry]
    assert set(spec["parameters"]) == {f.name for f in fields(config_cls)}
    declared = from_strings(config_cls, {name: p["default"] for name, p in spec["parameters"].items()})
    # parsed as the CLI parses them: no problem the dataclass defaults do not have (generate needs a model_uri)
    assert declared.problems() == config_cls().problems() and declared == config_cls()
    for name in spec["parameters"]:
        assert f"--{name.replace('_', '-')} {{{name}}}" in spec["command"], name


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_script_exists(entry):
    assert (REPO / "entrypoints" / f"{entry}.py").is_file()
