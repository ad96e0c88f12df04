"""Where models run and in what precision, as pure functions of what the device can do (`Capabilities`) and of
the `precision` setting, so that the choices for a T4, an A100 or an H100 are testable on a machine without a GPU,
and a CPU can run what a GPU runs (`precision=bf16`).

- Training precision (`precision`): `auto` = bf16 autocast on GPUs with native bf16 (compute capability 8.0 and
  later: A100, L4, H100, H200), fp16 autocast with loss scaling on older GPUs (T4 and V100 have no bf16: Colab's
  free GPU is a T4), fp32 on a CPU; or forced, on any device (fp16 only on a GPU: `precision_problems`). It sets
  the HF Trainer's flags, the dtype a frozen base (LoRA) is stored in (trained weights stay fp32: the optimizer's
  master copy) and the autocast of evaluation.
- Serving device of a registered model: FINETUNE_LAB_DEVICE (`auto`, `cpu`, `cuda`; `auto` = the GPU when there is
  one), and its serving dtype: FINETUNE_LAB_PRECISION (`auto` = the dtype it was trained in on a GPU, fp32 on a
  CPU, where bf16 is slow without native support; or forced). `generate -P device=... -P precision=...` sets them
  for its own load.
- Reload tolerance: how far the logits of the same model, with the same weights, on the same device and dtype may
  differ between two loads.

Lean on purpose (torch, and the constants of `config`): registered models import it wherever they are loaded.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from finetune_lab.config import PRECISIONS, SERVING_DEVICES
from finetune_lab.errors import problem

DEVICE_ENV = "FINETUNE_LAB_DEVICE"
PRECISION_ENV = "FINETUNE_LAB_PRECISION"
AUTO = "auto"
BF16, FP16, FP32 = "bf16", "fp16", "fp32"
DTYPES = {BF16: torch.bfloat16, FP16: torch.float16, FP32: torch.float32}
PRECISION_OF = {dtype: name for name, dtype in DTYPES.items()}
# Native bf16 tensor cores arrived with compute capability 8.0 (Ampere). torch.cuda.is_bf16_supported() also says
# yes on older GPUs, where bf16 is emulated: slower than fp16, so those train in fp16.
BF16_CAPABILITY = (8, 0)
# Units in the last place of the logits' magnitude that a reload on CUDA may differ by (see `reload_tolerance`).
RELOAD_ULPS = 2


@dataclass(frozen=True)
class Capabilities:
    """What the code needs to know of the device it runs on."""

    name: str
    """The GPU's name (`torch.cuda.get_device_name`), or `cpu`."""
    compute_capability: tuple[int, int] | None = None
    """The GPU's (major, minor) compute capability; None without a GPU."""

    @property
    def cuda(self) -> bool:
        return self.compute_capability is not None


CPU = Capabilities("cpu")


@functools.cache
def detect() -> Capabilities:
    """This process's device: the first visible GPU, or the CPU."""
    if not torch.cuda.is_available():
        return CPU
    return Capabilities(torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0)))


def training_device() -> str:
    """Where this process trains (the HF Trainer's choice): `cuda` when it has a GPU, else `cpu`."""
    return "cuda" if detect().cuda else "cpu"


def precision(capabilities: Capabilities, setting: str = AUTO) -> str:
    """The training precision: the one `setting` forces, else (`auto`) `bf16` (autocast) with native bf16, `fp16`
    (autocast + loss scaling) on a GPU without it, `fp32` on a CPU."""
    if setting != AUTO:
        return setting
    if not capabilities.cuda:
        return FP32
    return BF16 if capabilities.compute_capability >= BF16_CAPABILITY else FP16


def training_precision(setting: str) -> str:
    """The precision this process trains in for a `precision` setting."""
    return precision(detect(), setting)


def precision_problems(setting: str, capabilities: Capabilities) -> list[str]:
    """fp16 trains only on a GPU. On a CPU, accelerate (which the HF Trainer trains through) turns neither fp16
    autocast nor loss scaling on (`Accelerator.native_amp` stays False, no GradScaler), so `Trainer(fp16=True)`
    would train in fp32 without a word (measured: torch 2.13, accelerate 1.15, transformers 5.24)."""
    if setting == FP16 and not capabilities.cuda:
        return [problem("precision", "fp16 trains only on a CUDA GPU, and this process sees none (on a CPU the Trainer "
                                     "would silently train in fp32: accelerate neither autocasts to fp16 nor scales "
                                     "the loss there); use bf16 or fp32 on a CPU")]
    return []


def trainer_precision(chosen: str) -> dict[str, bool]:
    """The HF Trainer's `bf16` / `fp16` arguments for precision `chosen` (fp16 = autocast with a GradScaler)."""
    return {"bf16": chosen == BF16, "fp16": chosen == FP16}


def frozen_dtype(chosen: str) -> torch.dtype:
    """The dtype a frozen base is stored in: precision `chosen`'s."""
    return DTYPES[chosen]


def autocast(chosen: str, device_type: str) -> contextlib.AbstractContextManager:
    """Autocast on `device_type` to precision `chosen`, as the Trainer trains (evaluation computes as training
    did); nothing in fp32."""
    if chosen == FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[chosen])


def choose(setting: str, capabilities: Capabilities) -> str:
    """`cpu` or `cuda` for a device setting (`auto`, `cpu`, `cuda`; empty = `auto`). ValueError for anything else,
    or for `cuda` without a GPU."""
    choice = (setting or "auto").strip().lower()
    if choice not in SERVING_DEVICES:
        raise ValueError(f"{DEVICE_ENV}: must be one of {', '.join(SERVING_DEVICES)}, got {setting!r}")
    if choice == "cuda" and not capabilities.cuda:
        raise ValueError(f"{DEVICE_ENV}=cuda, but no CUDA GPU is visible to this process (torch "
                         f"{torch.__version__}); use cpu or auto")
    if choice == "auto":
        return "cuda" if capabilities.cuda else "cpu"
    return choice


def serving_device() -> str:
    """Where a registered model loads: FINETUNE_LAB_DEVICE, else the GPU when there is one."""
    return choose(os.environ.get(DEVICE_ENV, ""), detect())


def serving_dtype(trained: torch.dtype, on: str) -> torch.dtype:
    """The dtype a registered model's weights load in on device `on`, given the dtype they were `trained` in
    (an adapter's base; a classifier's weights): FINETUNE_LAB_PRECISION when it forces one, else (`auto`) the trained
    dtype on a GPU and fp32 on a CPU (bf16 is slow on CPUs without native support). ValueError for another
    setting."""
    setting = (os.environ.get(PRECISION_ENV, "") or AUTO).strip().lower()
    if setting not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}: must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != AUTO:
        return DTYPES[setting]
    return trained if on == "cuda" else torch.float32


@contextlib.contextmanager
def serving_on(name: str, precision_setting: str = AUTO) -> Iterator[None]:
    """Registered models loaded within the block load on device `name` (`cpu`, `cuda`, `auto`), in the dtype of
    `precision_setting` (`auto`: see `serving_dtype`)."""
    with _environment(DEVICE_ENV, name), _environment(PRECISION_ENV, precision_setting):
        yield


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def dtype_name(dtype: torch.dtype) -> str:
    """`bfloat16` for torch.bfloat16: how a dtype is written into a registered model's settings."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def reload_tolerance(dtype: torch.dtype, device_type: str, magnitude: float) -> float:
    """The largest logit difference allowed between a model in memory and its reload, computed with the same
    weights on the same device in the same `dtype`, for logits up to `magnitude` in absolute value.

    On a CPU the kernels are deterministic: exactly 0. On CUDA, cuBLAS is bitwise reproducible for the same
    shapes on the same GPU, but a kernel that adds up in another order (atomics, another algorithm picked by a
    heuristic) moves a result by roundings of its own dtype: RELOAD_ULPS units in the last place at the logits'
    magnitude are allowed (bf16 keeps 8 significant bits: 2 x 2^-7 = 1.6 % of the largest logit; fp16 0.2 %;
    fp32 2.4e-7). A fixed 1e-2 would be below one bf16 rounding of a logit of 2 or more, so it would refuse
    correct adapters; an adapter reloaded on other base weights moves logits by whole units and is still caught."""
    if device_type == "cpu":
        return 0.0
    return RELOAD_ULPS * torch.finfo(dtype).eps * max(1.0, magnitude)
