"""The report on runs made by tiny experiments in-process: numbers equal the logged metrics, verdicts follow the
seeds, the HTML is one self-contained file, and the report logs itself as a run."""

from __future__ import annotations

import base64
import html
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from scipy import stats
from support.paths import REPO, entrypoint
from support.store import children_of, create_experiment, download_json, load_table, runs_of

from finetune_lab import report
from finetune_lab.config import ClassifyConfig, ClassifySweepConfig, LoraSweepConfig, ProbeConfig, ReportConfig
from finetune_lab.experiments import classify, classify_sweep, lora_sweep, probe
from finetune_lab.report import render, sections
from finetune_lab.report.configurations import config_label
from finetune_lab.report.store import Artifacts, read_experiment

TINY_CLASSIFY = dict(model="tiny", dataset="sample", max_train_samples=64, max_eval_samples=32, max_length=32,
                     batch_size=16, seed=7, experiment="classification")
TINY_SWEEP = dict(model="tiny", dataset="sample_chat", ranks=(2, 4), max_steps=2, batch_size=8, max_length=48,
                  eval_fraction=0.05, learning_rate=1e-2, experiment="lora_sweep")
TINY_CLASSIFY_SWEEP = dict(model="tiny", learning_rates=(1e-3, 5e-3), seeds=(1, 2), max_train_samples=64,
                           max_eval_samples=32, max_length=32, batch_size=16, experiment="classify_sweep",
                           run_name="three-classes")
TINY_PROBE = dict(model="tiny", dataset="sample_chat", max_steps=2, batch_size=8, max_length=48, eval_fraction=0.05,
                  learning_rate=1e-2, max_new_tokens=4, experiment="retrain_probe")


@dataclass
class Store:
    client: MlflowClient
    root: Path
    markdown: str
    html: str
    report_run_id: str
    sweeps: dict[str, str]  # run name → parent run id
    probe_run_id: str
    classify_sweep_run_id: str


@pytest.fixture(autouse=True)
def no_leaked_experiment_id():
    """In-process runs call mlflow.set_experiment, which exports MLFLOW_EXPERIMENT_ID; a later `mlflow run
    --experiment-name` launched from this process would refuse to start with both set."""
    yield
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


# The tests on `store` are in the slow tier: it trains fifteen tiny models (six of them twice over, in sweeps).
ON_THE_STORE = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Two classification runs (one seed each), a 2-seed and a 1-seed sweep, a probe, a classifier sweep over 3
    classes (2 learning rates x 2 seeds), then the report."""
    root = tmp_path_factory.mktemp("report_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        for name in ("classification", "lora_sweep", "retrain_probe", "classify_sweep", "report"):
            create_experiment(client, name, root)
        for learning_rate in (1e-3, 5e-3):
            classify.run(ClassifyConfig(**TINY_CLASSIFY, learning_rate=learning_rate))
        sweeps = {name: lora_sweep.run(LoraSweepConfig(**TINY_SWEEP, seeds=seeds, run_name=name))["run_id"]
                  for name, seeds in (("two-seeds", (1, 2)), ("one-seed", (3,)))}
        probe_run_id = probe.run(ProbeConfig(**TINY_PROBE))["run_id"]
        three = pd.read_csv(REPO / "data" / "sample" / "sentiment.csv")
        three.loc[three.index % 3 == 0, "label"] = 2
        three.to_csv(root / "three.csv", index=False)
        classify_sweep_run_id = classify_sweep.run(ClassifySweepConfig(**TINY_CLASSIFY_SWEEP,
                                                                       dataset=str(root / "three.csv")))["run_id"]
        output = root / "out"
        result = report.write_report(ReportConfig(
            experiments="classification,lora_sweep,retrain_probe,classify_sweep,absent", output=str(output)))
        yield Store(client, root, (output / "report.md").read_text(), (output / "report.html").read_text(),
                    result["run_id"], sweeps, probe_run_id, classify_sweep_run_id)


def md_tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table as (header, rows) of stripped cells, as a renderer shows them (entities decoded)."""
    tables, lines = [], markdown.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("| ") and lines[i + 1].startswith("|---"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                rows.append([html.unescape(c.strip()) for c in row[2:-2].split(" | ")])
            tables.append(([html.unescape(c.strip()) for c in line[2:-2].split(" | ")], rows))
    return tables


def section(markdown: str, heading: str) -> str:
    """The text from `heading` to the next heading of any level."""
    start = markdown.index(heading)
    following = re.search(r"^#", markdown[start + len(heading):], flags=re.M)
    return markdown[start: start + len(heading) + (following.start() if following else len(markdown))]


@ON_THE_STORE
def test_every_number_in_the_run_tables_equals_the_logged_value(store):
    runs = {r.info.run_id[:8]: r for name in ("classification", "lora_sweep", "retrain_probe", "classify_sweep")
            for r in runs_of(store.client, name)}
    seen, metrics_checked = set(), 0
    for header, rows in md_tables(store.markdown):
        if "run id" not in header:
            continue
        for row in rows:
            cells = dict(zip(header, row))
            run = runs[cells["run id"]]
            seen.add(run.info.run_id)
            assert cells["status"] == run.info.status
            for column, cell in cells.items():
                if column.endswith(" (param)"):  # a param named like a metric shown (`precision`)
                    assert cell == run.data.params[column.removesuffix(" (param)")], column
                elif column in run.data.metrics:
                    assert float(cell) == pytest.approx(run.data.metrics[column], rel=1e-5, abs=1e-12), column
                    metrics_checked += 1
                elif column in run.data.params:
                    assert cell == run.data.params[column], column
    # a single probe and a single classifier sweep: no overview table of their parents
    single = {store.probe_run_id, store.classify_sweep_run_id}
    assert seen == {r.info.run_id for r in runs.values()} - single, "every run, parents of several sweeps too"
    assert metrics_checked >= 2 * 8 + 6 * 7 + 2 * 8 + 4 * 8, metrics_checked
    classification = section(store.markdown, "### Classification runs (2)")
    header = md_tables(classification)[0][0]
    assert {"learning_rate", "accuracy", "f1", "roc_auc", "eval_loss", "peak_rss_mb", "train_runtime_s"} <= set(header)
    assert "seed" not in header, "only params that differ between the runs are shown"


@ON_THE_STORE
def test_rank_summary_cells_are_the_logged_mean_and_std(store, tmp_path):
    text = section(store.markdown, f"### LoRA rank sweep two-seeds ({store.sweeps['two-seeds'][:8]})")
    summary = load_table(store.client, store.sweeps["two-seeds"], "rank_summary.json", tmp_path).set_index("rank")
    header, rows = next((h, r) for h, r in md_tables(text) if h[0] == "rank")
    assert {"eval_loss", "train_loss", "peak_rss_mb"} <= set(header) and "peak_cuda_mem_allocated_mb" not in header
    for row in rows:
        cells = dict(zip(header, row))
        rank = int(cells["rank"])
        assert int(cells["seeds"]) == summary.loc[rank, "seeds"] == 2
        for metric in ("eval_loss", "train_loss"):
            mean, std = (float(x) for x in cells[metric].split(" ± "))
            assert mean == pytest.approx(summary.loc[rank, f"{metric}_mean"], rel=1e-5)
            assert std == pytest.approx(summary.loc[rank, f"{metric}_std"], rel=1e-5)
    # Figure files are named after their figure and sweep.
    for figure in ("loss_vs_rank", "memory_vs_rank"):
        assert f"(report_images/{figure}-two-seeds.png)" in text
    assert "4 child runs, status FINISHED" in text


@ON_THE_STORE
def test_classifier_sweep_summary_cells_are_the_logged_mean_and_std_and_name_the_best(store, tmp_path):
    parent = store.client.get_run(store.classify_sweep_run_id)
    text = html.unescape(section(store.markdown, f"### Classifier sweep three-classes ({parent.info.run_id[:8]})"))
    assert (f"best configuration (highest mean accuracy over its seeds): learning_rate="
            f"{float(parent.data.tags['best_learning_rate']):g}, epochs={float(parent.data.tags['best_epochs']):g}, "
            f"mean accuracy {parent.data.metrics['best_configuration_accuracy_mean']:.6g}; its best child "
            f"{parent.data.tags['best_run_id'][:8]}, accuracy {parent.data.metrics['best_accuracy']:.6g}") in text
    summary = load_table(store.client, parent.info.run_id, "configuration_summary.json", tmp_path)
    header, rows = next((h, r) for h, r in md_tables(text) if h[:3] == ["learning_rate", "epochs", "seeds"])
    assert {"accuracy", "precision", "recall", "f1", "roc_auc", "eval_loss"} <= set(header) and len(rows) == 2
    for row, logged in zip(rows, summary.to_dict("records")):
        cells = dict(zip(header, row))
        assert float(cells["learning_rate"]) == logged["learning_rate"] and int(cells["seeds"]) == logged["seeds"] == 2
        for metric in header[3:]:
            mean, std = (float(x) for x in cells[metric].split(" ± "))
            assert mean == pytest.approx(logged[f"{metric}_mean"], rel=1e-5)
            assert std == pytest.approx(logged[f"{metric}_std"], rel=1e-5, abs=1e-12)
    assert "(report_images/metrics_by_configuration-three-classes.png)" in text


@ON_THE_STORE
def test_a_classifier_sweep_without_its_summary_artifact_gets_the_same_summary_from_its_children(store, tmp_path):
    parent = store.client.get_run(store.classify_sweep_run_id)
    children = children_of(runs_of(store.client, "classify_sweep"), parent.info.run_id)

    class NoArtifacts:
        def table(self, run, path):
            return None

    computed = sections.configuration_summary(parent, children, NoArtifacts())
    logged = load_table(store.client, parent.info.run_id, "configuration_summary.json", tmp_path)
    for column in logged.columns:
        assert computed[column].to_numpy() == pytest.approx(logged[column].to_numpy(), rel=1e-6), column


@ON_THE_STORE
def test_a_sweep_of_one_child_says_1_child_run(store, tmp_path):
    parent = store.client.get_run(store.sweeps["one-seed"])
    (child, *_) = children_of(runs_of(store.client, "lora_sweep"), parent.info.run_id)
    blocks = sections.sweep_section(parent, [child], Artifacts(store.client, tmp_path))
    assert blocks[1].text.startswith("1 child run, status FINISHED")


def test_sweeps_refused_before_any_child_ran_are_shown_refused_with_their_error_and_count_no_verdict(client,
                                                                                                      tmp_path):
    from finetune_lab.config import ClassifySweepConfig
    from finetune_lab.errors import InputError
    from finetune_lab.experiments import classify_sweep

    for name in ("classify_sweep", "lora_sweep", "report"):
        create_experiment(client, name, tmp_path)
    with pytest.raises(InputError):
        classify_sweep.run(ClassifySweepConfig(model="tiny", dataset="sample", learning_rates=(-1.0,),
                                               run_name="refused-clf"))
    with pytest.raises(InputError):
        lora_sweep.run(LoraSweepConfig(**{**TINY_SWEEP, "ranks": (4, 4), "run_name": "refused-lora"}))
    result = report.write_report(ReportConfig(experiments="classify_sweep,lora_sweep", output=str(tmp_path / "out")))
    markdown = html.unescape((tmp_path / "out" / "report.md").read_text())
    assert "Refused before any child ran: InputError: learning_rates: must be numbers > 0, got -1.0" in section(
        markdown, "### Classifier sweep refused-clf")
    assert "Refused before any child ran: InputError: ranks: lists 4 more than once" in section(
        markdown, "### LoRA rank sweep refused-lora")
    assert not md_tables(markdown) and "**verdict**" not in markdown and "Classification runs" not in markdown
    assert result["metrics"]["verdicts"] == 0


def test_what_configures_nothing_is_not_a_differing_param(client):
    """Registering or not, and the settings of a registered model that earlier versions logged as params, do not
    make two runs different configurations."""
    experiment = client.create_experiment("not-config")
    runs = []
    for learning_rate, extra in (("1e-3", {"register_as": ""}),
                                 ("5e-3", {"register_as": "sentiment", "base_path": "/home/someone/.cache/x"})):
        run_id = client.create_run(experiment).info.run_id
        for key, value in {"learning_rate": learning_rate, **extra}.items():
            client.log_param(run_id, key, value)
        client.set_terminated(run_id)
        runs.append(client.get_run(run_id))
    (table,) = sections.run_table(runs, [])
    assert "learning_rate" in table.columns and not {"register_as", "base_path"} & set(table.columns)
    assert config_label(runs)(runs[1]) == "learning_rate=5e-3"


def test_resume_attempts_and_bench_runs_have_sections_of_their_own(client, tmp_path):
    """A resume invocation names the parent it resumed; a bench run shows its ratios (not the baseline's 1s);
    neither lands under "Other runs"."""
    from finetune_lab import contract

    experiment = create_experiment(client, "mixed", tmp_path)

    def top_run(name, kind, tags=(), metrics=()):
        run_id = client.create_run(experiment, run_name=name, tags={contract.KIND_TAG: kind, **dict(tags)}).info.run_id
        for key, value in dict(metrics).items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id)
        return run_id

    parent = top_run("the-sweep", contract.LORA_SWEEP)
    top_run("again", contract.RESUME, {contract.RESUMED_TAG: parent})
    top_run("speed", contract.BENCH, metrics={"classify/project/bench_tokens_per_s_ratio": 2.5,
                                             "classify/baseline/bench_tokens_per_s_ratio": 1.0})
    found = read_experiment(client, "mixed", skip_run_id="")
    markdown = render.to_markdown(sections.experiment_section(found, Artifacts(client, tmp_path)), tmp_path)
    assert "Other runs" not in markdown
    resumes = section(markdown, "### Resume attempts (1)")
    assert md_tables(resumes)[0][1][0][3] == f"the-sweep ({parent[:8]})"
    header, rows = md_tables(section(markdown, "### Bench runs (1)"))[0]
    assert header[-1] == "classify/project/bench_tokens_per_s_ratio" and rows[0][-1] == "2.5"
    assert not any("baseline" in column for column in header)


@ON_THE_STORE
def test_a_sweep_without_its_summary_artifact_gets_the_same_summary_from_its_children(store, tmp_path):
    parent = store.client.get_run(store.sweeps["two-seeds"])
    children = children_of(runs_of(store.client, "lora_sweep"), parent.info.run_id)

    class NoArtifacts:
        def table(self, run, path):
            return None

    computed = sections.rank_summary(parent, children, NoArtifacts()).set_index("rank")
    logged = load_table(store.client, parent.info.run_id, "rank_summary.json", tmp_path).set_index("rank")
    for column in ("seeds", "eval_loss_mean", "eval_loss_std", "train_loss_mean", "peak_rss_mb_mean"):
        assert computed[column].to_numpy() == pytest.approx(logged[column].to_numpy(), rel=1e-6), column
    assert computed["peak_cuda_mem_allocated_mb_mean"].isna().all()


def verdict_lines(text: str) -> list[str]:
    return [html.unescape(line.removeprefix("- **verdict** ")) for line in text.splitlines()
            if line.startswith("- **verdict**")]


@ON_THE_STORE
def test_verdicts_are_the_lines_the_sweeps_parents_logged(store, tmp_path):
    for name, run_id in store.sweeps.items():
        shown = verdict_lines(section(store.markdown, f"### LoRA rank sweep {name} ({run_id[:8]})"))
        assert shown == download_json(store.client, run_id, "verdicts.json", tmp_path / name)["lines"], name
    (single,) = verdict_lines(section(store.markdown, f"### LoRA rank sweep one-seed ({store.sweeps['one-seed'][:8]})"))
    assert "single seed: training noise unmeasured; held-out paired t p = " in single and "over 19 examples" in single

    # the 2-seed verdict's Welch test, recomputed from the children's own metrics
    children = [r for r in runs_of(store.client, "lora_sweep")
                if r.data.tags.get("mlflow.parentRunId") == store.sweeps["two-seeds"]]
    losses = {rank: [c.data.metrics["eval_loss"] for c in children if c.data.params["lora_r"] == rank]
              for rank in ("2", "4")}
    best, other = sorted(losses, key=lambda r: statistics.fmean(losses[r]))
    welch = stats.ttest_ind(losses[other], losses[best], equal_var=False)
    two_seeds = section(store.markdown, f"### LoRA rank sweep two-seeds ({store.sweeps['two-seeds'][:8]})")
    (double,) = verdict_lines(two_seeds)
    assert double.startswith(f"rank={other} vs rank={best}: eval_loss")
    assert f"Welch p = {welch.pvalue:.2g} over 2 and 2 seeds; held-out paired t p = " in double
    assert double.endswith(f"rank={best} is better" if welch.pvalue < 0.05 else "no difference shown")

    classify_sweep = section(store.markdown, f"### Classifier sweep three-classes ({store.classify_sweep_run_id[:8]})")
    assert verdict_lines(classify_sweep) == download_json(store.client, store.classify_sweep_run_id, "verdicts.json",
                                                          tmp_path / "classify_sweep")["lines"]


@ON_THE_STORE
def test_independent_classification_runs_are_compared_by_mcnemar_on_their_predictions(store, tmp_path):
    """Two runs of one seed each on the same held-out split: McNemar's test on the examples each got right,
    recomputed from their predictions tables."""
    (line,) = verdict_lines(section(store.markdown, "### Classification runs (2)"))
    runs = {r.data.params["learning_rate"]: r for r in runs_of(store.client, "classification")}
    right = {rate: (lambda t: t["label"] == t["prediction"])(
        load_table(store.client, run.info.run_id, "predictions.json", tmp_path / rate)) for rate, run in runs.items()}
    best, other = sorted(runs, key=lambda rate: -runs[rate].data.metrics["accuracy"])
    only_other, only_best = int((right[other] & ~right[best]).sum()), int((~right[other] & right[best]).sum())
    expected = stats.binomtest(only_other, only_other + only_best, 0.5).pvalue if only_other + only_best else 1.0
    assert line.startswith(f"learning_rate={other} vs learning_rate={best}: accuracy")
    assert f"single seed: training noise unmeasured; held-out McNemar p = {expected:.2g} over 32 examples" in line


@ON_THE_STORE
def test_probe_before_after_table_and_verdict(store, tmp_path):
    text = section(store.markdown, "### Retraining probe ")
    comparison = load_table(store.client, store.probe_run_id, "probe_comparison.json", tmp_path)
    header, rows = next((h, r) for h, r in md_tables(text) if h[0] == "measure")
    assert header == ["measure", "before", f"after (repeats={comparison['repeats'][0]})"]
    cells = {row[0]: row[1:] for row in rows}
    assert cells["reply"] == [comparison["reply_before"][0], comparison["reply_after"][0]]
    for measure in ("target_nll", "rouge_l", "eval_loss"):
        before, after = (float(x) for x in cells[measure])
        assert before == pytest.approx(comparison[f"{measure}_before"][0], rel=1e-5)
        assert after == pytest.approx(comparison[f"{measure}_after"][0], rel=1e-5)
    for change in ("target_nll_drop", "forgetting", "replies_differ"):
        assert cells[change][0] == "" and float(cells[change][1]) == pytest.approx(comparison[change][0], rel=1e-5)
    nll, forgetting = verdict_lines(text)
    assert nll.startswith("after vs before: target_nll") and nll.endswith(
        "single seed: training noise unmeasured): single seed and no per-example values: not conclusive")
    # forgetting: the held-out loss after against before, paired example by example
    stages = {r.info.run_name: download_json(store.client, r.info.run_id, "held_out_losses.json",
                                             tmp_path / r.info.run_name)
              for r in children_of(runs_of(store.client, "retrain_probe"))}
    paired = stats.ttest_rel(*(np.array(stages[name]["loss"], dtype=float) for name in ("after", "before")))
    assert forgetting.startswith("after vs before: eval_loss")
    assert f"held-out paired t p = {paired.pvalue:.2g}" in forgetting and "over 19 examples" in forgetting


@ON_THE_STORE
def test_html_is_one_file_with_embedded_images(store):
    sources = re.findall(r'src="([^"]*)"', store.html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for s in sources)
    assert "<link" not in store.html and "<script" not in store.html and "href=" not in store.html
    # 2 confusion matrices + loss and memory vs rank for each of the 2 sweeps + the classifier sweep's figure of its
    # metrics and its 4 children's confusion matrices, as in the markdown
    assert len(sources) == len(re.findall(r"!\[[^]]*\]\(report_images/", store.markdown)) == 11
    assert store.html.count('class="verdict"') == store.markdown.count("- **verdict**") == 6


@ON_THE_STORE
def test_wide_tables_and_figures_fit_the_page(store):
    """Tables scroll sideways inside the page instead of overflowing it; figures shrink to its width."""
    assert store.html.count("<table>") == store.html.count('<div class="wide"><table>') > 0
    style = re.search(r"<style>(.*)</style>", store.html, flags=re.S).group(1)
    assert ".wide { overflow-x: auto; }" in style and "img { max-width: 100%; height: auto; }" in style


@ON_THE_STORE
def test_the_report_is_logged_as_its_own_run(store, tmp_path):
    run = store.client.get_run(store.report_run_id)
    assert run.info.status == "FINISHED"
    assert store.client.get_experiment(run.info.experiment_id).name == "report"
    assert run.data.metrics["experiments_found"] == 4 and run.data.metrics["experiments_missing"] == 1
    artifacts = {a.path for a in store.client.list_artifacts(store.report_run_id)}
    assert {"report.md", "report.html", "report_images"} <= artifacts
    logged = store.client.download_artifacts(store.report_run_id, "report.md", str(tmp_path))
    assert Path(logged).read_text() == store.markdown
    assert len(store.client.list_artifacts(store.report_run_id, "report_images")) == 11
    assert "## Experiment `absent`\n\nNot found in the tracking store." in store.markdown


def test_bad_report_input_is_reported_before_reading_runs(client):
    outcome = CliRunner().invoke(entrypoint("report").main, ["--experiments", " , ", "--output", ""])
    assert outcome.exit_code == 2, outcome.output
    assert "error: experiments: must name at least one experiment" in outcome.output
    assert "error: output: must not be empty" in outcome.output
    (run,) = runs_of(client, "report")
    assert run.info.status == "FAILED" and "experiments" in run.data.tags["error"]


def test_markdown_shows_run_names_and_chat_text_as_text_never_as_html(tmp_path):
    """Run names, replies and errors come from users and models: in report.md they must not become HTML."""
    hostile = "<script>alert('x')</script> & <img src=x onerror=y>"
    blocks = [render.Heading(3, f"LoRA rank sweep {hostile} (1234abcd)"),
              render.Text(f"status FINISHED; probe_input {hostile!r}; see `rank_summary.json`"),
              render.Bullets([f"{hostile} vs r8: eval_loss"]),
              render.Table(["run", "reply"], [[hostile, "a | b"]])]
    markdown = render.to_markdown(blocks, tmp_path)
    assert "<script" not in markdown and "<img" not in markdown
    assert markdown.count("&lt;script&gt;alert('x')&lt;/script&gt; &amp; &lt;img src=x onerror=y&gt;") == 4
    assert "see `rank_summary.json`" in markdown, "code spans stay code spans"
    header, rows = md_tables(markdown)[0]
    assert rows == [[hostile, "a \\| b"]]


def test_a_param_named_like_a_metric_is_headed_as_a_param():
    """`precision` is both a classifier's metric and the compute precision a run was asked for: side by side, the
    param's column says it is one."""
    from mlflow.entities import Metric, Param, Run, RunData, RunInfo

    def run(run_id: str, asked: str, measured: float) -> Run:
        info = RunInfo(run_id=run_id, experiment_id="1", user_id="", status="FINISHED", start_time=0, end_time=1,
                       lifecycle_stage="active", run_name=run_id)
        return Run(info, RunData(metrics=[Metric("precision", measured, 0, 0)],
                                 params=[Param("precision", asked), Param("seed", "1")]))

    (table,) = sections.run_table([run("a" * 32, "bf16", 0.5), run("b" * 32, "fp32", 0.75)], ["precision"])
    assert table.columns == ["run", "run id", "status", "precision (param)", "precision"]
    assert [row[3:] for row in table.rows] == [["bf16", "0.5"], ["fp32", "0.75"]]
