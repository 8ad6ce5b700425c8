"""Cut region images into tiles, embed every tile with a frozen patch-level backbone, and write HIPT's region files.

    # HIPT's recipe: 4096-pixel regions, 256-pixel tiles, its ViT-S/16 tile encoder and its 0.5 normalisation
    python tools/extract_region_features.py --arch vit_small --patch_size 16 \\
        --pretrained_weights vit256_small_dino.pth --checkpoint_key teacher --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 \\
        --data_path /path/to/regions --region_size 4096 --tile_size 256 --output_dir /path/to/region_features
    # the demo's vit_tiny/7 on mosaics of 8 x 8 Fashion-MNIST images
    python tools/extract_region_features.py --arch vit_tiny --patch_size 7 \\
        --pretrained_weights output/demo/checkpoint.pth --checkpoint_key teacher --data_path data/mosaics/train \\
        --region_size 224 --tile_size 28 --output_dir features/train

Each image of --data_path (class subfolders, or an uncompressed tar indexed by tools/infer_entries.py) is cut into its
whole regions of --region_size pixels. An image of exactly one region gives OUT/<class>/<stem>.pt; a larger one gives
OUT/<class>/<stem>_<row>_<col>.pt for each whole region, row and col its place in the image's grid of regions. What the
image's bottom or right edge cuts short is skipped and counted in the summary line. A region is cut row by row into
tiles of --tile_size pixels, normalised by --mean and --std (ImageNet's by default) and embedded --batch_size tiles at a
time by the backbone (any --arch of this project: DINO's and DINOv2's ViTs, torchvision's convnets), on the GPU when
there is one. The region's file holds the tiles' features, a float tensor [n_tiles, D] with tile (r, c) at row
r * cols + c: HIPT's format, which `torch.load(weights_only=True)` reads. Files are written whole (a temporary file,
then renamed); a file already there is not computed again, so a stopped run resumes where it was.
"""
import argparse
import os
import sys
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402

PATCH_SIZE = 16  # --patch_size of the DINO ViTs when not given (DINOv2 archs: 14)


def get_args_parser():
    parser = argparse.ArgumentParser("Region features for HIPT", add_help=False)
    utils.add_model_args(parser, patch_size=PATCH_SIZE)
    utils.add_weights_args(parser)
    parser.add_argument("--data_path", default="/path/to/regions/", type=str, help="""Folder of region images, one
        subfolder per class (the class folders are kept in --output_dir), or an uncompressed .tar of them indexed by
        tools/infer_entries.py.""")
    parser.add_argument("--region_size", default=4096, type=int, help="""Side in pixels of a region (HIPT: 4096);
        a multiple of --tile_size.""")
    parser.add_argument("--tile_size", default=256, type=int, help="""Side in pixels of a tile, the backbone's
        input (HIPT: 256, so a region is 16 x 16 tiles).""")
    parser.add_argument("--output_dir", default=".", type=str, help="Where <class>/<stem>.pt files are written.")
    parser.add_argument("--batch_size", default=256, type=int, help="""Tiles per forward pass of the backbone
        (256: one HIPT region). Lower it if the memory runs out.""")
    utils.add_normalization_args(parser)
    parser.add_argument("--num_workers", default=4, type=int, help="Data-loading workers decoding the images.")
    return parser


FLAG_DOMAINS = {**utils.MODEL_FLAG_DOMAINS, **utils.NORMALIZATION_FLAG_DOMAINS, "region_size": utils.AT_LEAST_ONE,
                "tile_size": utils.AT_LEAST_ONE, "batch_size": utils.AT_LEAST_ONE, "num_workers": utils.NON_NEGATIVE}


def check_args(args) -> None:
    """One-line errors for flag values that would fail later."""
    args = utils.resolve_patch_size(args, PATCH_SIZE)
    utils.check_flag_domains(args, FLAG_DOMAINS)
    if args.region_size % args.tile_size:
        raise utils.InputError(f"--region_size {args.region_size} is not a multiple of --tile_size {args.tile_size}")
    if utils.is_region_arch(args.arch):
        raise utils.InputError(f"--arch {args.arch} is a region model: the tiles need a patch-level backbone "
                               f"(vit_small, dinov2_vits14, resnet50, ...)")
    utils.check_patch_fits(args, "tile_size")


class RegionImages(torch.utils.data.Dataset):
    """The images of --data_path, as {index, regions, names, written_before, partial, error}: the normalised regions
    still to write (n, 3, R, R) and their file names, with what the image counts for the summary. An image whose
    files are all there is not decoded when it is one region (its <stem>.pt exists), else decoded and not embedded."""

    def __init__(self, images, output_dir: str, region_size: int, transform):
        self.images, self.output_dir, self.region_size, self.transform = images, output_dir, region_size, transform
        self.outputs = [(images.classes[images.targets[i]], os.path.splitext(os.path.basename(images.image_name(i)))[0])
                        for i in range(len(images))]
        seen = {}
        for i, output in enumerate(self.outputs):
            if output in seen:
                raise utils.InputError(f"{images.image_name(seen[output])} and {images.image_name(i)} would write the "
                                       f"same files ({output[0]}/{output[1]}*.pt): rename one")
            seen[output] = i

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        class_name, stem = self.outputs[i]
        folder = os.path.join(self.output_dir, class_name)
        item = {"index": i, "regions": None, "names": [], "written_before": 0, "partial": 0, "error": ""}
        if os.path.exists(os.path.join(folder, stem + utils.REGION_SUFFIX)):
            return {**item, "written_before": 1}
        try:
            image = self.images.read_image(i)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return {**item, "error": str(e)}
        names = utils.region_names(stem, image.height, image.width, self.region_size)
        todo = [(name, top, left) for name, top, left in names
                if not os.path.exists(os.path.join(folder, name + utils.REGION_SUFFIX))]
        item.update(written_before=len(names) - len(todo),
                    partial=utils.partial_regions(image.height, image.width, self.region_size),
                    names=[os.path.join(folder, name + utils.REGION_SUFFIX) for name, _, _ in todo])
        if todo:
            size = self.region_size
            item["regions"] = torch.stack([self.transform(image.crop((left, top, left + size, top + size)))
                                           for _, top, left in todo])  # (n, 3, R, R)
        return item


class Progress:
    """A progress bar on stderr: images done, regions written, images per second. On a terminal it redraws one
    line; in a log, a line every tenth of the images."""

    def __init__(self, total: int):
        self.total, self.start, self.shown = total, time.time(), -1
        self.tty = sys.stderr.isatty()

    def rate(self, done: int) -> float:
        """Images per second since the start."""
        return done / max(time.time() - self.start, 1e-9)

    def update(self, done: int, written: int) -> None:
        """Show that done images are through and written regions written."""
        tenth = done * 10 // max(self.total, 1)
        if not self.tty and tenth == self.shown and done != self.total:
            return
        self.shown = tenth
        width = 30
        bar = "#" * (width * done // max(self.total, 1))
        line = f"[{bar:<{width}}] {done}/{self.total} images, {written} regions written, {self.rate(done):.1f} images/s"
        print(f"\r{line}" if self.tty else line, end="" if self.tty and done != self.total else "\n",
              file=sys.stderr, flush=True)


def main(args):
    args = utils.resolve_patch_size(args, PATCH_SIZE)  # the arch's own when not given
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(utils.git_description())
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))

    # ============ preparing data ... ============
    images = utils.image_dataset(args.data_path)  # class folders, or a tar with its entries
    dataset = RegionImages(images, args.output_dir, args.region_size, utils.tile_transform(args.mean, args.std))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.num_workers,
                                         multiprocessing_context=utils.worker_start_method(args.num_workers))
    tiles_per_region = (args.region_size // args.tile_size) ** 2
    print(f"{len(dataset)} images in {len(images.classes)} classes; regions of {args.region_size} pixels, "
          f"{tiles_per_region} tiles of {args.tile_size} each")

    # ============ building network ... ============
    backbone = utils.build_frozen_backbone(args, device)

    # ============ embedding the tiles ... ============
    counts = {"written": 0, "written_before": 0, "partial": 0, "no_region": 0, "unreadable": 0}
    progress = Progress(len(dataset))
    for done, item in enumerate(loader, start=1):
        if item["error"]:
            print(f"WARNING: skipping unreadable image {images.image_name(item['index'])}: {item['error']}",
                  file=sys.stderr, flush=True)
            counts["unreadable"] += 1
        counts["written_before"] += item["written_before"]
        counts["partial"] += item["partial"]
        counts["no_region"] += not item["error"] and not item["names"] and not item["written_before"]
        if item["regions"] is not None:
            write_regions(backbone, item["regions"], item["names"], args, device)
            counts["written"] += len(item["names"])
        progress.update(done, counts["written"])
    elapsed = time.time() - progress.start
    print(f"{len(dataset)} images: {counts['written']} regions written to {args.output_dir}, "
          f"{counts['written_before']} already there; skipped: {counts['partial']} partial regions (cut by the "
          f"bottom or right edge), {counts['no_region']} images smaller than one region, {counts['unreadable']} "
          f"unreadable images; {elapsed:.1f} s, {len(dataset) / max(elapsed, 1e-9):.1f} images/s")


def write_regions(backbone, regions: torch.Tensor, paths: list, args, device: torch.device) -> None:
    """Embed the tiles of the (n, 3, R, R) regions and write each region's (n_tiles, D) features to its path."""
    tiles = torch.cat([utils.tile_image(region, args.tile_size) for region in regions])  # (n * n_tiles, 3, t, t)
    features = utils.embed_tiles(backbone, tiles, args.batch_size, device)
    for path, region_features in zip(paths, features.chunk(len(paths))):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        utils.save_on_master(region_features.clone(), path)  # a copy: a view would save the whole batch's storage


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Region features for HIPT", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
