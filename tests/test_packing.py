"""Packed (padding-free) batches mean what padded ones mean, and token budgets hold, on a tiny Llama with LoRA."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from finetune_lab import causal_lm, data, models, training
from finetune_lab.config import LoraSweepConfig
from finetune_lab.packing import PackedRows, TokenBudgetBatchSampler
from finetune_lab.prompts import IGNORE_INDEX

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def lm():
    """A tiny Llama with a non-zero LoRA adapter (so the adapter's path is exercised too), its tokenizer and
    the tokenized embedded chat set (prompt tokens masked out of the loss)."""
    config = LoraSweepConfig(model="tiny", dataset="sample_chat", max_length=MAX_LENGTH, loss_on="output")
    loaded, _ = data.load(config.dataset, 0, config.eval_fraction)
    texts = list(loaded.splits["train"]["input"]) + list(loaded.splits["train"]["output"])
    base, tokenizer = causal_lm.load_base(models.tiny(models.CAUSAL_LM, texts, seed=0), "fp32")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                            init_lora_weights=False)).eval()
    return model, tokenizer, causal_lm.tokenize(loaded.splits, tokenizer, config)


def features(tokenized, count: int) -> list[dict]:
    return [tokenized["train"][i] for i in range(count)]


def padded(tokenizer, rows: list[dict]) -> dict:
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])


def segments(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of every block of a packed batch: a block starts where position_ids restart at 0."""
    found = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        found += [(row, s, e) for s, e in zip(starts, starts[1:])]
    return found


def example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of one example from its own logits and labels (the causal shift within it)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX)


def packed_by_example(model, tokenizer, rows: list[dict], **forward) -> dict[tuple, tuple[torch.Tensor, ...]]:
    """Each example's (logits, labels) as the packed forward saw them, keyed by its token ids."""
    batch = PackedRows(tokenizer.pad_token_id, MAX_LENGTH)(rows)
    assert "attention_mask" not in batch, "a mask would turn packed-sequence detection off"
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **forward).logits
    wanted = {tuple(r["input_ids"]) for r in rows}
    found = {}
    for row, start, end in segments(batch):
        ids = tuple(batch["input_ids"][row, start:end].tolist())
        if ids in wanted:
            found[ids] = (logits[row, start:end], batch["labels"][row, start:end])
    assert len(found) == len(rows), "every example is one block of the packed batch"
    return found


def test_per_example_losses_of_a_packed_batch_equal_the_padded_ones(lm):
    model, tokenizer, tokenized = lm
    rows = features(tokenized, 9)
    batch = padded(tokenizer, rows)
    assert PackedRows(tokenizer.pad_token_id, MAX_LENGTH)(rows)["input_ids"].shape[0] > 1, "several packed rows"
    with torch.no_grad():
        padded_logits = model(**batch, use_cache=False).logits
    packed = packed_by_example(model, tokenizer, rows, use_cache=False)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        want = example_loss(padded_logits[i, :n], batch["labels"][i, :n])
        logits, labels = packed[tuple(row["input_ids"])]
        torch.testing.assert_close(example_loss(logits, labels), want, atol=1e-5, rtol=1e-5)


def test_a_packed_batch_has_the_padded_batchs_loss_and_target_count(lm):
    """The loss the Trainer optimises: the model's mean over target tokens, and the count it is scaled by."""
    model, tokenizer, tokenized = lm
    rows = features(tokenized, 9)
    flat, pad = PackedRows(tokenizer.pad_token_id, MAX_LENGTH)(rows), padded(tokenizer, rows)
    with torch.no_grad():
        torch.testing.assert_close(model(**flat, use_cache=False).loss, model(**pad, use_cache=False).loss,
                                   atol=1e-5, rtol=1e-5)
    count = lambda b: int((b["labels"][..., 1:] != IGNORE_INDEX).sum())  # noqa: E731 - the Trainer's count
    assert count(flat) == count(pad)


def test_changing_one_packed_example_leaves_the_others_logits_unchanged(lm):
    model, tokenizer, tokenized = lm
    rows = features(tokenized, 6)
    changed = dict(rows[2])
    rng = random.Random(0)
    changed["input_ids"] = [rng.randrange(len(tokenizer)) for _ in rows[2]["input_ids"]]  # same length: same rows
    before = packed_by_example(model, tokenizer, rows, use_cache=False)
    after = packed_by_example(model, tokenizer, [*rows[:2], changed, *rows[3:]], use_cache=False)
    for row in rows[:2] + rows[3:]:
        key = tuple(row["input_ids"])
        torch.testing.assert_close(after[key][0], before[key][0], atol=1e-6, rtol=0)
    assert not torch.allclose(after[tuple(changed["input_ids"])][0], before[tuple(rows[2]["input_ids"])][0])


def test_each_held_out_examples_loss_is_its_own_whether_packed_or_padded(lm):
    """Per example: the loss of its own forward alone; packed rows hold several examples in an order of their own
    (longest first), which the losses must not be attributed by. The split's eval loss is the token-weighted mean of
    them, the model's own mean loss over the batches' targets."""
    model, tokenizer, tokenized = lm
    split = tokenized["test"]
    alone = []
    with torch.no_grad():
        for row in split:
            ids = torch.tensor([row["input_ids"]])
            alone.append(example_loss(model(input_ids=ids, use_cache=False).logits[0], torch.tensor(row["labels"])))
    pad = training.example_losses(model, split, DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
                                  batch_size=8, precision="fp32")
    packer = PackedRows(tokenizer.pad_token_id, 3 * MAX_LENGTH)  # rows of several examples, longest first
    assert any(len(row) > 1 for row in packer.layout(sorted(split["length"])[:8])), "examples share packed rows"
    flat = training.example_losses(model, split, packer, batch_size=8, precision="fp32")
    for losses in (pad, flat):
        assert losses.per_example == pytest.approx(torch.stack(alone).numpy(), rel=1e-5)
        assert list(losses.targets) == [sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in split]
    # the model's own loss, batch by batch in the split's order, weighted by each batch's targets
    total = count = 0
    for start in range(0, len(split), 8):
        batch = padded(tokenizer, [split[i] for i in range(start, min(start + 8, len(split)))])
        targets = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            total += float(model(**batch, use_cache=False).loss) * targets
        count += targets
    assert flat.mean == pytest.approx(total / count, rel=1e-5) and pad.mean == pytest.approx(total / count, rel=1e-5)


def test_an_example_whose_targets_were_truncated_away_has_no_loss_and_no_weight():
    losses = training.ExampleLosses(np.array([2.0, 0.0, 3.0]), np.array([1, 0, 2]))
    assert losses.per_example[[0, 2]].tolist() == [2.0, 1.5] and np.isnan(losses.per_example[1])
    assert losses.mean == pytest.approx(5.0 / 3)


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_batches_hold_every_example_once_within_budget(packed):
    rng = random.Random(1)
    lengths = [rng.randint(3, 60) for _ in range(500)]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=256, packed=packed, seed=7)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    cost = [sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b) for b in batches]
    assert max(cost) <= 256 and len(sampler) == len(batches)
    assert sum(cost) / (256 * len(batches)) > 0.9, "the batches are nearly full"
    sampler.set_epoch(1)
    reshuffled = list(sampler)
    assert reshuffled != batches and sorted(map(sorted, reshuffled)) == sorted(map(sorted, batches))
    assert list(TokenBudgetBatchSampler(lengths, 256, packed, seed=7)) == batches, "deterministic per seed"


@pytest.mark.parametrize("packing", ["on", "off"])
def test_one_epoch_by_token_budget_trains_on_every_example_once(lm, tracking_uri, packing):
    """The counts `train` reports come from the batches: one epoch sees each example once, whatever the
    budget made of the batches; every forward holds at most the budget."""
    import mlflow

    _, tokenizer, tokenized = lm
    base = AutoModelForCausalLM.from_pretrained(tokenizer.name_or_path)
    config = LoraSweepConfig(model="tiny", dataset="sample_chat", max_length=MAX_LENGTH, packing=packing,
                         batch_tokens=160, epochs=1, learning_rate=1e-3)
    train = tokenized["train"].select(range(60))
    sizes = []

    def record(module, args, kwargs):
        if module.training:  # padded: the whole tensor; packed: its real tokens (the tiny pad token is no EOS)
            ids = kwargs["input_ids"]
            sizes.append(ids.numel() if packing == "off" else int((ids != tokenizer.pad_token_id).sum()))

    mlflow.set_experiment("budget")
    model = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.register_forward_pre_hook(record, with_kwargs=True)
    with mlflow.start_run() as run:
        fitted = causal_lm.fit(model, tokenizer, train, tokenized["test"], config, 0, run.info.run_id, "budget")
    steps = len(TokenBudgetBatchSampler(train["length"], 160, packing == "on", 0))
    assert fitted.metrics["train_steps"] == len(sizes) == steps
    assert fitted.metrics["train_examples"] == len(train)
    assert fitted.metrics["train_tokens"] == sum(train["length"])
    assert max(sizes) <= 160


def test_packed_training_batches_carry_no_attention_mask(lm):
    _, tokenizer, tokenized = lm
    config = LoraSweepConfig(model="tiny", dataset="sample_chat", max_length=MAX_LENGTH, packing="on")
    batch = causal_lm.collator(tokenizer, config)(features(tokenized, 4))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert isinstance(causal_lm.collator(tokenizer, LoraSweepConfig(packing="off")), DataCollatorForSeq2Seq)
    assert isinstance(causal_lm.collator(tokenizer, LoraSweepConfig(packing="auto")),
                      PackedRows if torch.cuda.is_available() else DataCollatorForSeq2Seq)

