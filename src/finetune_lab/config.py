"""Typed experiment configurations.

Every field carries a one-line docstring (the string right below it); `field_docs()` reads them back for
`--help`. Values arrive as strings from the CLI / `mlflow run -P` (MLflow does not type-check parameters), so
`from_strings` coerces them, lists of integers included, and remembers what failed to parse; `problems()` then
returns those together with every rule `validate()` finds, so each mistake is reported once and all at once.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from finetune_lab.errors import field_of, problem

IntList = tuple[int, ...]


def _check(problems: list[str], config, name: str, holds, requirement: str) -> None:
    """Append `name: requirement, got value` unless `holds(value)`."""
    value = getattr(config, name)
    if not holds(value):
        problems.append(problem(name, f"{requirement}, got {_shown(value)}"))


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def _check_int_list(problems: list[str], config, name: str, minimum: int, allow_empty: bool = False) -> None:
    """A list of distinct integers >= minimum (parsed from `4,8,16` by `from_strings`)."""
    values = getattr(config, name)
    if not values and not allow_empty:
        problems.append(problem(name, "must list at least one integer, like 4,8,16"))
    elif any(v < minimum for v in values):
        problems.append(problem(name, f"must be integers >= {minimum}, got {_shown(values)}"))
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        problems.append(problem(name, f"lists {', '.join(map(str, repeated))} more than once"))


class Config:
    """What every entry point's configuration can do: report its problems, parse errors included."""

    def validate(self) -> list[str]:
        """Problems that need no data or model to detect (subclasses extend it)."""
        return []

    def problems(self) -> list[str]:
        """Values that failed to parse, then every rule broken by the others (a field is reported once)."""
        unparsable: dict[str, str] = getattr(self, "_parse_problems", {})
        return [*unparsable.values(), *(p for p in self.validate() if field_of(p) not in unparsable)]


@dataclass
class TrainingConfig(Config):
    """What every fine-tuning experiment shares: the model, the data and the optimisation."""

    model: str = ""
    """Hub id, local folder, or an alias of an offline model."""
    dataset: str = ""
    """Hub id, local .csv/.jsonl/.json/.parquet file, or an alias of the embedded data."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW (linear decay)."""
    epochs: float = 1.0
    """Passes over the training split (fractions allowed; ignored when max_steps > 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = train for `epochs`)."""
    batch_size: int = 16
    """Examples per device per optimizer step."""
    max_length: int = 512
    """Truncate inputs to this many tokens (batches are padded dynamically)."""

    def validate(self) -> list[str]:
        problems = super().validate()
        for name in ("model", "dataset"):
            _check(problems, self, name, lambda v: bool(v.strip()), "must not be empty")
        _check(problems, self, "learning_rate", lambda v: v > 0, "must be > 0")
        _check(problems, self, "epochs", lambda v: v > 0, "must be > 0")
        _check(problems, self, "max_steps", lambda v: v >= 0, "must be >= 0 (0 = train for `epochs`)")
        _check(problems, self, "batch_size", lambda v: v >= 1, "must be >= 1")
        _check(problems, self, "max_length", lambda v: v >= 8, "must be >= 8")
        return problems


SWITCHES = ("auto", "on", "off")


def _check_switch(problems: list[str], config, name: str) -> None:
    _check(problems, config, name, lambda v: v in SWITCHES, f"must be one of {', '.join(SWITCHES)}")


def _check_experiment(problems: list[str], config) -> None:
    _check(problems, config, "experiment", lambda v: bool(v.strip()), "must not be empty")


def _check_resume(problems: list[str], config) -> None:
    _check(problems, config, "resume", lambda v: v in ("", "latest") or re.fullmatch(r"[0-9a-f]{32}", v),
           "must be empty, `latest` or a parent run id (32 hexadecimal digits)")


COMPILE_SHAPES = ("dynamic", "buckets")


@dataclass
class ClassifyConfig(TrainingConfig):
    """Fine-tune a sequence classifier and evaluate it on a held-out split."""

    model: str = "distilbert-base-uncased"
    """Hub id, local folder, or alias: `minilm-l6` (offline all-MiniLM-L6-v2), `tiny` (random DistilBERT)."""
    dataset: str = "imdb"
    """Hub id, local .csv/.jsonl/.json/.parquet file, or `sample` (the embedded sentiment set)."""
    text_column: str = "text"
    """Column holding the input text."""
    label_column: str = "label"
    """Column holding integer class labels 0..K-1."""
    label_names: str = ""
    """Comma list of class names for labels 0..K-1 (empty = the dataset's own names, else the numbers)."""
    max_train_samples: int = 0
    """Use only the first N training examples after shuffling by seed (0 = all)."""
    max_eval_samples: int = 0
    """Use only the first N evaluation examples after shuffling by seed (0 = all)."""
    seed: int = 42
    """Seed for the split, shuffling, initialisation and data order."""
    experiment: str = "classification"
    """MLflow experiment when called directly (under `mlflow run`, `--experiment-name` decides)."""
    run_name: str = ""
    """MLflow run name (empty = generated by MLflow)."""
    register_as: str = ""
    """Register the fine-tuned classifier under this model-registry name (empty = don't register)."""
    compile: str = "auto"
    """torch.compile the model for training: `auto` = on with CUDA, `on`, `off`."""
    compile_shapes: str = "dynamic"
    """What a compiled model trains on: `dynamic` = one graph for every sequence length; `buckets` = batches padded
    to 64, 128, 256... tokens up to max_length, one static graph each."""

    def validate(self) -> list[str]:
        problems = super().validate()
        _check_switch(problems, self, "compile")
        _check(problems, self, "compile_shapes", lambda v: v in COMPILE_SHAPES,
               f"must be one of {', '.join(COMPILE_SHAPES)}")
        _check(problems, self, "max_train_samples", lambda v: v >= 0, "must be >= 0 (0 = all)")
        _check(problems, self, "max_eval_samples", lambda v: v >= 0, "must be >= 0 (0 = all)")
        names = self.label_name_list
        if self.label_names.strip() and (not all(names) or len(set(names)) < len(names)):
            problems.append(problem("label_names", f"must be distinct non-empty names like negative,positive, "
                                                   f"got {self.label_names!r}"))
        _check_experiment(problems, self)
        return problems

    @property
    def label_name_list(self) -> list[str]:
        return [name.strip() for name in self.label_names.split(",")] if self.label_names.strip() else []


PROMPT_FORMATS = ("plain", "chat")
LOSS_ON = ("output", "all")


@dataclass
class LoraTrainingConfig(TrainingConfig):
    """What every LoRA experiment on a causal LM shares (the sweep and the retraining probe)."""

    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Hub id, local folder, or alias: `smollm2-135m-instruct` (offline), `tiny` (random Llama)."""
    dataset: str = "gberseth/IFT6758-comments"
    """Hub id, local .csv/.jsonl/.json/.parquet file, or `sample_chat` (the embedded chat set)."""
    input_column: str = "input"
    """Column holding the prompt."""
    output_column: str = "output"
    """Column holding the reply to learn."""
    prompt_format: str = "plain"
    """`plain` = input + newline + output + EOS (the original recipe's text); `chat` = the tokenizer's chat template."""
    loss_on: str = "all"
    """`all` = loss on the whole text (the original recipe's); `output` = prompt tokens masked out of the loss."""
    lora_alpha: float = 0.0
    """Fixed LoRA alpha for every rank (scale alpha/r then shrinks as r grows); 0 = use `alpha_per_rank`."""
    alpha_per_rank: float = 2.0
    """alpha = alpha_per_rank * r, so every rank has the same scale alpha/r (used when lora_alpha is 0)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str = "all-linear"
    """`all-linear` (every linear layer but the output head) or a comma list of module names."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW (linear decay)."""
    batch_size: int = 8
    """Examples per device per optimizer step."""
    max_length: int = 256
    """Truncate each example to this many tokens (batches are padded dynamically)."""
    eval_fraction: float = 0.1
    """Held-out fraction (same split for every run with the same seed) when the data has no test split."""
    packing: str = "auto"
    """Padding-free batches: examples packed into rows of up to max_length tokens, attention kept within each
    example (same loss): `auto` = on with CUDA, `on`, `off` (padded batches)."""
    batch_tokens: int = 0
    """Training batches of up to this many tokens instead of batch_size examples (packed: real tokens; padded:
    examples x longest); 0 = batch_size examples. At least max_length."""

    def validate(self) -> list[str]:
        problems = super().validate()
        _check_switch(problems, self, "packing")
        _check(problems, self, "batch_tokens", lambda v: v == 0 or v >= self.max_length,
               f"must be 0 (= batch_size examples) or at least max_length ({self.max_length}) so every example fits")
        for name, allowed in (("prompt_format", PROMPT_FORMATS), ("loss_on", LOSS_ON)):
            _check(problems, self, name, lambda v, allowed=allowed: v in allowed,
                   f"must be one of {', '.join(allowed)}")
        _check(problems, self, "lora_alpha", lambda v: v >= 0, "must be >= 0 (0 = use alpha_per_rank)")
        if self.lora_alpha == 0:
            _check(problems, self, "alpha_per_rank", lambda v: v > 0, "must be > 0 when lora_alpha is 0")
        _check(problems, self, "lora_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)")
        _check(problems, self, "eval_fraction", lambda v: 0 < v <= 0.5, "must be in (0, 0.5]")
        if not self.target_modules.strip() or any(not m.strip() for m in self.target_modules.split(",")):
            problems.append(problem("target_modules", "must be `all-linear` or a comma list of module names"))
        return problems

    def alpha_for(self, rank: int) -> float:
        return self.lora_alpha if self.lora_alpha > 0 else self.alpha_per_rank * rank

    @property
    def target_module_list(self) -> str | list[str]:
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",")]


EXECUTORS = ("local", "ray")


@dataclass
class SweepConfig(LoraTrainingConfig):
    """LoRA fine-tuning of a causal LM over several ranks (and seeds): a parent run, one child per rank x seed."""

    ranks: IntList = (4, 8, 16, 32)
    """Comma list of LoRA ranks r to compare."""
    seeds: IntList = (42,)
    """Comma list of seeds; several seeds give one child per rank x seed, and error bars."""
    experiment: str = "lora_sweep"
    """MLflow experiment when called directly (under `mlflow run`, `--experiment-name` decides)."""
    run_name: str = ""
    """MLflow run name of the parent (empty = generated by MLflow)."""
    register_as: str = ""
    """Register the best child's adapter under this model-registry name (empty = don't register)."""
    executor: str = "local"
    """`local` = every child in this process, one after another; `ray` = children spread over Ray workers."""
    workers: int = 0
    """Ray workers (executor=ray): 0 = one per GPU, or one per `cpus_per_worker` CPUs when there is no GPU."""
    cpus_per_worker: int = 1
    """CPUs each Ray worker reserves (and its torch threads); with GPUs each worker also takes one GPU."""
    resume: str = ""
    """Continue an earlier sweep in its own parent run: its run id, or `latest` (the newest sweep of this experiment
    with the same config); children it finished with the same config and data are reused, the others run again."""

    def validate(self) -> list[str]:
        problems = super().validate()
        _check_int_list(problems, self, "ranks", minimum=1)
        _check_int_list(problems, self, "seeds", minimum=0)
        _check_experiment(problems, self)
        _check(problems, self, "executor", lambda v: v in EXECUTORS, f"must be one of {', '.join(EXECUTORS)}")
        _check(problems, self, "workers", lambda v: v >= 0, "must be >= 0 (0 = one per GPU, or per cpus_per_worker)")
        _check(problems, self, "cpus_per_worker", lambda v: v >= 1, "must be >= 1")
        _check_resume(problems, self)
        return problems


PROBE_MODES = ("continue", "from_scratch")


@dataclass
class ProbeConfig(LoraTrainingConfig):
    """Train, answer a probe prompt, add one new example, retrain, answer again; measure the change."""

    probe_input: str = "Hello, how are you?"
    """Prompt answered before and after retraining."""
    new_input: str = "Hi, how are you doing?"
    """Input of the example added before retraining."""
    new_output: str = "I am doing well, thank you for asking! I am here to help you."
    """Output of the example added before retraining."""
    new_example_repeats: int = 1
    """How many copies of the new example are added to the training data."""
    repeats_sweep: IntList = ()
    """Comma list of repeat counts for a dose-response curve, one child per value; 0 = a control that retrains
    without the example (empty = just new_example_repeats)."""
    mode: str = "continue"
    """`continue` = keep training the same adapter on the augmented data; `from_scratch` = a fresh adapter on it."""
    rank: int = 8
    """LoRA rank r."""
    max_new_tokens: int = 30
    """Tokens generated for each reply (greedy decoding)."""
    seed: int = 42
    """Seed for the split, adapter initialisation and data order."""
    experiment: str = "retrain_probe"
    """MLflow experiment when called directly (under `mlflow run`, `--experiment-name` decides)."""
    run_name: str = ""
    """MLflow run name of the parent (empty = generated by MLflow)."""
    resume: str = ""
    """Continue an earlier probe in its own parent run: its run id, or `latest` (the newest probe of this experiment
    with the same config); stages it finished with the same config and data are reused, the others run again."""

    def validate(self) -> list[str]:
        problems = super().validate()
        for name in ("probe_input", "new_input", "new_output"):
            _check(problems, self, name, lambda v: bool(v.strip()), "must not be empty")
        _check(problems, self, "new_example_repeats", lambda v: v >= 1, "must be >= 1")
        _check_int_list(problems, self, "repeats_sweep", minimum=0, allow_empty=True)
        _check(problems, self, "mode", lambda v: v in PROBE_MODES, f"must be one of {', '.join(PROBE_MODES)}")
        _check(problems, self, "rank", lambda v: v >= 1, "must be >= 1")
        _check(problems, self, "max_new_tokens", lambda v: v >= 1, "must be >= 1")
        _check_experiment(problems, self)
        _check_resume(problems, self)
        return problems

    @property
    def repeats_list(self) -> IntList:
        """The repeat counts to run: the sweep's values, or just new_example_repeats."""
        return self.repeats_sweep or (self.new_example_repeats,)


SERVING_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class GenerateConfig(Config):
    """Load a registered adapter (or any pyfunc model URI) and answer a prompt."""

    model_uri: str = ""
    """Model URI, e.g. `models:/NAME@champion` or `runs:/RUN_ID/model`."""
    prompt: str = "Hello, how are you?"
    """The prompt to answer."""
    max_new_tokens: int = 0
    """Tokens to generate (0 = the setting logged with the model)."""
    device: str = ""
    """Where the model loads: `cpu`, `cuda`, `auto` (the GPU when there is one); empty = FINETUNE_LAB_DEVICE, else
    auto."""
    experiment: str = "generate"
    """MLflow experiment when called directly (under `mlflow run`, `--experiment-name` decides)."""
    run_name: str = ""
    """MLflow run name (empty = generated by MLflow)."""

    def validate(self) -> list[str]:
        problems = super().validate()
        _check(problems, self, "model_uri", lambda v: bool(v.strip()), "is required, e.g. models:/NAME@champion")
        _check(problems, self, "prompt", lambda v: bool(v.strip()), "must not be empty")
        _check(problems, self, "max_new_tokens", lambda v: v >= 0, "must be >= 0 (0 = the logged setting)")
        _check(problems, self, "device", lambda v: v in ("", *SERVING_DEVICES),
               f"must be empty (= FINETUNE_LAB_DEVICE, else auto) or one of {', '.join(SERVING_DEVICES)}")
        _check_experiment(problems, self)
        return problems


@dataclass
class ReportConfig(Config):
    """Build a side-by-side report of the runs in the tracking store (no training)."""

    experiments: str = "classification,lora_sweep,retrain_probe"
    """Comma list of MLflow experiment names to report on (missing ones are listed as such)."""
    output: str = "reports/"
    """Folder for report.md and report.html."""
    experiment: str = "report"
    """MLflow experiment for the report's own run when called directly."""
    run_name: str = ""
    """MLflow run name of the report run (empty = generated by MLflow)."""

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.experiment_list:
            problems.append(problem("experiments", "must name at least one experiment"))
        _check(problems, self, "output", lambda v: bool(v.strip()), "must not be empty")
        _check_experiment(problems, self)
        return problems

    @property
    def experiment_list(self) -> list[str]:
        return [name.strip() for name in self.experiments.split(",") if name.strip()]


BENCH_WORKLOADS = ("classify", "lora_sweep")
BENCH_VARIANTS = ("baseline", "project", "project_large", "dynamic_padding", "compile_buckets")
SYNTHETIC = "synthetic"


def _check_names(problems: list[str], config, name: str, allowed: tuple[str, ...]) -> None:
    """A comma list of distinct names from `allowed`."""
    names = [n.strip() for n in getattr(config, name).split(",")]
    unknown = [n for n in names if n not in allowed]
    if unknown or not any(names):
        problems.append(problem(name, f"must be a comma list of {', '.join(allowed)}, got {getattr(config, name)!r}"))
    elif len(set(names)) < len(names):
        problems.append(problem(name, f"lists {', '.join(sorted({n for n in names if names.count(n) > 1}))} "
                                      "more than once"))


@dataclass
class BenchConfig(Config):
    """Training speed of the project against the reference baseline: the same workloads and data, named variants
    run one after another in one process on one device."""

    workloads: str = "classify,lora_sweep"
    """Comma list of workloads: `classify` (sequence classification), `lora_sweep` (a LoRA rank sweep)."""
    variants: str = "baseline,project,project_large"
    """Comma list of variants: `baseline` (the reference: fp32, eager attention, padding to max length,
    adamw_torch), `project` (the entry point's own code path and defaults), `project_large` (the same with
    large_batch / large_batch_tokens), `dynamic_padding` (the project without compilation or packing),
    `compile_buckets` (`classify` compiled for bucket lengths instead of a symbolic one)."""
    classify_model: str = "random:distilbert-base"
    """Model of the `classify` workload: `random:distilbert-base` (full size, random weights) or any model spec."""
    classify_dataset: str = SYNTHETIC
    """`synthetic` (texts of IMDB-like token lengths: lognormal, median 230, sigma 0.7, in [32, 512]) or any
    dataset spec with `text` and `label` columns."""
    lora_model: str = "random:smollm2-135m"
    """Model of the `lora_sweep` workload: `random:smollm2-135m` (full size, random weights) or any model spec."""
    lora_dataset: str = SYNTHETIC
    """`synthetic` (chat pairs of token lengths: lognormal, median 40, sigma 0.6, in [8, 256]) or any dataset spec
    with `input` and `output` columns."""
    classify_examples: int = 1600
    """Training examples of `classify`, each trained once by every variant (the same work: 100 steps of 16, 25 of
    64); a multiple of 16 and of large_batch. Synthetic: made; otherwise the first after shuffling."""
    lora_examples: int = 1024
    """Training examples of `lora_sweep`, each trained once per rank by every variant (the same work: 128 steps of
    8 per rank). Synthetic: made; otherwise the first after shuffling."""
    eval_examples: int = 512
    """Held-out examples (synthetic: made; otherwise the first after shuffling, for `classify`)."""
    classify_max_length: int = 512
    """Truncation length of `classify`; the baseline pads to it."""
    lora_max_length: int = 256
    """Truncation length of `lora_sweep`; the baseline pads to it, packed rows hold up to it."""
    ranks: IntList = (4, 8, 16, 32)
    """LoRA ranks of the sweep."""
    target_modules: str = "q_proj,v_proj"
    """LoRA target modules (comma list, or `all-linear`)."""
    large_batch: int = 64
    """Examples per batch of `classify` in `project_large`."""
    large_batch_tokens: int = 8192
    """Token budget per batch of `lora_sweep` in `project_large`."""
    peak_tflops: float = 0.0
    """The device's peak dense TFLOP/s in its training precision, for MFU; 0 = known from the device name (H100,
    H200, A100, T4), else no MFU."""
    tiny: bool = False
    """A seconds-long CPU run for tests: tiny models, 64 / 32 training examples, short lengths (these override the
    fields above)."""
    output: str = ""
    """Also write the markdown table to this file (empty = print and log it only)."""
    seed: int = 42
    """Seed for the synthetic data, the random weights, the split and the data order."""
    experiment: str = "bench"
    """MLflow experiment when called directly (under `mlflow run`, `--experiment-name` decides)."""
    run_name: str = ""
    """MLflow run name of the parent (empty = generated by MLflow)."""

    def validate(self) -> list[str]:
        problems = super().validate()
        _check_names(problems, self, "workloads", BENCH_WORKLOADS)
        _check_names(problems, self, "variants", BENCH_VARIANTS)
        for name in ("classify_model", "classify_dataset", "lora_model", "lora_dataset", "target_modules"):
            _check(problems, self, name, lambda v: bool(v.strip()), "must not be empty")
        for name in ("classify_examples", "lora_examples", "eval_examples", "large_batch"):
            _check(problems, self, name, lambda v: v >= 1, "must be >= 1")
        _check_int_list(problems, self, "ranks", minimum=1)
        _check(problems, self, "peak_tflops", lambda v: v >= 0, "must be >= 0 (0 = known from the device name)")
        _check_experiment(problems, self)
        return problems

    @property
    def workload_list(self) -> list[str]:
        return [n.strip() for n in self.workloads.split(",")]

    @property
    def variant_list(self) -> list[str]:
        """The variants, `baseline` first: the others' ratios need it."""
        names = [n.strip() for n in self.variants.split(",")]
        return sorted(names, key=lambda n: n != "baseline")

    def effective(self) -> BenchConfig:
        """The config as run: with `tiny`, the tiny preset over the sizes."""
        if not self.tiny:
            return self
        return dataclasses.replace(self, classify_model="tiny", lora_model="tiny", classify_examples=64,
                                   lora_examples=32, eval_examples=16, classify_max_length=64, lora_max_length=48,
                                   large_batch=32, large_batch_tokens=512)


@dataclass
class ServerConfig(Config):
    """A team's MLflow tracking server: runs in PostgreSQL, artifacts proxied, accounts with MLflow's basic-auth."""

    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 = every one; then also set allowed_hosts)."""
    port: int = 5000
    """Port to listen on."""
    data_dir: str = "server"
    """Folder of the server's own PostgreSQL data, artifacts and auth configuration (kept across restarts)."""
    database_url: str = ""
    """An existing PostgreSQL database instead of the server's own: postgresql://user@host/db (password: PGPASSWORD)."""
    admin_username: str = "admin"
    """The administrator account, created on the first start."""
    admin_password_file: str = ""
    """File with the administrator's password (empty = <data_dir>/admin_password); MLFLOW_AUTH_ADMIN_PASSWORD wins."""
    default_permission: str = "READ"
    """What every account may do in an experiment it was not granted (READ, EDIT, MANAGE or NO_PERMISSIONS)."""
    allowed_hosts: str = ""
    """Host names the server answers to, comma list (empty = MLflow's default: localhost and private addresses)."""
    workers: int = 4
    """Server worker processes."""
    auth_cache_s: int = 60
    """Seconds a server worker trusts a checked password (0 = hash it on every request, as MLflow does by default)."""

    def validate(self) -> list[str]:
        problems = super().validate()
        _check(problems, self, "host", lambda v: bool(v.strip()), "must not be empty")
        _check(problems, self, "port", lambda v: 1 <= v <= 65535, "must be a port number 1..65535")
        _check(problems, self, "data_dir", lambda v: bool(v.strip()), "must not be empty")
        _check(problems, self, "database_url", lambda v: not v or re.match(r"postgres(ql)?(\+psycopg)?://", v),
               "must be empty (the server's own PostgreSQL) or a postgresql:// URL")
        _check(problems, self, "admin_username", lambda v: bool(v.strip()), "must not be empty")
        _check(problems, self, "default_permission", lambda v: v in PERMISSIONS,
               f"must be one of {', '.join(PERMISSIONS)}")
        _check(problems, self, "workers", lambda v: v >= 1, "must be >= 1")
        _check(problems, self, "auth_cache_s", lambda v: v >= 0, "must be >= 0 (0 = no cache)")
        return problems


PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (a subclass's own docs win)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
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
        if kind == IntList:
            return tuple(_integer(item) for item in text.split(",")) if text else (), None
        if kind is int:
            return _integer(text), None
        if kind is float:
            value = float(text)
            if math.isnan(value) or math.isinf(value):
                raise ValueError
            return value, None
    except ValueError:
        expected = {int: "an integer", float: "a finite number"}.get(kind, "a comma list of integers like 4,8,16")
        return None, problem(name, f"must be {expected}, got {text!r}")
    raise TypeError(f"unsupported config field type {kind!r} for {name}")


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
    return {k: _as_param(v) for k, v in dataclasses.asdict(config).items()}


def _as_param(value: Any) -> Any:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return value
