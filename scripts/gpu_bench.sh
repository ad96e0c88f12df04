#!/usr/bin/env bash
# The GPU measurement in one call (docs/performance.md): the card and the versions, then `bench` on each workload
# in a process of its own under a time limit of its own, every result written under $OUT as it comes. No `set -e`:
# whatever fails or runs out of time, what was measured is printed at the end.
#   usage (from the checkout): OUT=/some/folder scripts/gpu_bench.sh [extra bench options, e.g. --variants ...]
# A `.whl/` folder of wheels, if present, is installed first (for a GPU machine without a package index).
OUT=$(mkdir -p "${OUT:-bench-gpu}" && cd "${OUT:-bench-gpu}" && pwd)

step() {  # step SECONDS COMMAND...: run it under a time limit (SIGKILL 10 s after SIGTERM); record a failure
    local limit=$1 status
    shift
    timeout -k 10 "$limit" "$@"
    status=$?
    [ "$status" -eq 0 ] || echo "exit $status after at most ${limit}s: $*" >>"$OUT/failures.txt"
    return "$status"
}

if [ -d .whl ]; then
    site=/tmp/site-$$  # a fresh folder each call: reinstalling over an earlier one can hang the next import
    step 90 python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD/src" PATH="$site/bin:$PATH"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"

if step 50 python3 -c '
import platform, sys
import datasets, mlflow, peft, torch, transformers
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # the sqlite store imports
from finetune_lab import bench, device
capabilities = device.detect()
print(f"card: {capabilities.name}, compute capability {capabilities.compute_capability}, "
      f"precision {device.precision(capabilities)}")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, datasets {datasets.__version__}, "
      f"mlflow {mlflow.__version__}")
' >"$OUT/environment.txt" 2>&1; then
    # LoRA first: it does not compile. Each workload in its own process and time limit.
    step 150 python3 entrypoints/bench.py --workloads lora_sweep --output "$OUT/bench-lora_sweep.md" "$@" \
        >"$OUT/bench-lora_sweep.log" 2>&1
    step 170 python3 entrypoints/bench.py --workloads classify --output "$OUT/bench-classify.md" "$@" \
        >"$OUT/bench-classify.log" 2>&1
fi

for file in environment.txt failures.txt bench-lora_sweep.md bench-classify.md; do
    [ -f "$OUT/$file" ] && { echo "== $file"; cat "$OUT/$file"; }
done
for log in bench-lora_sweep.log bench-classify.log; do
    [ -f "$OUT/$log" ] && { echo "== end of $log"; tail -c 1500 "$OUT/$log"; }
done
exit 0
