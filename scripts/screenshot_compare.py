"""Regenerate the MLflow UI pictures in docs/images/ from a tiny LoRA sweep, and check the UI shows our experiments in
its Model training view.

    python scripts/screenshot_compare.py [--output-dir docs/images]

Steps: install Debian's chromium if /usr/bin/chromium is missing (apt-get, needs root); run a tiny sweep
(ranks 2,4,8 x seeds 1,2, 10 steps) into a temporary sqlite store; start `mlflow ui` on 127.0.0.1 and a free
port; open the experiment's runs page at the address the entry points print (`?workflowType=machine_learning`),
check in the rendered page that it is the Model training view (not the GenAI one the UI opens by default), and
screenshot it (`mlflow_runs.png`); screenshot the compare-runs page of the sweep's children (`mlflow_compare.png`);
stop the server. Everything but the PNGs lives in a temporary folder that is removed at the end. Offline (no
Hugging Face Hub).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from finetune_lab.tracking import ui_page

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
EXPERIMENT = "lora_sweep"
SWEEP = ["--model", "tiny", "--dataset", "sample_chat", "--ranks", "2,4,8", "--seeds", "1,2", "--max-steps", "10",
         "--experiment", EXPERIMENT, "--run-name", "tiny-sweep"]
MAX_PNG_BYTES = 500_000
# The browser reaches the server (on 127.0.0.1) under this name, mapped to 127.0.0.1 by Chromium and allowed by
# the server: the UI opens its assistant side panel by itself only when the page's host is localhost or 127.0.0.1,
# and the panel would cover a third of the screenshot.
UI_HOST = "mlflow-ui.test"
WINDOW = "1600,2000"  # tall enough for the plot, the run details, the params and the start of the metrics
RUNS_WINDOW = "1600,700"  # the runs page: the navigation, the view switch and the runs table


def ensure_chromium() -> str:
    if not Path(CHROMIUM).exists():
        print("installing chromium from the Debian packages (apt-get)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_sweep(uri: str, workdir: Path, env: dict) -> tuple[str, list[str]]:
    """The tiny sweep into `uri` (artifacts under `workdir`); return the experiment id and the child run ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(workdir / "artifacts").as_uri())
    subprocess.run([sys.executable, str(REPO / "entrypoints" / "lora_sweep.py"), *SWEEP], check=True, env=env,
                   cwd=workdir)
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    children = [r.info.run_id for r in runs if "mlflow.parentRunId" in r.data.tags]
    if not children:
        raise SystemExit("the sweep logged no child runs")
    return experiment_id, children


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer at {url} within {timeout_s:.0f} s")


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI's compare-runs route (hash router): ?runs=[ids]&experiments=[ids], JSON-encoded lists."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id]),
                                    "workflowType": "machine_learning"})
    return f"{base}/#/compare-runs?{query}"


def chromium_command(chromium: str, profile: Path, budget_ms: int, window: str) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1", f"--user-data-dir={profile}", f"--window-size={window}",
            f"--virtual-time-budget={budget_ms}"]


def screenshot(chromium: str, url: str, output: Path, profile: Path, budget_ms: int, window: str = WINDOW) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*chromium_command(chromium, profile, budget_ms, window), f"--screenshot={output}", url],
                   check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not output.is_file():
        raise SystemExit("chromium wrote no screenshot")
    shrink(output)
    print(f"wrote {output} ({output.stat().st_size // 1024} KB)", flush=True)


def rendered_text(chromium: str, url: str, profile: Path, budget_ms: int) -> str:
    """The page's text once its scripts have run (headless Chromium's DOM dump, tags removed)."""
    dom = subprocess.run([*chromium_command(chromium, profile, budget_ms, WINDOW), "--dump-dom", url], check=True,
                         timeout=180, capture_output=True, text=True).stdout
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def check_model_training_view(text: str) -> None:
    """The UI's two views differ in their navigation: Model training lists the model registry, GenAI lists
    evaluation runs and traces' observability."""
    if "Model registry" not in text or "Evaluation runs" in text:
        raise SystemExit("the runs page did not open in the MLflow UI's Model training view")


def shrink(output: Path) -> None:
    """Keep the PNG small for the repository: quantise to a 256-colour palette when it is too large."""
    if output.stat().st_size <= MAX_PNG_BYTES:
        return
    from PIL import Image

    with Image.open(output) as image:
        image.convert("RGB").quantize(colors=256).save(output, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--budget-ms", type=int, default=20000, help="Chromium's virtual time budget for the page")
    args = parser.parse_args()
    chromium = ensure_chromium()
    workdir = Path(tempfile.mkdtemp(prefix="finetune_lab_screenshot_"))
    server = None
    try:
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env.pop("MLFLOW_RUN_ID", None)
        experiment_id, children = run_sweep(uri, workdir, env)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1", "--allowed-hosts",
                                   f"127.0.0.1:{port},{UI_HOST}:{port}", "--cors-allowed-origins",
                                   f"http://{UI_HOST}:{port}"], env=env, cwd=workdir,
                                  start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_up(f"http://127.0.0.1:{port}", server)
        base, output = f"http://{UI_HOST}:{port}", args.output_dir.resolve()
        runs_url = f"{base}/{ui_page(experiment_id)}"  # the address the entry points print
        check_model_training_view(rendered_text(chromium, runs_url, workdir / "profile-dom", args.budget_ms))
        print(f"checked: {runs_url} opens the Model training view", flush=True)
        screenshot(chromium, runs_url, output / "mlflow_runs.png", workdir / "profile-runs", args.budget_ms,
                   window=RUNS_WINDOW)
        screenshot(chromium, compare_url(base, experiment_id, children), output / "mlflow_compare.png",
                   workdir / "profile-compare", args.budget_ms)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: mlflow ui and its workers
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
