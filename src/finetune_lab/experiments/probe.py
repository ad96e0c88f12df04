"""Experiment: does one new example change the model? Measured, not eyeballed.

One parent run. The child run `before` trains a LoRA adapter on the data; one child `after` per repeats value
adds the new example (`new_input` → `new_output`) that many times to the training split and retrains. Every
child answers `probe_input` greedily and measures the mean per-token NLL of `new_output` given `probe_input`
and given `new_input`, the ROUGE-L of its reply against `new_output`, and the held-out loss (the same split for
all). The parent compares each `after` with `before`: replies, NLL drop, similarity, forgetting.

`mode=continue` (the default; what the original recipe's code did, see docs/reference-experiments.md: it trained,
then called train again on the augmented data with the same model object) starts every `after` from the trained
`before` adapter with a fresh optimizer;
`mode=from_scratch` starts it from the initialisation `before` started from (the same seed gives the same fresh
adapter). Either way every repeats value starts from that same saved state, never from the previous value's.

Recipe: prepare (config, data, model, architecture checks) → load base + tokenize once → before → after per
repeats value → compare on the parent. With `resume`, the earlier parent is reopened and the stages it finished
with the same config and data are read back (`before`'s trained adapter from its logged weights) instead of
trained again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import mlflow
import pandas as pd
import safetensors.torch
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from finetune_lab import causal_lm, contract, device, held_out, lora, plots, preamble, prompts, resume, tracking
from finetune_lab import data as data_lib
from finetune_lab import metrics as metrics_lib
from finetune_lab.config import ProbeConfig
from finetune_lab.contract import BEFORE, PROBE_MEASURED
from finetune_lab.data import TEST, TRAIN


@dataclass
class Stage:
    """One child run: the adapter trained on the train split plus `repeats` copies of the new example."""

    name: str
    repeats: int
    run_id: str
    reply: str
    metrics: dict[str, float]


class BatchRecorder:
    """A collator that also counts, in every batch it builds, the rows that are the new example.

    The counts come from the batches the Trainer actually trained on, whatever its sampler did. Only the first
    `steps` batches are training steps: the dataloader builds one batch ahead (so one more when max_steps stops
    it mid-epoch). One batch is one optimizer step here (no gradient accumulation)."""

    def __init__(self, collate, marker_ids):
        self.collate = collate
        self.marker = tuple(marker_ids)
        self.counts: list[int] = []

    def __call__(self, features):
        self.counts.append(sum(tuple(f["input_ids"]) == self.marker for f in features))
        return self.collate(features)

    def exposure(self, steps: int) -> dict[str, float]:
        trained = self.counts[:steps]
        return {
            "new_example_step_fraction": sum(1 for count in trained if count) / steps if steps else 0.0,
            "new_example_copies_seen": float(sum(trained)),
        }


def new_example_row(tokenizer, config: ProbeConfig) -> datasets.Dataset:
    """The new example tokenized exactly like the training data: one row (`.select([0] * n)` repeats it)."""
    raw = datasets.Dataset.from_dict(
        {config.input_column: [config.new_input], config.output_column: [config.new_output]}
    )
    return causal_lm.tokenize(datasets.DatasetDict({TRAIN: raw}), tokenizer, config)[TRAIN]


def target_nlls(model, tokenizer, config: ProbeConfig) -> dict[str, float]:
    """Mean per-token NLL of `new_output` + EOS (as trained) after the prompt of `probe_input` and of `new_input`,
    both built with `prompts.prompt_text` and never truncated."""
    nlls = {}
    for name, user_input in (("target_nll", config.probe_input), ("target_nll_new_input", config.new_input)):
        encoded = prompts.encode_pair(tokenizer, user_input, config.new_output, prompt_format=config.prompt_format,
                                      loss_on="output", max_length=sys.maxsize)
        nlls[name] = metrics_lib.mean_token_nll(model, encoded["input_ids"], encoded["labels"])
    return nlls


def measure(model, tokenizer, config: ProbeConfig) -> tuple[str, dict[str, float]]:
    """The greedy reply to `probe_input`, the target NLLs and the reply's ROUGE-L against `new_output`."""
    reply = prompts.generate_reply(model, tokenizer, config.probe_input, config.prompt_format, config.max_new_tokens)
    return reply, {**target_nlls(model, tokenizer, config), "rouge_l": metrics_lib.rouge_l(reply, config.new_output)}


def compare(before: Stage, after: Stage) -> dict[str, float]:
    """The change from `before` to `after`; drops are positive when the target became more likely."""
    change = {}
    for name in PROBE_MEASURED:
        change[f"{name}_before"], change[f"{name}_after"] = before.metrics[name], after.metrics[name]
    for name in ("target_nll", "target_nll_new_input"):
        change[f"{name}_drop"] = before.metrics[name] - after.metrics[name]
    change["forgetting"] = after.metrics["eval_loss"] - before.metrics["eval_loss"]
    change["replies_differ"] = float(before.reply != after.reply)
    for name in ("new_example_step_fraction", "new_example_copies_seen"):
        change[name] = after.metrics[name]
    return change


def run_stage(model, tokenizer, tokenized, new_row, prepared: causal_lm.PreparedCausalLM, config: ProbeConfig,
              name: str, repeats: int, start: dict, before: Stage | None = None, *, position: str) -> Stage:
    """In child run `name` (stage `position`, like `[2/3]`): reset the adapter to `start`, train on the train split
    + `repeats` copies of the new example, answer the probe and measure; log the training data it used, the
    adapter, and the change from `before` when given."""
    with tracking.child_run(name) as child:
        mlflow.set_tags(resume.marks(config, prepared.data))
        lora.restore_adapter(model, start)
        train = datasets.concatenate_datasets([tokenized[TRAIN], new_row.select([0] * repeats)])
        params = lora.lora_params(model, config, config.rank, config.seed)
        # First: this stage's repeats and the effective lora_alpha win over the config's values.
        tracking.log_params({**params, "new_example_repeats": repeats, "train_examples": len(train)})
        preamble.log_config(config)
        data_lib.log_inputs(training_data(prepared.data, config, repeats))
        recorder = BatchRecorder(causal_lm.collator(tokenizer, config), new_row[0]["input_ids"])
        fitted = causal_lm.fit(model, tokenizer, train, tokenized[TEST], config, config.seed, child.info.run_id,
                               f"{position} {name}", collate=recorder)
        held_out.log_losses(held_out.losses_record(fitted.held_out.per_example, fitted.held_out.targets,
                                                   prepared.data.eval_digest))
        reply, measured = measure(model, tokenizer, config)
        measured.update(recorder.exposure(int(fitted.metrics["train_steps"])))
        tracking.log_params({"reply": reply})
        measured.update({"trainable_params": lora.trainable_params(model),
                         "adapter_size_bytes": lora.log_adapter(model, tokenizer)})
        mlflow.log_metrics({**fitted.metrics, **measured})
        stage = Stage(name, repeats, child.info.run_id, reply,
                      {**fitted.metrics, "train_loss": fitted.train_loss, **measured})
        if before is not None:
            mlflow.log_metrics(compare(before, stage))
        return stage


def finished_stage(run: Run, repeats: int) -> Stage:
    """A stage an earlier attempt of the parent finished (`resume`), read back from its run."""
    return Stage(run.info.run_name, repeats, run.info.run_id, run.data.params["reply"], dict(run.data.metrics))


def trained_state(run: Run) -> dict[str, torch.Tensor]:
    """The adapter weights a finished stage logged (saved in float32, so restored exactly)."""
    with tracking.scratch_dir("stage") as scratch:
        folder = MlflowClient().download_artifacts(run.info.run_id, contract.ADAPTER_ARTIFACT, str(scratch))
        return safetensors.torch.load_file(str(Path(folder) / lora.ADAPTER_WEIGHTS))


def training_data(data: data_lib.LoadedData, config: ProbeConfig, repeats: int) -> data_lib.LoadedData:
    """The pairs a stage trains on: the train split plus `repeats` copies of the new example (for the record)."""
    if not repeats:
        return data
    return data_lib.with_train_rows(data, {config.input_column: [config.new_input] * repeats,
                                           config.output_column: [config.new_output] * repeats})


def comparison_table(before: Stage, afters: list[Stage], config: ProbeConfig) -> pd.DataFrame:
    """One row per repeats value, before and after side by side."""
    return pd.DataFrame([
        {"repeats": after.repeats, "mode": config.mode, "probe_input": config.probe_input,
         "reply_before": before.reply, "reply_after": after.reply, **compare(before, after),
         "before_run_id": before.run_id, "after_run_id": after.run_id}
        for after in afters
    ])


def dose_response_figure(table: pd.DataFrame, series: dict[str, str], ylabel: str, title: str,
                         ylim: tuple[float | None, float | None] | None = None):
    """`<metric>_after` against repeats, with `<metric>_before` as a dashed line of the same colour."""
    frame = table[["repeats"]].copy()
    for metric in series:
        frame[f"{metric}_mean"] = table[f"{metric}_after"]
    return plots.metric_vs_x(frame, "repeats", {m: f"{label} after" for m, label in series.items()}, ylabel, title,
                             baselines={m: (table[f"{m}_before"].iloc[0], f"{label} before")
                                        for m, label in series.items()}, ylim=ylim)


def target_nll_figure(table: pd.DataFrame):
    return dose_response_figure(table, {"target_nll": "NLL | probe_input", "target_nll_new_input": "NLL | new_input"},
                                "mean NLL per token of new_output", "Target NLL vs copies of the new example")


def similarity_figure(table: pd.DataFrame):
    """ROUGE-L on its whole range [0, 1], so that a change of 0.02 looks like one."""
    return dose_response_figure(table, {"rouge_l": "ROUGE-L of the reply"}, "ROUGE-L F1 vs new_output",
                                "Reply similarity vs copies of the new example", ylim=(0, 1))


def log_comparison(before: Stage, afters: list[Stage], config: ProbeConfig) -> pd.DataFrame:
    """Table, replies, the change per repeats value (metrics at step = repeats) and, for a sweep, the plots."""
    table = comparison_table(before, afters, config)
    tracking.log_table(table, contract.PROBE_COMPARISON_TABLE)
    mlflow.set_tags({f"reply_{stage.name}": stage.reply for stage in [before, *afters]})
    for after in afters:
        mlflow.log_metrics(compare(before, after), step=after.repeats)
    if len(afters) > 1:
        plots.log_figure(target_nll_figure(table), contract.TARGET_NLL_FIGURE)
        plots.log_figure(similarity_figure(table), contract.SIMILARITY_FIGURE)
    return table


def run_stages(parent: mlflow.ActiveRun, config: ProbeConfig,
               prepared: causal_lm.PreparedCausalLM) -> tuple[Stage, list[Stage]]:
    """`before`, then one `after` per repeats value, as child runs of `parent`; stages the parent already finished
    with the same config and data (`resume`) are read back instead of trained again."""
    base, tokenizer = causal_lm.load_base(prepared.source, device.training_precision(config.precision))
    tokenized = causal_lm.tokenize(prepared.data.splits, tokenizer, config)
    new_row = new_example_row(tokenizer, config)
    sweep = len(config.repeats_list) > 1
    stages = 1 + len(config.repeats_list)
    done = resume.finished_children(parent.info.run_id, resume.marks(config, prepared.data))
    with lora.adapter(base, config, config.rank, config.seed) as model:
        fresh = lora.adapter_state(model)
        if BEFORE in done:
            before = finished_stage(done[BEFORE], 0)
            trained = trained_state(done[BEFORE]) if config.mode == "continue" else fresh
        else:
            before = run_stage(model, tokenizer, tokenized, new_row, prepared, config, BEFORE, 0, fresh,
                               position=f"[1/{stages}]")
            trained = lora.adapter_state(model)
        start = trained if config.mode == "continue" else fresh
        afters = []
        for k, repeats in enumerate(config.repeats_list, start=2):
            name = contract.after_name(repeats, sweep)
            afters.append(finished_stage(done[name], repeats) if name in done else
                          run_stage(model, tokenizer, tokenized, new_row, prepared, config, name, repeats, start,
                                    before, position=f"[{k}/{stages}]"))
    return before, afters


def run(config: ProbeConfig) -> dict:
    """The whole probe inside one parent run (with `resume`: inside the earlier parent, reopened, under a run of
    its own); return the parent's id, the headline numbers and both replies."""
    kind = contract.RESUME if config.resume else contract.PROBE
    with tracking.experiment_run(kind, config.experiment, config.run_name):
        with preamble.begin(config, contract.PROBE,
                            lambda: causal_lm.prepare(config, (config.rank,), config.seed, rank_param="rank"),
                            lambda prepared: {"repeats": ",".join(map(str, config.repeats_list))}) as begun:
            parent = begun.parent
            before, afters = run_stages(parent, config, begun.prepared)
            table = log_comparison(before, afters, config)
        last = table.iloc[-1]
        notes = [*begun.notes, f"probe_input: {config.probe_input!r}   mode: {config.mode}",
                 f"  {'before':<10} {before.reply!r}"]
        notes += [f"  {a.name:<10} {a.reply!r}\n  {'':<10} target_nll {row.target_nll_before:.4f} → "
                  f"{row.target_nll_after:.4f}, rouge_l {row.rouge_l_before:.3f} → {row.rouge_l_after:.3f}, "
                  f"forgetting {row.forgetting:+.4f}" for a, row in zip(afters, table.itertuples())]
        return {
            "run_id": parent.info.run_id,
            "metrics": {name: float(last[name]) for name in ("target_nll_before", "target_nll_after",
                                                             "target_nll_drop", "rouge_l_before", "rouge_l_after",
                                                             "forgetting", "replies_differ")},
            "notes": notes,
            "ui": tracking.ui_hint(parent.info.experiment_id),
        }
