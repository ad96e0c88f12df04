"""Device and precision as functions of what the device can do (T4-, A100-, H100-like answers on a CPU machine),
and the registry's reload check on the path a GPU takes, with the device chosen explicitly."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from support.paths import entrypoint
from transformers import AutoModelForCausalLM

from finetune_lab import causal_lm, device, lora, models, registry, tracking, training
from finetune_lab.config import ClassifyConfig, LoraSweepConfig

T4 = device.Capabilities("Tesla T4", (7, 5))
A100 = device.Capabilities("NVIDIA A100-SXM4-80GB", (8, 0))
H100 = device.Capabilities("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.mark.parametrize("capabilities, chosen", [
    (T4, "fp16"),  # no bf16: fp16 autocast + loss scaling
    (A100, "bf16"),
    (H100, "bf16"),
    (device.CPU, "fp32"),
])
def test_precision_follows_the_device_capabilities_unless_forced(capabilities, chosen):
    assert device.precision(capabilities) == chosen == device.precision(capabilities, "auto")
    for forced in ("fp32", "bf16", "fp16"):
        assert device.precision(capabilities, forced) == forced


@pytest.mark.parametrize("chosen, trainer, frozen", [
    ("fp16", {"bf16": False, "fp16": True}, torch.float16),
    ("bf16", {"bf16": True, "fp16": False}, torch.bfloat16),
    ("fp32", {"bf16": False, "fp16": False}, torch.float32),
])
def test_a_precision_sets_the_trainer_flags_and_the_frozen_base_dtype(chosen, trainer, frozen):
    assert device.trainer_precision(chosen) == trainer
    assert device.frozen_dtype(chosen) == frozen
    assert models.model_kwargs(device.frozen_dtype(chosen))["dtype"] == frozen


def test_fp16_trains_only_on_a_gpu():
    (line,) = device.precision_problems("fp16", device.CPU)
    assert line.startswith("precision: fp16 trains only on a CUDA GPU") and "use bf16 or fp32 on a CPU" in line
    assert device.precision_problems("fp16", T4) == [] == device.precision_problems("bf16", device.CPU)
    assert device.precision_problems("auto", device.CPU) == []


def test_evaluation_autocasts_to_the_precision_on_any_device():
    layer = torch.nn.Linear(4, 4)
    for chosen, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        with device.autocast(chosen, "cpu"):
            assert layer(torch.ones(1, 4)).dtype == dtype, chosen


def test_a_t4_trains_with_fp16_autocast_and_loss_scaling(tmp_path):
    """The Trainer's arguments for a GPU without bf16 (constructible on a CPU; bf16=True is not without use_cpu):
    fp16 with the Trainer's GradScaler, fused AdamW, pinned memory copied without waiting."""
    arguments = training.training_arguments(tmp_path, ClassifyConfig(), 0, capabilities=T4)
    assert arguments.fp16 and not arguments.bf16 and arguments.optim == "adamw_torch_fused"
    assert arguments.dataloader_pin_memory and arguments.accelerator_config.non_blocking and not arguments.use_cpu
    here = training.training_arguments(tmp_path, ClassifyConfig(), 0)
    assert not here.fp16 and not here.bf16 and here.optim == "adamw_torch"
    assert not here.dataloader_pin_memory and not here.accelerator_config.non_blocking
    forced = training.training_arguments(tmp_path, ClassifyConfig(precision="bf16"), 0)
    assert forced.bf16 and forced.use_cpu and not forced.fp16


def test_a_registered_model_serves_in_fp32_on_a_cpu_unless_asked(monkeypatch):
    monkeypatch.delenv(device.PRECISION_ENV, raising=False)
    assert device.serving_dtype(torch.bfloat16, "cuda") == torch.bfloat16, "on a GPU: as trained"
    assert device.serving_dtype(torch.float16, "cuda") == torch.float16
    assert device.serving_dtype(torch.bfloat16, "cpu") == torch.float32, "on a CPU: fp32"
    for setting, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        with device.serving_on("cpu", setting):
            assert device.serving_dtype(torch.float32, "cpu") == dtype == device.serving_dtype(torch.bfloat16, "cuda")
    assert device.PRECISION_ENV not in os.environ, "the setting ends with the block"
    monkeypatch.setenv(device.PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="FINETUNE_LAB_PRECISION: must be one of auto, fp32, bf16, fp16, got 'half'"):
        device.serving_dtype(torch.float32, "cpu")


def test_the_device_setting_is_checked_against_the_device():
    assert device.choose("", device.CPU) == "cpu" == device.choose("auto", device.CPU)
    assert device.choose("auto", H100) == "cuda" and device.choose("CPU", H100) == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        device.choose("cuda", device.CPU)
    with pytest.raises(ValueError, match="must be one of auto, cpu, cuda, got 'gpu'"):
        device.choose("gpu", H100)


def test_reload_tolerance_is_exact_on_cpu_and_a_rounding_of_the_dtype_on_cuda():
    assert device.reload_tolerance(torch.bfloat16, "cpu", 30.0) == 0.0
    bf16 = device.reload_tolerance(torch.bfloat16, "cuda", 20.0)
    assert bf16 == pytest.approx(device.RELOAD_ULPS * 2**-7 * 20.0)  # two bf16 roundings of a logit of 20
    assert bf16 > 1e-2, "a fixed 1e-2 would refuse a correct bf16 adapter"
    assert device.reload_tolerance(torch.float16, "cuda", 20.0) == pytest.approx(device.RELOAD_ULPS * 2**-10 * 20)
    assert device.reload_tolerance(torch.float32, "cuda", 0.5) == pytest.approx(device.RELOAD_ULPS * 2**-23)


def test_generate_refuses_a_gpu_it_does_not_have_in_one_line(client):
    outcome = CliRunner().invoke(entrypoint("generate").main, ["--model-uri", "models:/x/1", "--device", "cuda"])
    assert outcome.exit_code == 2 and "Traceback" not in outcome.output, outcome.output
    assert "error: device: FINETUNE_LAB_DEVICE=cuda, but no CUDA GPU is visible" in outcome.output
    outcome = CliRunner().invoke(entrypoint("generate").main, ["--model-uri", "models:/x/1", "--device", "tpu"])
    assert "error: device: must be empty (= FINETUNE_LAB_DEVICE, else auto) or one of auto, cpu, cuda" in outcome.output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_adapter_on_a_16_bit_base_registers_and_serves_as_its_reference_computed(client, tmp_path, monkeypatch,
                                                                                     dtype):
    """What a GPU run does, on a CPU: the base in bf16 (as trained on a GPU with bf16; fp16 on a T4), the reference
    logits and the reload on one device (chosen explicitly), in the same dtype; exact on a CPU. Served on a CPU it
    loads in fp32 unless asked for its dtype, and then computes exactly what the reference did.
    FINETUNE_LAB_DEVICE=cuda on a machine without a GPU is one clear error."""
    name = device.PRECISION_OF[dtype]
    source = models.tiny(models.CAUSAL_LM, ["hello there", "general kenobi"] * 10, seed=1)
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)  # as `load_base` does on a GPU
    tokenizer = causal_lm.load_tokenizer(source)
    texts = ["hello there", "general kenobi"]
    with tracking.experiment_run("test", f"{name}-registry") as run:
        with lora.adapter(base, LoraSweepConfig(), rank=2, seed=0) as adapted:
            with torch.no_grad():  # a trained adapter: B is no longer zero
                for weight_name, weight in adapted.named_parameters():
                    if "lora_B" in weight_name:
                        weight.normal_(std=0.5)
            lora.log_adapter(adapted, tokenizer)
            expected = registry.reference(adapted, tokenizer, texts)
        assert (expected.device, expected.dtype) == ("cpu", dtype)
        adapter_dir = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter",
                                                          dst_path=str(tmp_path))
        candidate = registry.Candidate(
            log=lambda: registry.log_adapter_model(adapter_dir, source, expected.dtype, "plain", 4, texts[0]),
            check_texts=texts, expected=expected, eval_loss=1.0, eval_set_digest="d", tags={})
        monkeypatch.setenv(device.DEVICE_ENV, "cuda")  # what the check must not follow: it reloads where it trained
        monkeypatch.setenv(device.PRECISION_ENV, "fp32")  # ... in the dtype it trained in
        result = registry.register_verified(f"{name}-adapter", candidate, run.info.run_id)
    version = client.get_model_version(f"{name}-adapter", result["version"])
    assert version.tags["reload_device"] == f"cpu {device.dtype_name(dtype)}"
    assert float(version.tags["reload_max_logit_diff"]) == 0.0 == float(version.tags["reload_tolerance"])

    monkeypatch.delenv(device.PRECISION_ENV)
    with pytest.raises(ValueError, match="FINETUNE_LAB_DEVICE=cuda, but no CUDA GPU is visible"):
        mlflow.pyfunc.load_model(result["model_uri"])
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    served = mlflow.pyfunc.load_model(result["model_uri"]).unwrap_python_model()
    assert served.model.device.type == "cpu" and served.model.get_input_embeddings().weight.dtype == torch.float32
    monkeypatch.setenv(device.PRECISION_ENV, name)
    served = mlflow.pyfunc.load_model(result["model_uri"]).unwrap_python_model()
    assert served.model.get_input_embeddings().weight.dtype == dtype
    lora_weights = {p.dtype for n, p in served.model.named_parameters() if "lora_" in n}
    assert lora_weights == {torch.float32}, "the adapter's own weights stay fp32, as trained"
    for text, logits in zip(texts, expected.logits):
        assert torch.equal(served.logits(text), logits)
    assert Path(adapter_dir, "adapter_config.json").is_file()
