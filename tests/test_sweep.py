"""The sweep machinery on plain tables (plan, best child, verdicts), and the LoRA sweep in-process: adapters reload
exactly, a failing child leaves the others finished, bad input."""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from scipy import stats
from support.paths import entrypoint
from support.store import runs_of
from transformers import AutoModelForCausalLM

from finetune_lab import contract, held_out, lora, models, prompts, verdicts
from finetune_lab.config import LoraSweepConfig
from finetune_lab.experiments import lora_sweep, sweep

PROBE = "Hello, how are you?\n"


def test_the_plan_runs_seed_by_seed_through_every_configuration():
    planned = sweep.plan([("a", {"lr": 1}), ("b", {"lr": 2})], (7, 8))
    assert [(p.name, p.position, p.settings) for p in planned] == [
        ("a-seed7", "[1/4]", {"lr": 1}), ("b-seed7", "[2/4]", {"lr": 2}), ("a-seed8", "[3/4]", {"lr": 1}),
        ("b-seed8", "[4/4]", {"lr": 2})]
    assert lora_sweep.plan(LoraSweepConfig(methods="lora,dora", ranks=(4,), seeds=(1,)))[1].name == "dora-r4-seed1"


def children_table() -> pd.DataFrame:
    rows = [("lora", 4, 1, 2.0, "FINISHED"), ("lora", 4, 2, 2.2, "FINISHED"), ("dora", 4, 1, 1.0, "FINISHED"),
            ("dora", 4, 2, 1.1, "FINISHED"), ("dora", 4, 3, 0.1, "FAILED"), ("pissa", 4, 1, 1.05, "FINISHED")]
    return pd.DataFrame(rows, columns=["method", "rank", "seed", "eval_loss", "status"]).assign(
        run_id=lambda t: [f"run{k}" for k in range(len(t))])


def test_the_best_child_is_the_best_finished_seed_of_the_best_configuration():
    design, table = lora_sweep.DESIGN, children_table()
    summary = contract.summarise(table, design.axes, ["eval_loss"])
    assert summary.set_index("method").loc["dora", "seeds"] == 2, "the failed seed is not averaged"
    assert sweep.best_child(table, summary, design)["run_id"] == "run2", "a failed child is never best"


def test_verdicts_compare_methods_at_equal_rank_runner_up_first():
    (family,) = sweep.verdict_families(children_table(), lora_sweep.DESIGN)
    lines = family.lines()
    assert lines[0].startswith("rank 4: method=pissa vs method=dora") and lines[0].endswith(
        "single seed: training noise unmeasured): single seed and no per-example values: not conclusive")
    welch = stats.ttest_ind([2.0, 2.2], [1.0, 1.1], equal_var=False)
    assert lines[1].startswith("rank 4: method=lora vs method=dora: eval_loss 2.1 vs 1.05")
    assert f"Welch p = {welch.pvalue:.2g} over 2 and 2 seeds" in lines[1]
    # the single seed's comparison tests nothing: Holm's family is the one comparison tested
    assert family.verdicts[1].adjusted_p == pytest.approx(welch.pvalue)
    assert lines[1].endswith(": method=dora is better") and welch.pvalue < 0.05


def test_a_tie_is_reported_against_the_configuration_chosen_as_best():
    table = children_table()[lambda t: t["method"] != "dora"].assign(eval_loss=1.0)
    summary = contract.summarise(table, lora_sweep.DESIGN.axes, ["eval_loss"])
    best = sweep.best_child(table, summary, lora_sweep.DESIGN)
    lines = [line for family in sweep.verdict_families(table, lora_sweep.DESIGN, best) for line in family.lines()]
    assert all(line.split(" vs ")[1].startswith(f"method={best['method']}:") for line in lines), lines


def test_the_best_configurations_family_comes_first():
    """Methods compared at each rank: the family holding the best configuration (rank 8 here) leads, so that the
    first line (the `verdict` tag) compares the best with its runner-up."""
    rows = [("lora", 4, 1, 3.0), ("dora", 4, 1, 3.1), ("lora", 8, 1, 2.0), ("dora", 8, 1, 2.5)]
    table = pd.DataFrame(rows, columns=["method", "rank", "seed", "eval_loss"]).assign(
        status="FINISHED", run_id=lambda t: [f"run{k}" for k in range(len(t))])
    summary = contract.summarise(table, lora_sweep.DESIGN.axes, ["eval_loss"])
    best = sweep.best_child(table, summary, lora_sweep.DESIGN)
    families = sweep.verdict_families(table, lora_sweep.DESIGN, best)
    assert [f.title for f in families] == ["rank 8", "rank 4"]
    assert families[0].lines()[0].startswith("rank 8: method=dora, rank=8 vs method=lora, rank=8")


def stored_losses(per_example: np.ndarray, digest: str = "held-out") -> str:
    """A finished child run in the active experiment with these per-example losses as its record; its id."""
    with mlflow.start_run() as child:
        held_out.log_losses(held_out.losses_record(per_example, np.full(len(per_example), 4), digest))
    return child.info.run_id


def test_the_parent_logs_each_verdict_with_its_numbers_from_the_childrens_stored_records(client, tmp_path):
    """Four methods at one rank, their children's per-example held-out losses in the store: `dora` (2 seeds) best;
    `lora` (2 seeds) decided across seeds; `pissa` (1 seed) by the paired test against dora's seeds pooled; `olora`
    (1 seed, no record) by nothing. Every number of verdicts.json recomputed with scipy."""
    from support.store import download_json

    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 3.0, 40)
    mlflow.set_experiment("verdicts")
    losses = {("dora", 1): base + rng.normal(0, 0.05, 40), ("dora", 2): base + rng.normal(0, 0.05, 40),
              ("lora", 1): base + 0.3 + rng.normal(0, 0.05, 40), ("lora", 2): base + 0.28 + rng.normal(0, 0.05, 40),
              ("pissa", 1): base + 0.1 + rng.normal(0, 0.05, 40)}
    rows = [(method, 8, seed, float(values.mean()), stored_losses(values)) for (method, seed), values in losses.items()]
    rows.append(("olora", 8, 1, 2.9, ""))
    table = pd.DataFrame(rows, columns=["method", "rank", "seed", "eval_loss", "run_id"]).assign(status="FINISHED")
    summary = contract.summarise(table, lora_sweep.DESIGN.axes, ["eval_loss"])
    best = sweep.best_child(table, summary, lora_sweep.DESIGN)
    with mlflow.start_run() as parent:
        lines = sweep.log_verdicts(table, lora_sweep.DESIGN, best)
    logged = client.get_run(parent.info.run_id)
    text = Path(client.download_artifacts(parent.info.run_id, "verdicts.txt", str(tmp_path))).read_text()
    record = download_json(client, parent.info.run_id, "verdicts.json", tmp_path)
    assert text.splitlines() == lines == record["lines"] and logged.data.tags["verdict"] == lines[0]
    assert record["best_configuration"] == "method=dora" and record["objective"] == "eval_loss"
    assert record["best_shown_better"] is True and logged.data.tags["best_shown_better"] == "true"
    found = {v["configuration"]: v for v in record["verdicts"]}
    assert [v["configuration"] for v in record["verdicts"]] == ["method=pissa", "method=lora", "method=olora"]
    assert {v["family"] for v in record["verdicts"]} == {"rank 8"} and lines[0].startswith("rank 8: method=pissa vs")

    def seeds(method):
        return [float(losses[(method, seed)].mean()) for seed in (1, 2) if (method, seed) in losses]

    dora_pooled = (losses[("dora", 1)] + losses[("dora", 2)]) / 2
    welch = stats.ttest_ind(seeds("lora"), seeds("dora"), equal_var=False)
    lora = found["method=lora"]
    assert lora["decided_by"] == "seeds" and lora["seeds"]["test"] == "welch_t" and lora["seeds"]["n"] == [2, 2]
    assert lora["seeds"]["p_value"] == pytest.approx(welch.pvalue)
    assert lora["seeds"]["ci95"] == pytest.approx(list(welch.confidence_interval(0.95)))
    lora_paired = stats.ttest_rel((losses[("lora", 1)] + losses[("lora", 2)]) / 2, dora_pooled)
    assert lora["held_out"]["test"] == "paired_t" and lora["held_out"]["n"] == [40]
    assert lora["held_out"]["p_value"] == pytest.approx(lora_paired.pvalue)
    pissa = found["method=pissa"]
    pissa_paired = stats.ttest_rel(losses[("pissa", 1)], dora_pooled)
    assert pissa["seeds"] is None and pissa["decided_by"] == "held_out"
    assert pissa["held_out"]["p_value"] == pytest.approx(pissa_paired.pvalue)
    # Holm over the two comparisons a test decides (olora's decides nothing)
    low, high = sorted([welch.pvalue, pissa_paired.pvalue])
    adjusted = {p: max(2 * low, high) if p == high else 2 * low for p in (low, high)}
    assert lora["adjusted_p"] == pytest.approx(min(1, adjusted[welch.pvalue]))
    assert pissa["adjusted_p"] == pytest.approx(min(1, adjusted[pissa_paired.pvalue]))
    assert pissa["shown"] is True and pissa["winner"] == "method=dora" and pissa["correction"] == "holm"
    assert lora["seeds_needed"] == verdicts.seeds_needed(lora["difference"], float(np.sqrt(
        (np.var(seeds("lora"), ddof=1) + np.var(seeds("dora"), ddof=1)) / 2)))
    olora = found["method=olora"]
    assert olora["decided_by"] == "" and olora["held_out"] is None and olora["shown"] is False
    assert olora["conclusion"] == verdicts.NOT_CONCLUSIVE


def test_a_runner_up_not_shown_behind_tags_the_parent_best_shown_better_false(client):
    rng = np.random.default_rng(3)
    base = rng.uniform(1.0, 3.0, 30)
    mlflow.set_experiment("not-shown")
    rows = [(rank, 1, float(values.mean()), stored_losses(values))
            for rank, values in ((4, base + rng.normal(0, 0.3, 30)), (8, base + rng.normal(0, 0.3, 30)))]
    table = pd.DataFrame(rows, columns=["rank", "seed", "eval_loss", "run_id"]).assign(status="FINISHED",
                                                                                      method="lora")
    summary = contract.summarise(table, lora_sweep.DESIGN.axes, ["eval_loss"])
    with mlflow.start_run() as parent:
        (line,) = sweep.log_verdicts(table, lora_sweep.DESIGN, sweep.best_child(table, summary, lora_sweep.DESIGN))
    assert line.endswith(": no difference shown") and "held-out paired t p = " in line
    assert client.get_run(parent.info.run_id).data.tags["best_shown_better"] == "false"


def test_the_failed_children_tag_stays_short_and_points_to_the_table(client, tmp_path):
    """10,000 children stopped by a signal: the tag names the first few, the table holds them all (a tag of every
    one held 615,993 characters, cut by MLflow)."""
    from support.store import load_table

    config = LoraSweepConfig(ranks=tuple(range(1, 101)), seeds=tuple(range(100)), max_children=10_000)
    children = [sweep.ChildOutcome(spec, "", contract.NOT_RUN, error="not run: terminated by SIGTERM " + "x" * 40)
                for spec in lora_sweep.plan(config)]
    mlflow.set_experiment("tags")
    with mlflow.start_run() as parent:
        assert sweep.log_summary(children, lora_sweep.DESIGN) is None
    logged = client.get_run(parent.info.run_id)
    tag = logged.data.tags["failed_children"]
    assert len(tag) <= 1000 and tag.startswith("r1-seed0: NOT_RUN not run: terminated by SIGTERM")
    assert "and 9,995 more" in tag and tag.endswith("(every child's status and error: comparison_table.json)")
    assert logged.data.metrics["failed_children"] == 10_000
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert len(table) == 10_000 and set(table["error"]) == {children[0].error}


def tiny_sweep(**overrides) -> LoraSweepConfig:
    settings = dict(model="tiny", dataset="sample_chat", ranks=(2, 4), seeds=(3,), max_steps=4, batch_size=8,
                    max_length=48, learning_rate=1e-2, experiment="sweep-unit")
    return LoraSweepConfig(**{**settings, **overrides})


def test_logged_adapters_reload_with_the_in_memory_logits(client, monkeypatch, tmp_path):
    in_memory = {}
    original = lora.log_adapter

    def remember_logits(model, tokenizer, *args, **kwargs):
        model.eval()
        with torch.no_grad():
            in_memory[mlflow.active_run().info.run_id] = model(**tokenizer(PROBE, return_tensors="pt")).logits
        return original(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(lora, "log_adapter", remember_logits)
    result = lora_sweep.run(tiny_sweep())
    parent = client.get_run(result["run_id"])
    assert len(in_memory) == 2
    for run_id, expected in in_memory.items():
        base = AutoModelForCausalLM.from_pretrained(parent.data.params["model_path"])
        adapter_dir = client.download_artifacts(run_id, "adapter", str(tmp_path / run_id))
        reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
        tokenizer = models.load(models.ModelSource("tiny", adapter_dir, ""), AutoModelForCausalLM)[1]
        with torch.no_grad():
            logits = reloaded(**tokenizer(PROBE, return_tensors="pt")).logits
        assert torch.equal(logits, expected), "reloaded adapter must give exactly the in-memory logits"
        untouched = AutoModelForCausalLM.from_pretrained(parent.data.params["model_path"])  # from_pretrained above
        with torch.no_grad():                                                     # injected LoRA into `base`
            base_logits = untouched(**tokenizer(PROBE, return_tensors="pt")).logits
        assert not torch.allclose(logits, base_logits), "the adapter was trained, so it must change the logits"


def test_a_child_with_nan_loss_fails_alone(client, monkeypatch):
    original = lora.attach

    def poison_rank_4(base, config, rank, seed, **method):
        model = original(base, config, rank, seed, **method)
        if rank == 4:  # a diverged adapter: NaN weights give a NaN loss through the real training path
            next(p for n, p in model.named_parameters() if "lora_A" in n).data.fill_(math.nan)
        return model

    monkeypatch.setattr(lora, "attach", poison_rank_4)
    result = lora_sweep.run(tiny_sweep(ranks=(2, 4, 8)))
    runs = {r.info.run_id: r for r in runs_of(client, "sweep-unit")}
    parent = runs[result["run_id"]]
    children = {int(r.data.params["lora_r"]): r for r in runs.values() if r.info.run_id != result["run_id"]}
    assert parent.info.status == "FINISHED"
    assert children[4].info.status == "FAILED" and "NonFiniteLossError" in children[4].data.tags["error"]
    assert children[2].info.status == children[8].info.status == "FINISHED"
    assert parent.data.metrics["failed_children"] == 1 and "r4-seed3" in parent.data.tags["failed_children"]
    assert parent.data.tags["best_rank"] in {"2", "8"}


@pytest.mark.parametrize("loss_on", ["all", "output"])
def test_the_loss_covers_exactly_the_tokens_loss_on_says(client, monkeypatch, loss_on):
    """Every row the model trained on, checked against its own text: `output` masks the prompt (input + newline),
    `all` masks nothing; padding never counts."""
    seen = []
    original = lora.attach

    def record_labels(base, config, rank, seed, **method):
        model = original(base, config, rank, seed, **method)

        def hook(module, args, kwargs):
            if module.training:
                seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), kwargs["labels"].clone()))

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(lora, "attach", record_labels)
    result = lora_sweep.run(tiny_sweep(ranks=(2,), loss_on=loss_on))
    tokenizer = models.load(models.ModelSource("tiny", client.get_run(result["run_id"]).data.params["model_path"],
                                               ""), AutoModelForCausalLM)[1]
    assert len(seen) == 4  # max_steps
    rows = 0
    for input_ids, attention_mask, labels in seen:
        for ids, mask, row_labels in zip(input_ids, attention_mask, labels):
            real = ids[mask.bool()].tolist()
            user_input = tokenizer.decode(real).split("\n", 1)[0]
            prompt_len = len(tokenizer(prompts.prompt_text(tokenizer, user_input, "plain"),
                                       add_special_tokens=False)["input_ids"])
            masked = prompt_len if loss_on == "output" else 0
            expected = [prompts.IGNORE_INDEX] * masked + real[masked:]
            assert row_labels[mask.bool()].tolist() == expected
            assert (row_labels[~mask.bool()] == prompts.IGNORE_INDEX).all(), "padding must not count"
            rows += 1
    assert rows == 4 * 8


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--ranks", "4,x"], "error: ranks: must be a comma list of integers like 4,8,16, got '4,x'"),
        (["--ranks", "4,4"], "error: ranks: lists 4 more than once"),
        (["--ranks", "128"], "error: ranks: [128] exceed the model's hidden size 64"),
        (["--target-modules", "q_proj,attn_out"], "error: target_modules: attn_out not in this model; linear modules: "
                                                  "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        (["--eval-fraction", "0.7"], "error: eval_fraction: must be in (0, 0.5]"),
        (["--batch-size", "1000"], "error: batch_size: the train split has"),
        (["--output-column", "input", "--input-column", "nope"], "error: input_column: column 'nope' not in"),
        (["--seeds", "1,1"], "error: seeds: lists 1 more than once"),
        (["--loss-on", "prompt"], "error: loss_on: must be one of output, all"),
        (["--methods", "lora,qlora"], "error: methods: must be a comma list of lora, dora, rslora, pissa, olora, "
                                      "got 'lora,qlora'"),
        (["--methods", "dora,dora"], "error: methods: lists dora more than once"),
        (["--register-as", "team:chat"], "error: register_as: Invalid model name 'team:chat'. Names cannot contain"),
        (["--ranks", "16,48", "--methods", "lora,pissa,olora"],
         "error: ranks: [48] exceed 32, the smaller side of k_proj, v_proj (64 x 32), which pissa and olora decompose"),
        (["--precision", "fp16"], "error: precision: fp16 trains only on a CUDA GPU"),
    ],
)
def test_bad_sweep_input_is_one_line_before_training(client, no_weights_loaded, args, expected):
    outcome = CliRunner().invoke(entrypoint("lora_sweep").main,
                                 ["--model", "tiny", "--dataset", "sample_chat", "--experiment", "bad", *args])
    assert outcome.exit_code == 2, outcome.output
    assert expected in outcome.output


def test_pissa_and_olora_ranks_are_bounded_by_the_smallest_layer_they_target(client):
    """They factor each targeted weight at rank r, which its smaller side bounds (in the tiny model: k_proj and v_proj
    map 64 features to 32); other methods and layers take any rank up to the hidden size. Checked on the weightless
    skeleton."""
    from finetune_lab import causal_lm

    prepared = causal_lm.prepare(tiny_sweep(), (4,), 3)
    skeleton = models.skeleton(prepared.source, AutoModelForCausalLM)

    def problems(ranks, methods, target_modules="all-linear"):
        return lora.check_architecture(skeleton, tiny_sweep(target_modules=target_modules), ranks, methods=methods)

    assert problems([32, 48], ["pissa"]) == ["ranks: [48] exceed 32, the smaller side of k_proj, v_proj (64 x 32), "
                                             "which pissa decomposes into rank-r factors: choose ranks up to 32, or "
                                             "target_modules without those layers"]
    assert problems([48], ["lora", "dora", "rslora"]) == []
    assert problems([48, 64], ["pissa", "olora"], "q_proj,o_proj") == []
    assert problems([48], ["olora"], "q_proj,v_proj")[0].startswith("ranks: [48] exceed 32, the smaller side of v_proj")


def test_a_method_the_installed_peft_lacks_is_one_line(client, no_weights_loaded, monkeypatch):
    from peft.tuners.lora import LoraLayer

    monkeypatch.delattr(LoraLayer, "olora_init")
    outcome = CliRunner().invoke(entrypoint("lora_sweep").main,
                                 ["--model", "tiny", "--dataset", "sample_chat", "--methods", "lora,olora"])
    assert outcome.exit_code == 2, outcome.output
    assert "error: methods: olora not supported by the installed peft" in outcome.output


def test_empty_outputs_are_reported(client, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(f'{{"input": "question {i}", "output": "{"" if i % 2 else "fine"}"}}\n' for i in range(40)))
    outcome = CliRunner().invoke(entrypoint("lora_sweep").main,
                                 ["--model", "tiny", "--dataset", str(path), "--experiment", "bad"])
    assert outcome.exit_code == 2 and "error: output_column:" in outcome.output and "empty" in outcome.output


def test_called_in_process_the_config_is_still_validated(client):
    """Library callers skip the CLI; `run` must check the config itself rather than fail deep inside."""
    from finetune_lab.errors import InputError

    with pytest.raises(InputError, match="ranks: lists 4 more than once"):
        lora_sweep.run(tiny_sweep(ranks=(4, 4)))


@pytest.mark.slow  # trains repeatedly: a sweep of four children
def test_a_local_sweep_loads_the_tokenizer_and_the_base_once(client, monkeypatch):
    """Two children and the registration of the best, in one process: the tokenizer and the frozen base are loaded
    once. The registration checks the best adapter (as if trained elsewhere: no logits in memory) on the base the
    children trained on, which the adapters left untouched; only the registry's verification loads them again, from
    the registered model's `models:/` URI."""
    from transformers import AutoTokenizer

    loads = []

    def counted(auto_class):
        original = auto_class.from_pretrained

        def from_pretrained(cls, *args, **kwargs):
            reloading = any(frame.filename.endswith("pyfunc_models.py") for frame in traceback.extract_stack())
            loads.append((auto_class.__name__, "registry reload" if reloading else "sweep"))
            return original(*args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", classmethod(from_pretrained))

    counted(AutoTokenizer)
    counted(AutoModelForCausalLM)
    models.load_tokenizer.cache_clear()  # an earlier test of this process may have loaded the tiny tokenizer
    trained_here = lora_sweep.ChildTrainer.__call__

    def without_logits_in_memory(trainer, spec, run_id=""):
        outcome = trained_here(trainer, spec, run_id)
        outcome.reference = None
        return outcome

    monkeypatch.setattr(lora_sweep.ChildTrainer, "__call__", without_logits_in_memory)
    lora_sweep.run(tiny_sweep(register_as="loaded-once"))
    assert sorted(name for name, where in loads if where == "sweep") == ["AutoModelForCausalLM", "AutoTokenizer"]
    assert {where for _, where in loads} == {"sweep", "registry reload"}, "the registry's reload check still runs"
    version = client.get_model_version_by_alias("loaded-once", "champion")
    assert float(version.tags["reload_max_logit_diff"]) == 0.0
