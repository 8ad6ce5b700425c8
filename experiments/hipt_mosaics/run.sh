#!/usr/bin/env bash
# HIPT's hierarchical pretraining on a CPU, on data no one tuned to: 8 x 8 mosaics of Fashion-MNIST images labelled
# by their arrangement (shoes above shirts, or shirts above shoes; make_mosaics.py), which a bag of tiles cannot see.
#
#     TILE_WEIGHTS=output/demo/checkpoint.pth bash experiments/hipt_mosaics/run.sh       # about 20-25 min on 2 cores
#     TILE_WEIGHTS=output/demo/checkpoint.pth TRAIN_PER_CLASS=8 VAL_PER_CLASS=4 FM_TRAIN_PER_CLASS=40 \
#         FM_VAL_PER_CLASS=40 EPOCHS=1 BATCH=8 LINEAR_EPOCHS=1 OUT=/tmp/hipt_check DATA=/tmp/hipt_check_data \
#         bash experiments/hipt_mosaics/run.sh                                              # the pieces, in 2 minutes
#
# TILE_WEIGHTS is the demo's trained vit_tiny/7 (`make demo` writes output/demo/checkpoint.pth), the frozen tile
# encoder: its [CLS] features are 192-d, hence --region_in_dim 192. The steps:
#   1. Fashion-MNIST exported (tools/prepare_fashion_mnist.py), mosaics made of its training images (train/) and of
#      its test images (val/): 224 x 224 regions of 8 x 8 tiles of 28 pixels;
#   2. tools/extract_region_features.py: each mosaic's 64 tiles embedded by the tile encoder, [64, 192] per region;
#   3. main_dino.py --arch vit4k_xs on the unlabelled train/ regions. HIPT's crops of its 16 x 16 grids are 14 and
#      6 cells; an 8 x 8 grid takes 7 and 3 in the same proportions. The rest are the demo's short-CPU-run settings
#      (tools/demo.sh, chosen on Fashion-MNIST images, not on these mosaics): out_dim 256 with batch norm in the head,
#      DINOv2's Sinkhorn-Knopp, teacher temperature 0.02, teacher momentum 0.96 to 0.98, lr 0.002 to 0.000125, no
#      stochastic depth, no frozen last layer; 4 local crops rather than HIPT's 8, for twice the steps in the time;
#   4. eval_knn.py (10- and 20-NN) and eval_linear.py (the [CLS] of the last 4 blocks; whole grids, flipped
#      left-right) of the trained region model, of the same model with random weights, and of --region_pool mean,
#      the mean of the tile features (50% by construction: both classes hold the same tiles);
#   5. visualize_attention.py --arch vit4k_xs: the two-level attention of the first val/ mosaic.
# Everything lands in $OUT: pretrain/ (log.txt, checkpoint.pth), knn_*.txt, linear_*/ (log.txt), attention/ and
# summary.md, the table of the README. Commit only the small files, never checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${TILE_WEIGHTS:?give TILE_WEIGHTS, the vit_tiny/7 that make demo trains (output/demo/checkpoint.pth)}"
PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/hipt_mosaics}
OUT=${OUT:-output/hipt_mosaics}
FM_TRAIN_PER_CLASS=${FM_TRAIN_PER_CLASS:-2000}  # Fashion-MNIST images per class the train/ mosaics draw from
FM_VAL_PER_CLASS=${FM_VAL_PER_CLASS:-1000}      # the val/ mosaics: all of the test split
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-300}         # mosaics per class
VAL_PER_CLASS=${VAL_PER_CLASS:-150}
EPOCHS=${EPOCHS:-15}
BATCH=${BATCH:-32}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-10}
WORKERS=${WORKERS:-1}
SEED=${SEED:-0}
REGION=(--arch vit4k_xs --region_in_dim 192)
mkdir -p "$OUT"
stage() { echo "=== $1 ($(( $(date +%s) - start )) s so far)"; }
start=$(date +%s)

stage "1. mosaics"
rm -rf "$DATA/mosaics" "$DATA/features"  # made again: features of other mosaics must not be taken for these
$PYTHON tools/prepare_fashion_mnist.py --output_dir "$DATA/fashion_mnist" --train_per_class "$FM_TRAIN_PER_CLASS" \
    --val_per_class "$FM_VAL_PER_CLASS"
$PYTHON experiments/hipt_mosaics/make_mosaics.py --data_path "$DATA/fashion_mnist" --output_dir "$DATA/mosaics" \
    --train_per_class "$TRAIN_PER_CLASS" --val_per_class "$VAL_PER_CLASS" --seed "$SEED"

stage "2. tile features"
for split in train val; do
    $PYTHON tools/extract_region_features.py --arch vit_tiny --patch_size 7 --pretrained_weights "$TILE_WEIGHTS" \
        --checkpoint_key teacher --data_path "$DATA/mosaics/$split" --region_size 224 --tile_size 28 \
        --batch_size 256 --num_workers "$WORKERS" --output_dir "$DATA/features/$split" | tail -n 1
done

stage "3. region-level DINO"
rm -f "$OUT/pretrain/checkpoint.pth" "$OUT/pretrain/log.txt"  # a fresh run, not a resumed one
$PYTHON main_dino.py "${REGION[@]}" --global_crops_size 7 --local_crops_size 3 --local_crops_number 4 \
    --out_dim 256 --use_bn_in_head true --centering sinkhorn_knopp --teacher_temp 0.02 --warmup_teacher_temp 0.02 \
    --momentum_teacher 0.96 --momentum_teacher_end 0.98 --freeze_last_layer 0 --drop_path_rate 0 \
    --batch_size_per_gpu "$BATCH" --lr 0.002 --min_lr 0.000125 --epochs "$EPOCHS" --warmup_epochs 1 \
    --use_bf16 auto --num_workers "$WORKERS" --seed "$SEED" --saveckp_freq 0 --data_path "$DATA/features/train" \
    --knn_data_path "$DATA/features" --knn_freq 5 --output_dir "$OUT/pretrain" | grep -v "^Epoch: "
$PYTHON experiments/fashion_mnist/random_init.py "${REGION[@]}" --seed "$SEED" --output "$OUT/vit4k_xs_random.pth"

stage "4. k-NN and linear probes"
declare -A WEIGHTS=([trained]="--pretrained_weights $OUT/pretrain/checkpoint.pth"
                    [random]="--pretrained_weights $OUT/vit4k_xs_random.pth" [mean]="--region_pool mean")
for model in trained random mean; do
    # shellcheck disable=SC2086  # the flags of WEIGHTS are words
    $PYTHON eval_knn.py "${REGION[@]}" ${WEIGHTS[$model]} --data_path "$DATA/features" --nb_knn 10 20 \
        --num_workers "$WORKERS" | tee "$OUT/knn_$model.txt" | grep "NN classifier result"
    rm -f "$OUT/linear_$model/checkpoint.pth.tar" "$OUT/linear_$model/log.txt"
    # shellcheck disable=SC2086
    $PYTHON eval_linear.py "${REGION[@]}" ${WEIGHTS[$model]} --data_path "$DATA/features" --epochs "$LINEAR_EPOCHS" \
        --val_freq "$LINEAR_EPOCHS" --lr 0.05 --batch_size_per_gpu 64 --num_workers "$WORKERS" --seed "$SEED" \
        --output_dir "$OUT/linear_$model" | grep "Top-1 test accuracy"
done

stage "5. two-level attention"
image=$(find "$DATA/mosaics/val" -name '*.png' | sort | sed -n 1p)  # sed reads to the end: no SIGPIPE
$PYTHON visualize_attention.py "${REGION[@]}" --pretrained_weights "$OUT/pretrain/checkpoint.pth" \
    --tile_arch vit_tiny --tile_patch_size 7 --tile_weights "$TILE_WEIGHTS" --tile_size 28 --image_path "$image" \
    --output_dir "$OUT/attention" | tail -n 1

stage "done"
$PYTHON - "$OUT" "$image" <<'EOF' | tee "$OUT/summary.md"
import json, re, sys
out = sys.argv[1]
print(f"| region feature | 10-NN | 20-NN | linear |\n|---|---|---|---|")
names = {"trained": "vit4k_xs after DINO", "random": "vit4k_xs, random weights", "mean": "mean of the tile features"}
for model, name in names.items():
    knn = open(f"{out}/knn_{model}.txt").read()
    top1 = {k: re.search(rf"^{k}-NN classifier result: Top1: ([\d.]+)", knn, re.M).group(1) for k in (10, 20)}
    linear = [json.loads(line) for line in open(f"{out}/linear_{model}/log.txt")][-1]["test_acc1"]
    print(f"| {name} | {float(top1[10]):.1f}% | {float(top1[20]):.1f}% | {linear:.1f}% |")
log = [json.loads(line) for line in open(f"{out}/pretrain/log.txt")]
monitored = ", ".join(f"{x['knn_top1']:.1f}" for x in log if "knn_top1" in x)
print(f"\nPretraining: {len(log)} epochs, {sum(x['time'] for x in log):.0f} s of training; train_loss "
      f"{log[0]['train_loss']:.2f} -> {log[-1]['train_loss']:.2f}; the teacher's 20-NN (monitored) "
      f"{log[0]['knn_top1_init']:.1f} before, then {monitored}. Two-level attention of {sys.argv[2]}: "
      f"{out}/attention/overview.png")
EOF
echo "total $(( $(date +%s) - start )) s"
