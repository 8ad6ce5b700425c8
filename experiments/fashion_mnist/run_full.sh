#!/usr/bin/env bash
# The full Fashion-MNIST experiment, end to end with this project's scripts: export, baselines (raw pixels and random
# weights), DINO pretraining with k-NN monitoring, k-NN and linear evaluation, curves and attention overviews.
#
#     bash experiments/fashion_mnist/run_full.sh                      # the recipe meant for one GPU
#     EPOCHS=2 TRAIN_PER_CLASS=50 VAL_PER_CLASS=20 LINEAR_EPOCHS=2 BATCH=32 BF16=false WORKERS=1 \
#         OUT=/tmp/fm_check DATA=/tmp/fm_check_data bash experiments/fashion_mnist/run_full.sh   # CPU check
#
# Everything lands in $OUT: pretrain/ (log.txt, checkpoint.pth), knn_*.txt, linear/ and linear_random/ (log.txt),
# curves.png and attention/<n>/overview.png. Only the small files are meant to be committed (see the README), never
# checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA=${DATA:-data/fashion_mnist}
OUT=${OUT:-output/fashion_mnist}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-0}   # 0: all 6,000 training images per class
VAL_PER_CLASS=${VAL_PER_CLASS:-0}       # 0: all 1,000 test images per class
ARCH=${ARCH:-vit_small}
PATCH=${PATCH:-4}
EPOCHS=${EPOCHS:-100}
BATCH=${BATCH:-256}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-100}
WORKERS=${WORKERS:-10}
PYTHON=${PYTHON:-python}
EVAL_SIZE=(--resize_size 28 --crop_size 28)
mkdir -p "$OUT/attention"

$PYTHON tools/prepare_fashion_mnist.py --output_dir "$DATA" --train_per_class "$TRAIN_PER_CLASS" \
    --val_per_class "$VAL_PER_CLASS"

# baselines: raw pixels, and the same architecture with the random weights training starts from (seed 0)
$PYTHON experiments/fashion_mnist/knn_raw_pixels.py --data_path "$DATA" --nb_knn 10 20 | tee "$OUT/knn_raw_pixels.txt"
$PYTHON experiments/fashion_mnist/random_init.py --arch "$ARCH" --patch_size "$PATCH" --output "$OUT/random_init.pth"
$PYTHON eval_knn.py --arch "$ARCH" --patch_size "$PATCH" --pretrained_weights "$OUT/random_init.pth" \
    --checkpoint_key none --data_path "$DATA" "${EVAL_SIZE[@]}" --nb_knn 10 20 --batch_size_per_gpu 512 \
    --num_workers "$WORKERS" | tee "$OUT/knn_random.txt"

# DINO pretraining without labels on train/, the teacher's k-NN on val/ every 10 epochs in log.txt
$PYTHON main_dino.py --arch "$ARCH" --patch_size "$PATCH" --global_crops_size 28 --local_crops_size 12 \
    --local_crops_number 6 --out_dim 4096 --batch_size_per_gpu "$BATCH" --epochs "$EPOCHS" \
    --warmup_epochs $((EPOCHS / 10 > 0 ? EPOCHS / 10 : 1)) --lr 0.0005 --momentum_teacher 0.996 \
    --use_bf16 "${BF16:-true}" --saveckp_freq 0 --num_workers "$WORKERS" --data_path "$DATA/train" \
    --knn_data_path "$DATA" --knn_freq $((EPOCHS / 10 > 0 ? EPOCHS / 10 : 1)) "${EVAL_SIZE[@]}" \
    --output_dir "$OUT/pretrain"

$PYTHON eval_knn.py --arch "$ARCH" --patch_size "$PATCH" --pretrained_weights "$OUT/pretrain/checkpoint.pth" \
    --checkpoint_key teacher --data_path "$DATA" "${EVAL_SIZE[@]}" --nb_knn 10 20 --batch_size_per_gpu 512 \
    --num_workers "$WORKERS" | tee "$OUT/knn_dino.txt"
# linear probes of the trained teacher and of the random weights; whole 28-pixel images and flips
# (--train_crop_scale 1 1: the original's 8-100% crops leave a few pixels of such small images)
LINEAR=(--data_path "$DATA" "${EVAL_SIZE[@]}" --train_crop_scale 1 1 --lr 0.1 --num_labels 10
        --epochs "$LINEAR_EPOCHS" --batch_size_per_gpu "$BATCH" --num_workers "$WORKERS")
$PYTHON eval_linear.py --arch "$ARCH" --patch_size "$PATCH" --pretrained_weights "$OUT/pretrain/checkpoint.pth" \
    --checkpoint_key teacher "${LINEAR[@]}" --output_dir "$OUT/linear"
$PYTHON eval_linear.py --arch "$ARCH" --patch_size "$PATCH" --pretrained_weights "$OUT/random_init.pth" \
    --checkpoint_key none "${LINEAR[@]}" --output_dir "$OUT/linear_random"

$PYTHON tools/plot_logs.py "$OUT/pretrain/log.txt" --labels "$ARCH/$PATCH DINO" --output "$OUT/curves.png"
# attention of the trained teacher on the first test image of four classes
for cls in 0 1 7 9; do
    image=$(find "$DATA/val" -mindepth 2 -name '*.png' -path "*/$(ls "$DATA/val" | sed -n "$((cls + 1))p")/*" \
        | sort | head -n 1)
    $PYTHON visualize_attention.py --arch "$ARCH" --patch_size "$PATCH" \
        --pretrained_weights "$OUT/pretrain/checkpoint.pth" --checkpoint_key teacher --image_path "$image" \
        --image_size 28 --output_dir "$OUT/attention/$cls"
done
echo "Done: $OUT (knn_raw_pixels.txt, knn_random.txt, knn_dino.txt, linear/log.txt, linear_random/log.txt," \
     "curves.png, attention/)"
