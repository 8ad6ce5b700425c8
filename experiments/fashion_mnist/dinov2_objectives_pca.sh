# PCA pictures of the patch features of dinov2_objectives.sh's teachers, side by side: 16 held-out demo images (two
# of each of 8 classes) at the size they trained at (28 pixels: 4x4 patches of 7), each through each run's teacher;
# one PCA per teacher over the 256 patch tokens of the 16 images (last layer, normed), its first three components
# min-max scaled to RGB, the images laid out as a 4x4 mosaic beside the pixels. Writes $OUT/pca_side_by_side.png.
#
#     bash experiments/fashion_mnist/dinov2_objectives_pca.sh          # after dinov2_objectives.sh
#     RUNS="dino_s0 dino_ibot_koleo_s0" OUT=output/dinov2_objectives bash experiments/fashion_mnist/dinov2_objectives_pca.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-output/dinov2_objectives}
RUNS=${RUNS:-dino_s0 dino_ibot_koleo_s0}
PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-data/fashion_mnist_demo}

$PYTHON - "$DATA_DIR/val" "$OUT" $RUNS <<'EOF'
import os, sys
import numpy as np
import torch
from PIL import Image
sys.path.insert(0, os.getcwd())
import utils
from vision_transformer import build_model

val, out, *runs = sys.argv[1:]
classes = sorted(os.listdir(val))[:8]
files = [os.path.join(val, c, f) for c in classes for f in sorted(os.listdir(os.path.join(val, c)))[:2]]
to_input = utils.eval_transform(28, 28)  # what the k-NN and patch_knn.py feed the teachers: 28 px, ImageNet norm
pixels = [Image.open(path).convert("RGB") for path in files]
batch = torch.stack([to_input(im) for im in pixels])
panels = [np.concatenate([np.concatenate([np.asarray(im) for im in pixels[r * 4:(r + 1) * 4]], 1)
                          for r in range(4)], 0)]
for run in runs:
    model = build_model("vit_tiny", patch_size=7)
    utils.load_pretrained_weights(model, os.path.join(out, run, "checkpoint.pth"), "teacher", "vit_tiny", 7,
                                  fit_options=True)
    with torch.inference_mode():
        tokens = model.eval().forward_features(batch)["x_norm_patchtokens"]  # (16, 16, D)
    flat = tokens.reshape(-1, tokens.shape[-1]).double()
    flat = flat - flat.mean(0)
    _, singular, v = torch.linalg.svd(flat, full_matrices=False)
    comps = flat @ v[:3].T
    comps = (comps - comps.min(0).values) / (comps.max(0).values - comps.min(0).values)
    rgb = (comps.reshape(4, 4, 4, 4, 3) * 255).round().byte().numpy()  # (image row, image col, patch row, patch col)
    grid = rgb.transpose(0, 2, 1, 3, 4).reshape(16, 16, 3).repeat(7, 0).repeat(7, 1)
    panels.append(grid)
    print(f"{run}: first 3 components explain "
          f"{100 * (singular[:3] ** 2).sum() / (singular ** 2).sum():.1f}% of the patch tokens' variance")
gap = np.full((112, 8, 3), 255, np.uint8)
row = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], 1)
Image.fromarray(row).resize((row.shape[1] * 2, row.shape[0] * 2), Image.NEAREST).save(
    os.path.join(out, "pca_side_by_side.png"))
print(f"{os.path.join(out, 'pca_side_by_side.png')}: the pixels, then {', '.join(runs)}; classes {', '.join(classes)}")
EOF
