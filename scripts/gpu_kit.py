"""What an offline GPU machine needs to run `scripts/gpu_bench.sh`, prepared on a machine with PyPI (`make gpu-kit`):

- `.whl/`: wheels of the packages the GPU machine's image lacks (it has CUDA torch, numpy, pandas, pyarrow,
  scikit-learn, matplotlib, tokenizers, safetensors, psutil, click, pyyaml, requests, tqdm, triton), for its Python
  (CPython 3.12, manylinux x86_64), at the versions this checkout's environment runs (`make install`: the pins of
  pyproject.toml and what they resolved to), without their dependencies (the list is complete);
- `.gpu-cache/models/`: the tokenizers of the `random:*` models the bench trains (their weights are built there),
  where `scripts/gpu_bench.sh` points FINETUNE_LAB_CACHE.

Both are ignored by git; name them in the transfer (a device call's `carry`). Prints their sizes, and fails if they
and the tracked files exceed TRANSFER_LIMIT_MIB.

    usage: .venv/bin/python scripts/gpu_kit.py      (or: make gpu-kit)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS, CACHE = REPO / ".whl", REPO / ".gpu-cache"
TRANSFER_LIMIT_MIB = 64
# The packages the GPU image lacks, or has at other versions: the set found to import there next to its own.
PACKAGES = (
    # the training stack this project pins
    "transformers", "huggingface_hub", "peft", "accelerate", "datasets", "dill", "multiprocess", "gguf",
    # MLflow without its UI, and what its tracking store imports (sqlite through SQLAlchemy and alembic)
    "mlflow-skinny", "mlflow-tracing", "SQLAlchemy", "alembic", "Mako", "sqlparse", "cachetools", "databricks-sdk",
    "google-auth", "pyasn1", "pyasn1_modules", "opentelemetry-api", "opentelemetry-proto", "opentelemetry-sdk",
    "opentelemetry-semantic-conventions", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
    "fastapi", "starlette", "uvicorn", "annotated-doc", "GitPython", "gitdb", "smmap", "python-dotenv",
    "importlib_metadata", "protobuf", "httpx2", "httpcore2", "truststore", "anyio", "idna", "h11", "cryptography",
    "cffi", "pycparser",
    # rouge-score's (retrain_probe)
    "nltk",
)
# Published as a source distribution only: built into a (pure Python) wheel here.
SOURCE_ONLY = ("rouge-score",)
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *(option for tag in ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                 "manylinux2014_x86_64", "any") for option in ("--platform", tag))]
# The offline models whose tokenizers the bench's `random:*` models use (`models.RANDOM_MODELS`).
TOKENIZERS = ("minilm-l6", "smollm2-135m-instruct")


def pinned(names) -> list[str]:
    """`name==version` as installed in this environment."""
    return [f"{name}=={metadata.version(name)}" for name in names]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True)


def fetch_wheels() -> None:
    shutil.rmtree(WHEELS, ignore_errors=True)  # no wheel of another version left to install over these
    pip("download", "--no-deps", *PLATFORM, "-d", str(WHEELS), *pinned(PACKAGES))
    pip("wheel", "--no-deps", "-w", str(WHEELS), *pinned(SOURCE_ONLY))


def save_tokenizers() -> None:
    from transformers import AutoTokenizer

    from finetune_lab import models

    shutil.rmtree(CACHE, ignore_errors=True)
    for alias in TOKENIZERS:
        target = CACHE / "models" / alias
        AutoTokenizer.from_pretrained(models.fetch(alias)).save_pretrained(target)
        (target / models.COMPLETE_MARKER).write_text("tokenizer only\n")


def mib(paths) -> float:
    return sum(path.stat().st_size for path in paths if path.is_file()) / 2**20


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in listed.split("\0") if name]


def main() -> int:
    fetch_wheels()
    save_tokenizers()
    sizes = {".whl/": mib(WHEELS.rglob("*")), ".gpu-cache/": mib(CACHE.rglob("*")),
             "the tracked files": mib(tracked_files())}
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"{name:<18} {size:6.1f} MiB")
    print(f"{'in all':<18} {total:6.1f} MiB of the {TRANSFER_LIMIT_MIB} MiB a transfer may hold "
          f"({len(list(WHEELS.glob('*.whl')))} wheels)")
    if total > TRANSFER_LIMIT_MIB:
        print(f"error: {total:.1f} MiB exceed the {TRANSFER_LIMIT_MIB} MiB transfer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
