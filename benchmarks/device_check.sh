#!/usr/bin/env bash
# One device check in one call: the gpu tests, the step benchmark, the data benchmark and a short Fashion-MNIST
# pretraining, in at most 8 minutes on one H100/H200, every result as JSON under OUT_DIR.
#
#     bash benchmarks/device_check.sh out/device_check                          # on a GPU machine
#     FASHION_MNIST_IDX=data/fashion-mnist-idx bash benchmarks/device_check.sh out/device_check
#     bash benchmarks/device_check.sh /tmp/device_check --small                 # CPU, a minute or two
#
# Steps, in this order, each under its own `timeout` (so one slow step cannot eat the others' time); a failed or
# timed-out step is recorded and the next one runs:
#   gpu_tests             the gpu-marked tests (pytest -m gpu), junit XML and log
#   step_eager            bench_train --stages step: ViT-S/16 and ViT-B/16, batch 64, ours and the original-style
#                         step, fp16 and bf16, compile off
#   step_compiled         the same with --compile true, ours only (COMPILE_VARIANTS="lean original" adds the
#                         original-style step): every configuration pays torch.compile's start-up again, so the 8
#                         minutes do not hold all of them; the measurements finished within the limit are kept
#   data                  bench_train --stages aug e2e on JPEGs it generates
#   fashion_mnist_export  tools/prepare_fashion_mnist.py --source $FASHION_MNIST_IDX (skipped, with the reason,
#                         when the four idx .gz files are not there: nothing is faked)
#   pretrain              main_dino.py on that export with k-NN monitoring (--knn_data_path), under 185 s
# then benchmarks/device_report.py prints the tables (report.md) to paste into the README.
#
# OUT_DIR receives exactly these files, flat (what the device tool brings back): summary.json (each step's status,
# exit code, wall and budget seconds), gpu_tests.xml, gpu_tests.log, step.jsonl, data.jsonl, pretrain_log.txt (the
# run's log.txt), steps.log (everything else the steps printed) and report.md. Scratch data (JPEGs, the export,
# the checkpoint) goes to a temporary folder that is removed at the end. The exit status is 1 when a step failed or
# timed out, 0 otherwise.
#
# --small shrinks every size so that the whole check runs on a CPU: vit_tiny, small crops, out_dim 256, batch 4,
# 1-2 iterations, a dozen generated JPEGs, 20 Fashion-MNIST training images (or, without the idx files, a generated
# 10-class ImageFolder, so the real main_dino still runs with --knn_data_path), no compilation (minutes on a CPU).
# The gpu tests still run: without CUDA they are skipped, which their junit XML shows.
#
# Environment: FASHION_MNIST_IDX (default /usr/share/datasets/fashion-mnist), PYTHON (default python3),
# FM_EPOCHS, FM_TRAIN_PER_CLASS (the pretraining's length; see the summary's s/epoch to size it), COMPILE_VARIANTS.
set -euo pipefail

usage="usage: bash benchmarks/device_check.sh OUT_DIR [--small]"
OUT_DIR="" SMALL=0
for arg in "$@"; do
    case "$arg" in
        --small) SMALL=1 ;;
        -*) echo "$usage" >&2; exit 2 ;;
        *) [ -z "$OUT_DIR" ] || { echo "$usage" >&2; exit 2; }; OUT_DIR=$arg ;;
    esac
done
[ -n "$OUT_DIR" ] || { echo "$usage" >&2; exit 2; }
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
IDX=${FASHION_MNIST_IDX:-/usr/share/datasets/fashion-mnist}
COMPILE_VARIANTS=${COMPILE_VARIANTS:-lean}
export PYTHONUNBUFFERED=1  # a step killed at its time limit still leaves what it printed
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
OUTPUTS=(summary.json gpu_tests.xml gpu_tests.log step.jsonl data.jsonl pretrain_log.txt steps.log report.md)
for f in "${OUTPUTS[@]}"; do rm -f "${OUT_DIR:?}/$f"; done
CPUS=$(nproc)
WORKERS=$(( CPUS > 11 ? 10 : (CPUS > 1 ? CPUS - 1 : 1) ))

# ============ sizes: the GPU check, or --small for a CPU ... ============
if [ "$SMALL" = 1 ]; then
    MODE=small
    BUDGET_TESTS=90 BUDGET_STEP=90 BUDGET_COMPILED=0 BUDGET_DATA=90 BUDGET_EXPORT=60 BUDGET_PRETRAIN=120
    STEP=(--arch vit_tiny --patch_size 8 --out_dim 256 --batch_size_per_gpu 4 --global_crops_size 32
          --local_crops_size 16 --local_crops_number 2 --precision fp32 bf16 --iters 1 --warmup 1)
    DATA=(--arch vit_tiny --patch_size 8 --out_dim 256 --batch_size_per_gpu 4 --global_crops_size 32
          --local_crops_size 16 --local_crops_number 2 --precision fp32 --num_images 12 --image_size 64 48
          --num_workers 1 --aug_worker_images 4 --iters 1 --warmup 1)
    FM_TRAIN_PER_CLASS=${FM_TRAIN_PER_CLASS:-2} FM_VAL_PER_CLASS=2
    PRETRAIN=(--arch vit_tiny --patch_size 7 --global_crops_size 28 --local_crops_size 14 --local_crops_number 2
              --out_dim 256 --batch_size_per_gpu 4 --epochs "${FM_EPOCHS:-1}" --warmup_epochs 0 --lr 0.0005
              --num_workers 0 --knn_freq 1 --knn_k 10 --knn_batch_size 32)
else
    MODE=full
    # 460 s in all; the time limits are upper bounds, a healthy run uses less
    BUDGET_TESTS=70 BUDGET_STEP=60 BUDGET_COMPILED=75 BUDGET_DATA=45 BUDGET_EXPORT=25 BUDGET_PRETRAIN=185
    STEP=(--arch vit_small vit_base --patch_size 16 --batch_size_per_gpu 64 --precision fp16 bf16 --iters 10
          --warmup 3)
    DATA=(--arch vit_small --patch_size 16 --batch_size_per_gpu 64 --precision fp16 --num_images 1024 --iters 10
          --warmup 3)
    # run_full.sh's recipe (vit_small/4 on the 28-pixel images, bf16, batch 256), shortened to 20 epochs of
    # 20,000 images; the k-NN bank is those 20,000, the queries the 10,000 test images
    FM_TRAIN_PER_CLASS=${FM_TRAIN_PER_CLASS:-2000} FM_VAL_PER_CLASS=1000
    PRETRAIN=(--arch vit_small --patch_size 4 --global_crops_size 28 --local_crops_size 12 --local_crops_number 6
              --out_dim 4096 --batch_size_per_gpu 256 --epochs "${FM_EPOCHS:-20}" --warmup_epochs 2 --lr 0.0005
              --momentum_teacher 0.996 --use_bf16 true --num_workers "$WORKERS" --knn_freq 5)
fi
PRETRAIN+=(--saveckp_freq 0 --resize_size 28 --crop_size 28)

# ============ recording the steps in summary.json ... ============
record() {  # record name=NAME status=STATUS [exit_code=N start=UNIX_S budget_s=N output=FILE reason=... note=...]
    "$PYTHON" - "$OUT_DIR/summary.json" "$(date +%s.%N)" "$@" <<'EOF'
import json, os, sys
path, end, *fields = sys.argv[1:]
step = dict(field.split("=", 1) for field in fields)
start = step.pop("start", "")
step = {"name": step.pop("name"), "status": step.pop("status"),
        "exit_code": int(step.pop("exit_code")) if step.get("exit_code") else step.pop("exit_code", None),
        "wall_s": round(float(end) - float(start), 1) if start else 0.0,
        "budget_s": int(step.pop("budget_s")) if step.get("budget_s") else step.pop("budget_s", None),
        **{k: v for k, v in step.items() if v}}
with open(path) as f:
    summary = json.load(f)
summary["steps"].append(step)
summary["wall_s"] = round(float(end) - summary["start_unix"], 1)
with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
os.replace(path + ".tmp", path)
EOF
}

exec 3>&1  # progress lines reach the terminal even where a step's own output is redirected
FAILED=0 STATUS=""
run_step() {  # run_step NAME BUDGET_S OUTPUT CMD...: CMD under `timeout`; its status in STATUS and summary.json
    local name=$1 budget=$2 output=$3 start rc=0
    shift 3
    echo "== $name: at most $budget s ==" >&3
    echo "== $name: $* ==" >&2
    start=$(date +%s.%N)
    timeout --kill-after=5 "$budget" "$@" || rc=$?
    case $rc in
        0) STATUS=ok ;;
        124|137) STATUS=timeout FAILED=1 ;;
        *) STATUS=failed FAILED=1 ;;
    esac
    echo "   $name: $STATUS (exit $rc)" >&3
    record name="$name" status="$STATUS" exit_code="$rc" start="$start" budget_s="$budget" output="$output" \
        note="${NOTE:-}"
}
skip_step() {  # skip_step NAME REASON
    echo "== $1: skipped: $2 ==" >&3
    STATUS=skipped
    record name="$1" status=skipped reason="$2"
}

GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
"$PYTHON" - "$OUT_DIR/summary.json" "$MODE" "$GPU" "$IDX" <<'EOF'
import datetime, json, socket, sys, time
path, mode, gpu, idx = sys.argv[1:]
summary = {"mode": mode, "started": datetime.datetime.now().isoformat(timespec="seconds"), "start_unix": time.time(),
           "host": socket.gethostname(), "gpu": gpu or None, "fashion_mnist_idx": idx, "wall_s": 0.0, "steps": []}
with open(path, "w") as f:
    json.dump(summary, f, indent=1)
EOF

# ============ 1. the gpu-marked tests ... ============
# only the files that hold gpu tests: collecting all of tests/ imports every test dependency (submitit,
# scikit-video), which a GPU image need not have, and one collection error stops pytest before any test runs
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
run_step gpu_tests "$BUDGET_TESTS" gpu_tests.xml "$PYTHON" -m pytest "${GPU_TEST_FILES[@]}" -m gpu -q \
    -p no:cacheprovider --junitxml "$OUT_DIR/gpu_tests.xml" >"$OUT_DIR/gpu_tests.log" 2>&1

# ============ 2. the training step, eager and compiled ... ============
run_step step_eager "$BUDGET_STEP" step.jsonl "$PYTHON" benchmarks/bench_train.py --stages step "${STEP[@]}" \
    --variant lean original --compile false >>"$OUT_DIR/step.jsonl" 2>>"$OUT_DIR/steps.log"
if [ "$BUDGET_COMPILED" -gt 0 ]; then
    read -r -a variants <<<"$COMPILE_VARIANTS"
    run_step step_compiled "$BUDGET_COMPILED" step.jsonl "$PYTHON" benchmarks/bench_train.py --stages step \
        "${STEP[@]}" --variant "${variants[@]}" --compile true >>"$OUT_DIR/step.jsonl" 2>>"$OUT_DIR/steps.log"
else
    skip_step step_compiled "--small: compiling costs minutes on a CPU"
fi

# ============ 3. augmentation and end to end on generated JPEGs ... ============
run_step data "$BUDGET_DATA" data.jsonl "$PYTHON" benchmarks/bench_train.py --stages aug e2e "${DATA[@]}" \
    --augmentation gpu cpu --work_dir "$WORK/bench" >>"$OUT_DIR/data.jsonl" 2>>"$OUT_DIR/steps.log"

# ============ 4. Fashion-MNIST pretraining with k-NN monitoring ... ============
FM="$WORK/fashion_mnist"
if [ -f "$IDX/train-images-idx3-ubyte.gz" ] && [ -f "$IDX/train-labels-idx1-ubyte.gz" ] \
        && [ -f "$IDX/t10k-images-idx3-ubyte.gz" ] && [ -f "$IDX/t10k-labels-idx1-ubyte.gz" ]; then
    data_note="Fashion-MNIST from $IDX, $FM_TRAIN_PER_CLASS training and $FM_VAL_PER_CLASS test images per class"
    NOTE=$data_note run_step fashion_mnist_export "$BUDGET_EXPORT" "" "$PYTHON" tools/prepare_fashion_mnist.py \
        --source "$IDX" --output_dir "$FM" --train_per_class "$FM_TRAIN_PER_CLASS" \
        --val_per_class "$FM_VAL_PER_CLASS" >>"$OUT_DIR/steps.log" 2>&1
elif [ "$SMALL" = 1 ]; then
    skip_step fashion_mnist_export "no Fashion-MNIST idx files in $IDX: --small pretrains on a generated ImageFolder"
    data_note="a generated 10-class ImageFolder (not Fashion-MNIST), 2 training and 2 test images per class"
    NOTE=$data_note run_step generate_images "$BUDGET_EXPORT" "" "$PYTHON" - "$FM" >>"$OUT_DIR/steps.log" 2>&1 <<'EOF'
import os, sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for c in range(10):  # class c: grey level 25 c plus noise, 28x28 like Fashion-MNIST
    for split in ("train", "val"):
        os.makedirs(os.path.join(sys.argv[1], split, f"class{c}"), exist_ok=True)
        for i in range(2):
            img = np.clip(25 * c + rng.integers(-20, 20, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(img).convert("RGB").save(os.path.join(sys.argv[1], split, f"class{c}", f"{i}.png"))
EOF
else
    skip_step fashion_mnist_export \
        "no Fashion-MNIST idx files in $IDX: set FASHION_MNIST_IDX to the folder of the four .gz files"
fi
if [ "$STATUS" = ok ]; then
    NOTE="main_dino.py ${PRETRAIN[*]} on $data_note" run_step pretrain "$BUDGET_PRETRAIN" pretrain_log.txt \
        "$PYTHON" main_dino.py "${PRETRAIN[@]}" --data_path "$FM/train" --knn_data_path "$FM" \
        --output_dir "$WORK/pretrain" >>"$OUT_DIR/steps.log" 2>&1
    if [ -f "$WORK/pretrain/log.txt" ]; then cp "$WORK/pretrain/log.txt" "$OUT_DIR/pretrain_log.txt"; fi
else
    skip_step pretrain "no training data: fashion_mnist_export is $STATUS"
fi

# ============ the tables ... ============
for f in "${OUTPUTS[@]}"; do  # the device tool brings back files under 16 MiB only: keep the end of a long log
    if [ -f "$OUT_DIR/$f" ] && [ "$(stat -c %s "$OUT_DIR/$f")" -gt 15000000 ]; then
        tail -c 15000000 "$OUT_DIR/$f" >"$WORK/tail" && mv "$WORK/tail" "$OUT_DIR/$f"
    fi
done
echo >&3
"$PYTHON" benchmarks/device_report.py "$OUT_DIR" --output "$OUT_DIR/report.md" || FAILED=1
exit "$FAILED"
