#!/usr/bin/env bash
# The GPU measurement in one call (docs/performance.md): the card and the versions, then `bench` in three processes
# (the LoRA sweep; `classify` compiled at batch 16; `classify` compiled at the large batch), each with the baseline
# its ratios need, under a time limit of its own derived from its size, every result written under $OUT as it comes.
# No `set -e`: whatever fails or runs out of time, what was measured is printed at the end.
#   usage: OUT=/some/folder scripts/gpu_bench.sh [extra bench options, e.g. --tiny true]   (from any folder)
#   PLAN_ONLY=1 scripts/gpu_bench.sh: print the steps and their limits, run nothing.
# An offline GPU machine needs what `make gpu-kit` prepares in the checkout: `.whl/` (installed into a fresh folder
# first) and `.gpu-cache/` (the tokenizers: FINETUNE_LAB_CACHE points there). The checkout's src/ is always used.
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
OUT=$(mkdir -p "${OUT:-bench-gpu}" && cd "${OUT:-bench-gpu}" && pwd)

# Sizes: fewer examples than bench's defaults (the ratios are what count), so that the worst case, every limit
# reached plus the kill grace, stays within BUDGET_S: a 15-minute device session holds the call twice.
LORA_EXAMPLES=256      # per rank, 4 ranks: 128 steps of 8 per variant
CLASSIFY_EXAMPLES=512  # 32 steps of 16; 8 of 64 in project_large
EVAL_EXAMPLES=256
BUDGET_S=360
GRACE_S=3              # SIGKILL this long after SIGTERM
# Estimated seconds and milliseconds per step on an H100/H200 (no GPU has timed them yet; how they were estimated:
# docs/performance.md). A step's limit is its estimate plus MARGIN_PERCENT.
START_S=20             # a bench process: imports, CUDA start-up and warm-up, data, tokenization
LORA_VARIANT_S=15      # a LoRA variant's base, evaluations, adapters and logging over its 4 ranks
CLASSIFY_VARIANT_S=10  # a classify variant's model, evaluation and logging
COMPILE_S=40           # compiling DistilBERT's training step (one graph, in a fresh inductor cache)
LORA_MS=(45 25 100)    # per step: baseline (fp32, 8 x 256 padded), project (bf16, packed), project_large (8,192 tokens)
CLASSIFY_MS=(70 14 50) # per step: baseline (fp32, 16 x 512), project (16, compiled), project_large (64, compiled)
MARGIN_PERCENT=15
INSTALL_S=35           # about 40 MB of wheels, no compilation
IMPORTS_S=30

limit() {  # limit ESTIMATE_MS: the estimate in whole seconds plus the margin
    echo $(( ($1 * (100 + MARGIN_PERCENT) / 100 + 999) / 1000 ))
}
lora_steps=$(( 4 * LORA_EXAMPLES / 8 ))
lora_large_steps=$(( 4 * ((LORA_EXAMPLES * 48 + 8191) / 8192) ))  # chat-like examples of about 48 tokens
classify_steps=$(( CLASSIFY_EXAMPLES / 16 ))
classify_baseline_ms=$(( CLASSIFY_VARIANT_S * 1000 + classify_steps * CLASSIFY_MS[0] ))
LORA_S=$(limit $(( START_S * 1000 + 3 * LORA_VARIANT_S * 1000 + lora_steps * (LORA_MS[0] + LORA_MS[1])
                   + lora_large_steps * LORA_MS[2] )))
CLASSIFY_S=$(limit $(( START_S * 1000 + classify_baseline_ms + (CLASSIFY_VARIANT_S + COMPILE_S) * 1000
                       + classify_steps * CLASSIFY_MS[1] )))
CLASSIFY_LARGE_S=$(limit $(( START_S * 1000 + classify_baseline_ms + (CLASSIFY_VARIANT_S + COMPILE_S) * 1000
                             + CLASSIFY_EXAMPLES / 64 * CLASSIFY_MS[2] )))
steps=5
worst=$(( INSTALL_S + IMPORTS_S + LORA_S + CLASSIFY_S + CLASSIFY_LARGE_S + steps * GRACE_S ))
wheels=$(ls .whl/*.whl 2>/dev/null | wc -l)
cache=""
[ -d .gpu-cache ] && cache="$root/.gpu-cache"
{
    echo "src: $root/src"
    echo "wheels: $wheels in .whl/"
    echo "FINETUNE_LAB_CACHE: ${cache:-${FINETUNE_LAB_CACHE:-unset}}"
    echo "limits: install ${INSTALL_S} s, imports ${IMPORTS_S} s, lora_sweep ${LORA_S} s, classify project" \
        "${CLASSIFY_S} s, classify project_large ${CLASSIFY_LARGE_S} s, + ${GRACE_S} s kill grace each:" \
        "at most ${worst} s of ${BUDGET_S} s"
} >"$OUT/environment.txt"
if [ "$worst" -gt "$BUDGET_S" ]; then
    echo "error: the limits exceed the budget" >&2
    cat "$OUT/environment.txt" >&2
    exit 1
fi
if [ -n "${PLAN_ONLY:-}" ]; then
    cat "$OUT/environment.txt"
    exit 0
fi

step() {  # step SECONDS COMMAND...: run it under a time limit (SIGKILL GRACE_S after SIGTERM); record a failure
    local limit=$1 status
    shift
    timeout -k "$GRACE_S" "$limit" "$@"
    status=$?
    [ "$status" -eq 0 ] || echo "exit $status after at most ${limit}s: $*" >>"$OUT/failures.txt"
    return "$status"
}

export PYTHONPATH="$root/src"
if [ "$wheels" -gt 0 ]; then
    site=/tmp/site-$$  # a fresh folder each call: reinstalling over an earlier one can hang the next import
    step "$INSTALL_S" python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PYTHONPATH" PATH="$site/bin:$PATH"
fi
[ -n "$cache" ] && export FINETUNE_LAB_CACHE="$cache"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"

bench() {  # bench SECONDS NAME BENCH-OPTIONS...: one bench process, its table in bench-NAME.md
    local limit=$1 name=$2
    shift 2
    echo "== bench-$name" >>"$OUT/bench.log"
    step "$limit" python3 entrypoints/bench.py --lora-examples "$LORA_EXAMPLES" \
        --classify-examples "$CLASSIFY_EXAMPLES" --eval-examples "$EVAL_EXAMPLES" --output "$OUT/bench-$name.md" \
        "$@" "${extra[@]}" >>"$OUT/bench.log" 2>&1
}

extra=("$@")
step "$IMPORTS_S" python3 -c '
import platform, sys
import datasets, mlflow, peft, torch, transformers
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # the sqlite store imports
from finetune_lab import device
from finetune_lab.experiments import bench
capabilities = device.detect()
print(f"card: {capabilities.name}, compute capability {capabilities.compute_capability}, "
      f"precision {device.precision(capabilities)}")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, datasets {datasets.__version__}, "
      f"mlflow {mlflow.__version__}")
' >>"$OUT/environment.txt" 2>&1
# Only when everything imported (the card is named; a slow exit past the limit does not matter). LoRA first: it
# does not compile. Each compiled classify variant in a process and a limit of its own, with the baseline its
# ratios are to.
if grep -q "^card: " "$OUT/environment.txt"; then
    bench "$LORA_S" lora_sweep --workloads lora_sweep --variants baseline,project,project_large
    bench "$CLASSIFY_S" classify-project --workloads classify --variants baseline,project
    bench "$CLASSIFY_LARGE_S" classify-project_large --workloads classify --variants baseline,project_large
fi

for file in environment.txt failures.txt bench-lora_sweep.md bench-classify-project.md \
    bench-classify-project_large.md; do
    [ -f "$OUT/$file" ] && { echo "== $file"; cat "$OUT/$file"; }
done
[ -f "$OUT/bench.log" ] && { echo "== end of bench.log"; tail -c 2500 "$OUT/bench.log"; }
exit 0
