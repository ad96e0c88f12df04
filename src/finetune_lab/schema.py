"""The machinery of the typed configs in `config.py`, so that module holds only their fields and rules.

- **Field types** given as text: lists of integers or numbers (`4,8,16`), a log-uniform range (`LO:HI`).
- **From strings**: values arrive as strings from the CLI and `mlflow run -P` (MLflow does not type-check
  parameters); `from_strings` coerces them and remembers what failed to parse, which `Config.problems()` reports with
  every broken rule, each mistake once and all at once. `as_params` gives a config back as MLflow logs it.
- **Docstrings**: every field carries a one-line docstring, the string right below it (as Sphinx and pydantic's
  `use_attribute_docstrings` read them); `field_docs` reads them back for `--help` and docs/parameters.md. Not
  `field(metadata={"help": ...})`: a config that only changes a default (`experiment: str = "classification"`,
  ten of them) would have to repeat the help text, and the text reads as documentation where it is declared.
- **Composition**: a config made of other entry points' (`composed`, `Part`, `Composite`: the bench's workloads).
- **Rules' vocabulary**: `check`, `check_list`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, get_type_hints

from finetune_lab.errors import field_of, problem

IntList = tuple[int, ...]
FloatList = tuple[float, ...]


@dataclass(frozen=True)
class LogRange:
    """A range of positive numbers sampled log-uniformly (`search=asha`), given as `LO:HI`."""

    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.low:g}:{self.high:g}"


# A list of values (a grid, or a choice for a search) or, for a search, a log-uniform range.
FloatSpace = FloatList | LogRange


class Config:
    """What every entry point's configuration can do: report its problems, parse errors included."""

    def validate(self) -> list[str]:
        """Problems that need no data or model to detect (subclasses extend it)."""
        return []

    def problems(self) -> list[str]:
        """Values that failed to parse, then every rule broken by the others (a field is reported once)."""
        unparsable: dict[str, str] = getattr(self, "_parse_problems", {})
        return [*unparsable.values(), *(p for p in self.validate() if field_of(p) not in unparsable)]


def check(problems: list[str], config, name: str, holds, requirement: str) -> None:
    """Append `name: requirement, got value` unless `holds(value)`."""
    value = getattr(config, name)
    if not holds(value):
        problems.append(problem(name, f"{requirement}, got {shown(value)}"))


def shown(value) -> str:
    if isinstance(value, LogRange):
        return str(value)
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def check_list(problems: list[str], config, name: str, holds, requirement: str, example: str,
                allow_empty: bool = False) -> None:
    """A list of distinct values that each satisfy `holds` (`requirement` says what it asks)."""
    values = getattr(config, name)
    if not values and not allow_empty:
        problems.append(problem(name, f"must list at least one {example}"))
    elif not all(holds(v) for v in values):
        problems.append(problem(name, f"must be {requirement}, got {shown(values)}"))
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        problems.append(problem(name, f"lists {', '.join(map(str, repeated))} more than once"))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, or made for a composed one (a subclass's own docs win)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        if "parts" in vars(klass):
            docs.update(_composed_docs(klass.parts))
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
            ):
                docs[node.target.id] = str(following.value.value)
    return docs


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(name: str, kind: Any, raw: Any) -> tuple[Any, str | None]:
    if kind is str:
        return ("" if raw is None else str(raw)), None
    text = str(raw).strip()
    if kind is bool:
        if text.lower() not in BOOLEANS:
            return None, problem(name, f"must be true or false, got {text!r}")
        return BOOLEANS[text.lower()], None
    try:
        if kind == FloatSpace:
            return _space(text), None
        if kind == IntList:
            return tuple(_integer(item) for item in text.split(",")) if text else (), None
        if kind == FloatList:
            return tuple(_finite(item) for item in text.split(",")) if text else (), None
        if kind is int:
            return _integer(text), None
        if kind is float:
            return _finite(text), None
    except ValueError:
        expected = {int: "an integer", float: "a finite number", FloatList: "a comma list of numbers like 2e-5,4e-5",
                    FloatSpace: "a comma list of numbers like 2e-5,4e-5, or a range LO:HI like 1e-5:1e-3"
                    }.get(kind, "a comma list of integers like 4,8,16")
        return None, problem(name, f"must be {expected}, got {text!r}")
    raise TypeError(f"unsupported config field type {kind!r} for {name}")


def _space(text: str) -> FloatList | LogRange:
    """`LO:HI` → a LogRange, `a,b,...` → a list of numbers (ValueError otherwise)."""
    if ":" in text:
        low, high = text.split(":")
        return LogRange(_finite(low), _finite(high))
    return tuple(_finite(item) for item in text.split(",")) if text else ()


def _finite(text: str) -> float:
    value = float(text.strip())
    if math.isnan(value) or math.isinf(value):
        raise ValueError
    return value


def _integer(text: str) -> int:
    value = float(text.strip())
    if not value.is_integer():
        raise ValueError
    return int(value)


def from_strings(cls: type, raw: dict[str, Any]):
    """Build `cls` from string values (missing keys keep their defaults); `problems()` on the result lists every
    mistake. A field that fails to parse keeps its default, so the remaining rules still run."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    parse_problems = {k: problem(k, f"unknown parameter; known: {', '.join(sorted(known))}")
                      for k in raw if k not in known}
    values: dict[str, Any] = {}
    for f in fields(cls):
        if raw.get(f.name) is None:
            continue
        value, error = _coerce(f.name, hints[f.name], raw[f.name])
        if error:
            parse_problems[f.name] = error
        else:
            values[f.name] = value
    config = cls(**values)
    config._parse_problems = parse_problems
    return config


def as_params(config) -> dict[str, Any]:
    """Every field as MLflow logs it, in the form it is given in: lists of integers as `4,8,16`, booleans as
    `true` / `false` (as `mlflow run -P` logs them, so a run called directly compares equal)."""
    return {f.name: _as_param(getattr(config, f.name)) for f in fields(config)}


def _as_param(value: Any) -> Any:
    if isinstance(value, LogRange):
        return str(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return value


@dataclass(frozen=True)
class Part:
    """Another entry point's config inside a composite one (the bench's workloads): the part's `fields` become the
    composite's own, named `prefix + name`, with their types, docstrings and rules."""

    name: str
    config: type
    prefix: str
    fields: tuple[str, ...]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The composite's defaults where they differ from the part's."""
    set_by: dict[str, str] = dataclasses.field(default_factory=dict)
    """More fields of the part that the composite's own fields set: the part's name → the composite's."""
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    """What the composite adds to a composed field's docstring."""

    def sources(self) -> dict[str, str]:
        """Every field of the part that the composite sets → the composite's field that sets it."""
        return {**{name: self.prefix + name for name in self.fields}, **self.set_by}


class Composite:
    """A config composed of other entry points' (its `parts`, made by `composed`): it derives their configs, and
    reports their problems under its own names, each under the field that set the value."""

    parts: ClassVar[dict[str, Part]] = {}

    def derive(self, part: str) -> Config:
        """The part's config: every field this config sets, the others the part's defaults."""
        return self.parts[part].config(**self.values(part, self.parts[part].sources()))

    def values(self, part: str, sources: dict[str, str]) -> dict[str, Any]:
        """Fields of the part's config → the values of this config's fields that set them (`sources`)."""
        hints = get_type_hints(self.parts[part].config)
        return {name: _fitted(getattr(self, source), hints[name]) for name, source in sources.items()}

    def named(self, problems: list[str], part: str, set_by: dict[str, str] | None = None) -> list[str]:
        """Problems of the part's config, each under the name of this config's field that set the value (`set_by`:
        more of the part's fields that this config's set, as given to `values`)."""
        sources = {**self.parts[part].sources(), **(set_by or {})}
        return [sources.get(field_of(line), field_of(line)) + line[len(field_of(line)):] for line in problems]


def _fitted(value: Any, kind: Any) -> Any:
    """`value` for a field of type `kind`: one value sets a list field to just that value (a seed, the seeds)."""
    return (value,) if kind in (IntList, FloatList) and not isinstance(value, tuple) else value


def composed(*parts: Part) -> type:
    """The base of a composite config: a dataclass of its parts' fields, named with their prefixes."""
    specs = []
    for part in parts:
        hints, defaults = get_type_hints(part.config), {f.name: f.default for f in fields(part.config)}
        specs += [(part.prefix + name, hints[name], dataclasses.field(default=part.defaults.get(name, defaults[name])))
                  for name in part.fields]
    base = dataclasses.make_dataclass("Composed", specs, bases=(Composite,))
    base.parts = {part.name: part for part in parts}
    return base


def _composed_docs(parts: dict[str, Part]) -> dict[str, str]:
    docs = {}
    for part in parts.values():
        written = field_docs(part.config)
        for name in part.fields:
            docs[part.prefix + name] = " ".join(filter(None, [f"`{name}` of `{part.name}`: {written[name]}",
                                                              part.notes.get(name)]))
    return docs
