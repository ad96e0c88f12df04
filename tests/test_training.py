import math
import time
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from finetune_lab import training


def test_peak_memory_sees_an_allocation_inside_the_block():
    with training.PeakMemory(interval_s=0.01) as baseline:
        pass
    with training.PeakMemory(interval_s=0.01) as memory:
        block = np.ones(200 * 2**20 // 8)  # 200 MB, every page written so it is resident
        time.sleep(0.2)  # let the sampler see it
        del block
    assert memory.metrics["peak_rss_mb"] > baseline.metrics["peak_rss_mb"] + 150


def test_step_logger_records_loss_and_stops_on_nan(tracking_uri, client):
    logger = training.MlflowStepLogger()
    mlflow.set_experiment("steps")
    with mlflow.start_run() as run:
        logger.on_log(None, SimpleNamespace(global_step=3), None, logs={"loss": 0.5, "learning_rate": 1e-4})
        with pytest.raises(training.NonFiniteLossError, match="step 4"):
            logger.on_log(None, SimpleNamespace(global_step=4), None, logs={"loss": math.nan})
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
