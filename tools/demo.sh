#!/usr/bin/env bash
# `make demo`: DINO on a small Fashion-MNIST split for about 5 minutes on a 2-core CPU, the teacher's 20-NN top-1 on
# held-out images against the same network with its random weights, curves.png and an attention overview.
#
#     bash tools/demo.sh                                   # what make demo runs (after its setup)
#     SEED=1 DEMO_DIR=output/demo_seed1 bash tools/demo.sh  # another seed
#     PRECISION=fp32 bash tools/demo.sh                    # auto (default: bf16 where the CPU has bf16 units), bf16, fp32
#     TRAIN_PER_CLASS=4 VAL_PER_CLASS=2 EPOCHS=1 BATCH=8 bash tools/demo.sh   # the pieces, in seconds
#     KNN_STUDENT=true bash tools/demo.sh                  # the student's k-NN beside the teacher's
#     DEMO_FLAGS="--ibot_loss_weight 1 --koleo_loss_weight 0.1" bash tools/demo.sh  # more main_dino.py flags
#
# Flags (every default of main_dino.py stays the original's; the demo chooses its own): no local crops, global crops
# over 0.3-1 of the image, out_dim 256 with batch norm in the head, teacher temperature 0.02, DINOv2's Sinkhorn-Knopp
# in place of the center (with the center's EMA the teacher swung between one-hot and flat every ~100 steps, and
# where a run ended on that swing depended on the machine), teacher momentum 0.96 ending at 0.98 (an EMA over
# ~25-50 steps: at 0.99 the teacher lags the student in so short a run), a learning rate ending at half its peak, no
# frozen last layer, no stochastic depth; bf16 where the CPU has bf16 units, and the per-pixel augmentation batched
# in the training process with one decoding worker, so that workers do not take the training threads' cores.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-data/fashion_mnist_demo}
DEMO_DIR=${DEMO_DIR:-output/demo}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-200}
VAL_PER_CLASS=${VAL_PER_CLASS:-100}
EPOCHS=${EPOCHS:-7}
BATCH=${BATCH:-32}
SEED=${SEED:-0}
PRECISION=${PRECISION:-auto}
case "$PRECISION" in
    auto) precision_flags="--use_bf16 auto" ;;
    bf16) precision_flags="--use_bf16 true" ;;
    fp32) precision_flags="--use_bf16 false --use_fp16 false" ;;
    *) echo "tools/demo.sh: PRECISION=$PRECISION is not one of auto, bf16, fp32" >&2; exit 2 ;;
esac
KNN_STUDENT=${KNN_STUDENT:-false}  # true: the student's k-NN beside the teacher's (another pass per epoch)
DEMO_FLAGS=${DEMO_FLAGS:-}  # main_dino.py flags added after the demo's own, which they override

start=$(date +%s)
$PYTHON tools/prepare_fashion_mnist.py --output_dir "$DATA_DIR" --train_per_class "$TRAIN_PER_CLASS" \
    --val_per_class "$VAL_PER_CLASS"
export_s=$(( $(date +%s) - start ))

rm -f "$DEMO_DIR/checkpoint.pth" "$DEMO_DIR/log.txt"  # a fresh run, not a resumed one
start=$(date +%s)
$PYTHON main_dino.py --arch vit_tiny --patch_size 7 --global_crops_size 28 --global_crops_scale 0.3 1 \
    --local_crops_number 0 --out_dim 256 --use_bn_in_head true --teacher_temp 0.02 --warmup_teacher_temp 0.02 \
    --centering sinkhorn_knopp --momentum_teacher 0.96 --momentum_teacher_end 0.98 --freeze_last_layer 0 \
    --drop_path_rate 0 \
    --batch_size_per_gpu "$BATCH" --lr 0.002 --min_lr 0.000125 --epochs "$EPOCHS" --warmup_epochs 0.5 \
    $precision_flags --augmentation gpu --num_workers 1 --seed "$SEED" --saveckp_freq 0 \
    --data_path "$DATA_DIR/train" --knn_data_path "$DATA_DIR" --knn_freq 1 --knn_student "$KNN_STUDENT" \
    --resize_size 28 --crop_size 28 --output_dir "$DEMO_DIR" $DEMO_FLAGS
train_s=$(( $(date +%s) - start ))

$PYTHON tools/plot_logs.py "$DEMO_DIR/log.txt" --labels "vit_tiny/7 DINO demo, seed $SEED" \
    --output "$DEMO_DIR/curves.png"
image=$(find "$DATA_DIR/val" -name '*.png' | sort | sed -n 1p)  # sed reads to the end: no SIGPIPE under pipefail
$PYTHON visualize_attention.py --arch vit_tiny --patch_size 7 --pretrained_weights "$DEMO_DIR/checkpoint.pth" \
    --checkpoint_key teacher --image_path "$image" --image_size 28 --output_dir "$DEMO_DIR/attention"

echo "export ${export_s} s, training ${train_s} s (main_dino.py, k-NN monitoring included), seed ${SEED}," \
    "PRECISION=${PRECISION}${DEMO_FLAGS:+, DEMO_FLAGS=$DEMO_FLAGS}"
$PYTHON - "$DEMO_DIR/log.txt" "$DATA_DIR/val" <<'EOF'
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1])]
init = next(x for x in lines if "knn_top1_init" in x)["knn_top1_init"]
last = lines[-1]
student = f"; the student: {last['knn_student_top1']:.1f}%" if "knn_student_top1" in last else ""
print(f"trained in {last['precision']}")
print(f"20-NN top-1 on {sys.argv[2]}: random weights {init:.1f}%, after DINO {last['knn_top1']:.1f}% "
      f"({last['knn_top1'] - init:+.1f} points{student})")
EOF
echo "Demo done: checkpoint $DEMO_DIR/checkpoint.pth, log $DEMO_DIR/log.txt, curves $DEMO_DIR/curves.png," \
    "attention of $image in $DEMO_DIR/attention/overview.png"
