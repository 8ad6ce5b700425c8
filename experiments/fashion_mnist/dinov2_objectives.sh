#!/usr/bin/env bash
# DINO against DINO + iBOT + KoLeo (DINOv2's weights, 1 and 0.1), each with Sinkhorn-Knopp and with the center, on
# the demo's split (tools/demo.sh: vit_tiny/7, 2,000 training images, 20-NN on 1,000 held-out ones) at the same
# budget, three seeds each; then the k-NN of the mean patch token beside the [CLS]'s (patch_knn.py).
#
#     bash experiments/fashion_mnist/dinov2_objectives.sh                  # 4 configurations x 3 seeds, 3 epochs each
#     CONFIGS="dino ibot" SEEDS=0 EPOCHS=7 bash experiments/fashion_mnist/dinov2_objectives.sh
#     python experiments/fashion_mnist/dinov2_objectives_table.py output/dinov2_objectives   # the table
#
# Configurations: dino (the demo: Sinkhorn-Knopp), dino_ibot_koleo, ibot (iBOT alone), koleo (KoLeo alone), and
# dino_center, dino_ibot_koleo_center with the original's center instead of Sinkhorn-Knopp.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-output/dinov2_objectives}
CONFIGS=${CONFIGS:-dino dino_ibot_koleo dino_center dino_ibot_koleo_center}
SEEDS=${SEEDS:-0 1 2}
EPOCHS=${EPOCHS:-3}
PRECISION=${PRECISION:-auto}
PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-data/fashion_mnist_demo}

flags_of() {
    case "$1" in
        dino) echo "" ;;
        dino_ibot_koleo) echo "--ibot_loss_weight 1 --koleo_loss_weight 0.1" ;;
        ibot) echo "--ibot_loss_weight 1" ;;
        koleo) echo "--koleo_loss_weight 0.1" ;;
        dino_center) echo "--centering centering" ;;
        dino_ibot_koleo_center) echo "--centering centering --ibot_loss_weight 1 --koleo_loss_weight 0.1" ;;
        *) echo "dinov2_objectives.sh: unknown configuration $1" >&2; return 2 ;;
    esac
}

for config in $CONFIGS; do
    flags=$(flags_of "$config")
    for seed in $SEEDS; do
        dir="$OUT/${config}_s${seed}"
        mkdir -p "$dir"
        DEMO_DIR="$dir" DATA_DIR="$DATA_DIR" SEED="$seed" EPOCHS="$EPOCHS" PRECISION="$PRECISION" \
            DEMO_FLAGS="$flags" PYTHON="$PYTHON" bash tools/demo.sh > "$dir/demo.txt" 2>&1
        tail -n 3 "$dir/demo.txt"
        $PYTHON experiments/fashion_mnist/patch_knn.py --arch vit_tiny --patch_size 7 \
            --pretrained_weights "$dir/checkpoint.pth" --data_path "$DATA_DIR" --resize_size 28 --crop_size 28 \
            > "$dir/patch_knn.txt" 2>&1
        tail -n 1 "$dir/patch_knn.txt"
    done
done
