"""Self-attention maps of a DINO or DINOv2 ViT: what the [CLS] token of the last layer looks at, head by head.

    # the paper's ViT-S/8 (300 epochs, downloaded once) on a photo that ships with scikit-image
    python visualize_attention.py --output_dir attention/
    # your photo and checkpoint, with masks that keep 60% of each head's attention mass
    python visualize_attention.py --arch vit_small --patch_size 16 --pretrained_weights output/checkpoint.pth \
        --image_path photo.jpg --image_size 480 --threshold 0.6 --output_dir attention/
    # DINOv2's ViT-S/14 with registers (downloaded once), and the PCA of its patch features
    python visualize_attention.py --arch dinov2_vits14_reg --patch_size 14 --image_size 448 --pca --output_dir pca/
    # HIPT's two-level attention of a 4096-pixel region: vit4k_xs over its 256-pixel tiles, a ViT-S/16 in each tile
    python visualize_attention.py --arch vit4k_xs --pretrained_weights vit4k_xs_dino.pth --tile_arch vit_small \
        --tile_patch_size 16 --tile_weights vit256_small_dino.pth --tile_size 256 --mean 0.5 0.5 0.5 \
        --std 0.5 0.5 0.5 --image_path region.png --output_dir hipt_attention/

Writes to --output_dir: img.png (the input as the model saw it: resized, cropped to a multiple
of the patch size), attn-head{i}.png for each head, overview.png (the input and every head side
by side) and, with --threshold t, mask_th{t}_head{i}.png (each head's mask drawn over the input).
The attention is [CLS]'s to the patches; DINOv2's registers are left out.
With --pca also pca.png (the first 3 principal components of the last layer's patch features,
each min-max scaled to a colour channel) and pca_foreground.png (the patches whose first
component is above --pca_threshold, coloured by a second PCA of these patches alone; the rest
black). The sign of each component is fixed by the rule of utils.PatchPCA: the same image and
weights give the same colours every run.

With a region arch (--arch vit4k_xs) the image is a region, not resized: it is cut into tiles of
--tile_size pixels (bottom and right remainders dropped), the tile encoder (--tile_arch,
--tile_patch_size, --tile_weights) embeds each tile, and the region model reads the grid of their
[CLS]. Written: img.png (the region), region_attn-head{j}.png (the region model's [CLS] attention
to each tile, head j, each tile a flat square), hierarchical.png (HIPT's two-level heatmap: each
tile's own [CLS] attention over its patches, averaged over the tile encoder's heads, rescaled to
sum to the region model's attention to that tile, averaged over its heads) and overview.png.
"""
import argparse
import colorsys
import os

import matplotlib.image
import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
import torchvision
from matplotlib.figure import Figure
from matplotlib.patches import Polygon
from PIL import Image
from skimage.measure import find_contours

import utils
from vision_transformer import build_model

PATCH_SIZE = 8  # --patch_size of the DINO ViTs when not given (DINOv2 archs: 14)
TILE_BATCH = 32  # tiles per forward pass of the tile encoder (a 256-pixel ViT-S/16 tile's attention is 1.6 MB)


def get_args_parser():
    parser = argparse.ArgumentParser("Visualize Self-Attention maps", add_help=False)
    utils.add_model_args(parser, patch_size=PATCH_SIZE)
    utils.add_weights_args(parser)
    parser.add_argument("--image_path", default=None, type=str,
                        help="Image to look at; by default the photo 'chelsea' (a cat) that ships with scikit-image.")
    parser.add_argument("--image_size", default=(480, 480), type=int, nargs="+", help="""Resize the image before the
        model sees it: one number sets the shorter side, two numbers are height and width. The patch grid, and with it
        the memory, grows with the square of the size: lower it if you run out of memory.""")
    parser.add_argument("--output_dir", default=".", type=str, help="Where the figures are written.")
    parser.add_argument("--threshold", default=None, type=float, help="""Also write masks that keep, for each head,
        the smallest set of patches holding this fraction of its attention mass (0.6 in the paper's figures).""")
    parser.add_argument("--pca", action="store_true", help="""Also write pca.png, the first 3 principal components
        of the last layer's patch features as RGB, and pca_foreground.png, a second PCA of the foreground alone.""")
    parser.add_argument("--pca_threshold", default=0.0, type=float, help="""With --pca: the foreground is the
        patches whose first principal component score, in standard deviations of that score, is above this; 0 keeps
        the positive scores, as DINOv2's paper. Raise it if the foreground takes background in.""")
    utils.add_normalization_args(parser)

    # the two-level attention of a region arch
    utils.add_region_args(parser)
    parser.add_argument("--tile_arch", default="vit_small", type=str, help="""With a region arch (--arch
        vit4k_xs): the tile encoder, a ViT (HIPT's: vit_small). --image_size does not apply: the region is cut into
        tiles as it is.""")
    parser.add_argument("--tile_patch_size", default=16, type=int, help="With a region arch: the tile encoder's patch "
                        "size (HIPT's: 16).")
    parser.add_argument("--tile_weights", default="", type=str, help="""With a region arch: the tile encoder's
        weights (--checkpoint_key applies); empty: HIPT's published ViT-S/16 for vit_small/16, else the published
        weights of --tile_arch.""")
    parser.add_argument("--tile_size", default=256, type=int, help="""With a region arch: side in pixels of a tile
        (HIPT's: 256), as the region files were extracted.""")
    return parser


FLAG_DOMAINS = {**utils.MODEL_FLAG_DOMAINS, **utils.NORMALIZATION_FLAG_DOMAINS, **utils.REGION_FLAG_DOMAINS,
                "image_size": utils.AT_LEAST_ONE, "threshold": utils.FRACTION, "pca_threshold": utils.FINITE,
                "tile_patch_size": utils.AT_LEAST_ONE, "tile_size": utils.AT_LEAST_ONE}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    args = utils.resolve_patch_size(args, PATCH_SIZE)
    utils.check_flag_domains(args, FLAG_DOMAINS)
    utils.check_patch_fits(args)  # a DINOv2 ViT's patch size
    if not 1 <= len(args.image_size) <= 2:
        raise utils.InputError(f"--image_size {' '.join(map(str, args.image_size))}: give one size (shorter side) "
                               f"or two (height width)")
    if utils.is_region_arch(args.arch):
        if args.threshold is not None or args.pca:
            raise utils.InputError(f"--threshold and --pca draw a ViT's patch attention and features; --arch "
                                   f"{args.arch} draws the two-level attention of a region (leave them out)")
        if args.tile_patch_size > args.tile_size:
            raise utils.InputError(f"--tile_patch_size {args.tile_patch_size} is larger than --tile_size "
                                   f"{args.tile_size}")


def load_image(image_path) -> Image.Image:
    """The image at image_path as RGB, or scikit-image's photo of a cat when no path is given (works offline)."""
    if image_path is None:
        print("No --image_path given: using the photo 'chelsea' that ships with scikit-image.")
        return Image.fromarray(skimage.data.chelsea()).convert("RGB")
    if not os.path.isfile(image_path):
        raise utils.InputError(f"--image_path {image_path}: no such file")
    try:
        with Image.open(image_path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise utils.InputError(f"--image_path {image_path}: not a readable image ({e})") from None


def main(args):
    args = utils.resolve_patch_size(args, PATCH_SIZE)  # the arch's own when not given
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if utils.is_region_arch(args.arch):
        two_level_attention(args, device)
        return

    # ============ preparing image ... ============
    img = utils.attention_transform(args.image_size, args.mean, args.std)(load_image(args.image_path))
    img = utils.crop_to_patch_multiple(img, args.patch_size)  # (3, H, W), H and W multiples of the patch size
    if min(img.shape[-2:]) == 0:
        raise utils.InputError(f"--image_size {' '.join(map(str, args.image_size))}: the image is smaller than one "
                               f"{args.patch_size}x{args.patch_size} patch")

    # ============ building network ... ============
    model = utils.build_attention_backbone(args, device)

    # ============ computing attention ... ============
    attentions = utils.cls_attention_maps(model, img[None].to(device))  # (1, heads, h, w)
    masks = utils.attention_mass_mask(attentions, args.threshold) if args.threshold is not None else None
    print(f"Image {img.shape[-2]}x{img.shape[-1]}: {attentions.shape[1]} heads on a "
          f"{attentions.shape[2]}x{attentions.shape[3]} patch grid")

    # ============ writing figures ... ============
    os.makedirs(args.output_dir, exist_ok=True)
    attentions = utils.upsample_patches(attentions, args.patch_size)[0].cpu().numpy()  # (heads, H, W)
    masks = utils.upsample_patches(masks, args.patch_size)[0].cpu().numpy() if masks is not None else None
    save_figures(img, attentions, masks, args)

    if args.pca:
        # ============ PCA of the patch features ... ============
        save_pca_figures(model, img.to(device), args)


def two_level_attention(args, device: torch.device) -> None:
    """HIPT's pictures of a region: the region model's [CLS] attention over the tiles, and the two-level heatmap."""
    # ============ preparing the region ... ============
    image = load_image(args.image_path)
    t = args.tile_size
    rows, cols = image.height // t, image.width // t
    if rows == 0 or cols == 0:
        raise utils.InputError(f"{args.image_path or 'the image'} ({image.width}x{image.height}) is smaller than one "
                               f"{t}x{t} tile (--tile_size)")
    image = image.crop((0, 0, cols * t, rows * t))  # whole tiles only
    tiles = utils.tile_image(utils.tile_transform(args.mean, args.std)(image), t)  # (rows * cols, 3, t, t)

    # ============ building networks ... ============
    tile_encoder = utils.build_tile_encoder(args.tile_arch, args.tile_patch_size, args.tile_weights,
                                            args.checkpoint_key, device)
    region_model = build_model(args.arch, region_in_dim=args.region_in_dim)
    utils.load_pretrained_weights(region_model, args.pretrained_weights, args.checkpoint_key, args.arch, None)
    region_model = region_model.eval().requires_grad_(False).to(device)

    # ============ computing attention ... ============
    features = utils.embed_tiles(tile_encoder, tiles, TILE_BATCH, device)  # (rows * cols, D)
    grid = utils.tile_features_to_grid(features, rows, cols).to(device)  # (D, rows, cols)
    region_attention = utils.cell_attention(region_model, grid)  # (heads, rows, cols)
    tile_attention = torch.cat([utils.cls_attention_maps(tile_encoder, tiles[i:i + TILE_BATCH].to(device)).mean(1)
                                for i in range(0, len(tiles), TILE_BATCH)])  # (rows * cols, h, w), heads averaged
    h, w = tile_attention.shape[-2:]
    tile_pixels = utils.upsample_patches(tile_attention[:, None], args.tile_patch_size)[:, 0]  # (n, h * p, w * p)
    # a tile side that is not a multiple of the patch size has a remainder that no patch covers: no attention there
    tile_pixels = F.pad(tile_pixels, (0, t - tile_pixels.shape[-1], 0, t - tile_pixels.shape[-2]))  # (n, t, t)
    hierarchical = utils.hierarchical_attention(region_attention.mean(0), tile_pixels)  # (rows * t, cols * t)
    print(f"Region {image.width}x{image.height}: {rows}x{cols} tiles of {t} pixels; {region_attention.shape[0]} "
          f"heads of {args.arch} over the tiles, {h}x{w} patches a tile")

    # ============ writing figures ... ============
    os.makedirs(args.output_dir, exist_ok=True)
    image.save(os.path.join(args.output_dir, "img.png"))
    region_maps = utils.upsample_patches(region_attention[None], t)[0].cpu().numpy()  # (heads, H, W)
    for j, attention in enumerate(region_maps):
        matplotlib.image.imsave(os.path.join(args.output_dir, f"region_attn-head{j}.png"), attention, format="png")
    pixels = hierarchical.cpu().numpy()  # (H, W)
    matplotlib.image.imsave(os.path.join(args.output_dir, "hierarchical.png"), pixels, format="png")
    save_two_level_overview(np.asarray(image), region_maps, pixels, os.path.join(args.output_dir, "overview.png"))
    print(f"img.png, region_attn-head{{j}}.png, hierarchical.png and overview.png saved in {args.output_dir}")


def save_two_level_overview(image: np.ndarray, region_maps: np.ndarray, hierarchical: np.ndarray, fname: str) -> None:
    """The region; the region model's attention over the tiles (heads averaged) and the two-level heatmap, each over
    the region; then each head's attention over the tiles."""
    nh = len(region_maps)
    cols = max(3, nh)
    height = 2.5 * image.shape[0] / image.shape[1]
    fig = Figure(figsize=(2.5 * cols, (height + 0.4) * 2), dpi=100)
    axes = fig.subplots(2, cols, squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("region")
    for ax, heat, title in ((axes[0, 1], region_maps.mean(0), "region attention"),
                            (axes[0, 2], hierarchical, "two-level heatmap")):
        ax.imshow(image)
        ax.imshow(heat, cmap="jet", alpha=0.5, interpolation="nearest")
        ax.set_title(title)
    for j in range(nh):
        axes[1, j].imshow(region_maps[j], interpolation="nearest")
        axes[1, j].set_title(f"region head {j}")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(fname)


def save_pca_figures(model, img: torch.Tensor, args) -> None:
    """pca.png and pca_foreground.png of the (3, H, W) image's last-layer patch features."""
    features = utils.patch_features(model, img[None])[0]  # (h, w, D)
    rgb, foreground_rgb, foreground = utils.pca_pictures(features, args.pca_threshold)
    print(f"PCA of {foreground.numel()} patch features: {int(foreground.sum())} foreground patches "
          f"(first component above {args.pca_threshold:g} standard deviations)")
    for name, colours in (("pca.png", rgb), ("pca_foreground.png", foreground_rgb)):
        fname = os.path.join(args.output_dir, name)
        save_rgb(utils.upsample_patches(colours[None], args.patch_size)[0], fname)
        print(f"{fname} saved.")


def save_rgb(rgb: torch.Tensor, fname: str) -> None:
    """(3, H, W) colours in [0, 1] as an 8-bit PNG (0..1 to 0..255, rounded)."""
    pixels = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    Image.fromarray(pixels).save(fname)


def save_figures(img: torch.Tensor, attentions: np.ndarray, masks, args) -> None:
    """img.png, attn-head{j}.png, the masks with --threshold, and overview.png."""
    img_path = os.path.join(args.output_dir, "img.png")
    torchvision.utils.save_image(torchvision.utils.make_grid(img[None], normalize=True, scale_each=True), img_path)
    print(f"{img_path} saved.")
    for j, attention in enumerate(attentions):
        fname = os.path.join(args.output_dir, f"attn-head{j}.png")
        matplotlib.image.imsave(fname=fname, arr=attention, format="png")
        print(f"{fname} saved.")

    image = np.array(Image.open(img_path).convert("RGB"))  # the masks are drawn over img.png, as saved
    if masks is not None:
        for j, mask in enumerate(masks):
            fname = os.path.join(args.output_dir, f"mask_th{args.threshold}_head{j}.png")
            save_mask_figure(image, mask, fname)
            print(f"{fname} saved.")
    fname = os.path.join(args.output_dir, "overview.png")
    save_overview(image, attentions, masks, fname)
    print(f"{fname} saved.")


def overlay_mask(image: np.ndarray, mask: np.ndarray, color, alpha: float = 0.5) -> np.ndarray:
    """Blend colour into the uint8 RGB image where mask is 1: image * (1 - alpha) + alpha * 255 * colour."""
    out = image.astype(np.float64)
    for c in range(3):
        out[:, :, c] = out[:, :, c] * (1 - alpha * mask) + alpha * mask * color[c] * 255
    return out.astype(np.uint8)


def draw_mask(ax, image: np.ndarray, mask: np.ndarray, color) -> None:
    """The image with the mask blended in and its contours drawn, on axes whose data units are pixels."""
    ax.imshow(overlay_mask(image, mask, color), interpolation="nearest")
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2))  # padding closes the contours at the borders
    padded[1:-1, 1:-1] = mask
    for verts in find_contours(padded, 0.5):
        ax.add_patch(Polygon(np.fliplr(verts) - 1, facecolor="none", edgecolor=color))  # (row, col) to (x, y)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_axis_off()


def save_mask_figure(image: np.ndarray, mask: np.ndarray, fname: str, color=(1.0, 0.0, 0.0)) -> None:
    """One head's mask over the image, as a PNG of the image's own size (one figure pixel per image pixel).

    The original drew a fixed 5x5-inch figure, stretching non-square images; its one random
    colour for one mask was always red, which we keep.
    """
    dpi = 100
    fig = Figure(figsize=(image.shape[1] / dpi, image.shape[0] / dpi), dpi=dpi, frameon=False)
    draw_mask(fig.add_axes((0, 0, 1, 1)), image, mask, color)
    fig.savefig(fname, dpi=dpi)


def head_colors(n: int) -> list:
    """n bright colours evenly spread over the hue circle."""
    return [colorsys.hsv_to_rgb(i / n, 1.0, 1.0) for i in range(n)]


def save_overview(image: np.ndarray, attentions: np.ndarray, masks, fname: str) -> None:
    """The input and every head's attention side by side; with masks, a second row: all heads' masks, then each."""
    nh = len(attentions)
    rows = 1 if masks is None else 2
    height = 2.5 * image.shape[0] / image.shape[1]
    fig = Figure(figsize=(2.5 * (nh + 1), (height + 0.4) * rows), dpi=100)
    axes = fig.subplots(rows, nh + 1, squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image")
    for j in range(nh):
        axes[0, j + 1].imshow(attentions[j], interpolation="nearest")
        axes[0, j + 1].set_title(f"head {j}")
    if masks is not None:
        colors = head_colors(nh)
        combined = image
        for j in range(nh):
            combined = overlay_mask(combined, masks[j], colors[j], alpha=0.5 / nh ** 0.5)
        axes[1, 0].imshow(combined)
        axes[1, 0].set_title("all heads")
        for j in range(nh):
            draw_mask(axes[1, j + 1], image, masks[j], colors[j])
            axes[1, j + 1].set_title(f"mask head {j}")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(fname)


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Visualize Self-Attention maps", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
