"""Attention videos: the [CLS] self-attention of a DINO or DINOv2 ViT's last layer on every frame of a video.

    # a video: frames go to output/frames/, attention images to output/attention/, the video to output/video.mp4
    python video_generation.py --input_path clip.mp4 --output_path output/ --resize 480
    # a folder of frames (any of .jpg .png ...; taken in natural order: frame-2 before frame-10)
    python video_generation.py --input_path frames/ --output_path output/ --pretrained_weights checkpoint.pth
    # DINOv2's ViT-S/14: the PCA of the patch features, images to output/pca/, the video to output/video_pca.mp4
    python video_generation.py --arch dinov2_vits14 --patch_size 14 --pca --input_path clip.mp4 --output_path output/
    # only assemble a video from a folder of images
    python video_generation.py --video_only --input_path output/attention/ --output_path output/ --fps 25

Each attention image is the mean over heads of the attention maps of [CLS] to the patches
(DINOv2's registers left out), each head kept on the smallest set of patches that holds
--threshold of its attention mass (--threshold 1 keeps everything), coloured with matplotlib's
inferno. With --pca, each image is instead the first 3 principal components of the frame's
last-layer patch features, each min-max scaled to a colour channel, from one PCA of the patch
features of all frames, so that the colours stay stable through the video (see pca_images).
Frames go through the model --batch_size at a time, on the GPU when there is one. The video has
the input's frames in the input's order, at the input's frame rate unless --fps is given.
"""
import argparse
import os
import re
import time

import cv2
import matplotlib
import numpy as np
import torch
from PIL import Image

import utils

PATCH_SIZE = 8  # --patch_size of the DINO ViTs when not given (DINOv2 archs: 14)

FOURCC = {"mp4": "mp4v", "avi": "XVID"}


class DefaultFps(float):
    """The --fps default (30.0), told apart from a value given on the command line, which wins over the input's."""


def get_args_parser():
    parser = argparse.ArgumentParser("Generation self-attention video", add_help=False)
    utils.add_model_args(parser, patch_size=PATCH_SIZE)
    utils.add_weights_args(parser)
    parser.add_argument("--input_path", default=None, type=str, help="""A video file (its frames are extracted to
        <output_path>/frames), or a folder of frames; with --video_only, the folder of images to assemble.""")
    parser.add_argument("--output_path", default="./", type=str,
                        help="Where frames/, attention/ and video.<video_format> are written.")
    parser.add_argument("--threshold", default=0.6, type=float, help="""Keep each head's attention only on the
        smallest set of patches holding this fraction of its mass; 1 keeps the whole map.""")
    parser.add_argument("--resize", default=None, type=int, nargs="+", help="""Resize frames before the model sees
        them: one number sets the shorter side, two are height and width. Memory grows with the square of the number
        of patches: lower it if you run out of memory (e.g. --resize 480 for 480p).""")
    parser.add_argument("--video_only", action="store_true",
                        help="Only assemble a video from the images of --input_path (e.g. an attention/ folder).")
    parser.add_argument("--fps", default=DefaultFps(30.0), type=float,
                        help="Frame rate of the output video; default: the input video's, 30 for a folder of images.")
    parser.add_argument("--video_format", default="mp4", type=str, choices=["mp4", "avi"],
                        help="Container of the output video: mp4 (codec mp4v) or avi (XVID).")
    parser.add_argument("--batch_size", default=8, type=int, help="""Frames per forward pass. A 480p frame with
        patch size 8 needs about 2 GB for the last layer's attention matrix: lower it if you run out of memory.""")
    parser.add_argument("--num_workers", default=4, type=int, help="Processes decoding frames ahead of the model.")
    parser.add_argument("--pca", action="store_true", help="""Images of the PCA of the patch features (first 3
        components as RGB, one PCA for all frames) instead of attention: <output_path>/pca/ and video_pca.<format>.""")
    parser.add_argument("--pca_fit_tokens", default=50_000, type=int, help="""With --pca: the PCA is fitted on at
        most this many patch features, each frame's share drawn at random, when the video has more; it holds them in
        memory (50,000 features of ViT-g, 1536-d, take 300 MB).""")
    return parser


FLAG_DOMAINS = {
    **utils.MODEL_FLAG_DOMAINS, "threshold": utils.FRACTION, "resize": utils.AT_LEAST_ONE, "fps": utils.POSITIVE,
    "batch_size": utils.AT_LEAST_ONE, "num_workers": utils.NON_NEGATIVE, "pca_fit_tokens": utils.Domain(low=3),
}


def check_args(args) -> None:
    """One-line errors for flag values and paths that would fail later."""
    args = utils.resolve_patch_size(args, PATCH_SIZE)
    utils.check_flag_domains(args, FLAG_DOMAINS)
    utils.check_patch_fits(args)  # a DINOv2 ViT's patch size
    if args.video_only and args.pca:
        raise utils.InputError("--pca computes the frames' PCA images; --video_only assembles images as they are")
    if not args.input_path:
        raise utils.InputError("--input_path is required: a video file or a folder of frames")
    if not os.path.exists(args.input_path):
        raise utils.InputError(f"--input_path {args.input_path}: no such file or folder")
    if args.video_only and not os.path.isdir(args.input_path):
        raise utils.InputError(f"--video_only: --input_path {args.input_path} must be a folder of images")
    if args.video_only and args.resize:
        raise utils.InputError("--resize sets the size the model sees; --video_only assembles images as they are")
    if args.resize is not None and not 1 <= len(args.resize) <= 2:
        raise utils.InputError(f"--resize {' '.join(map(str, args.resize))}: give one size (shorter side) "
                               f"or two (height width)")


def main(args):
    args = utils.resolve_patch_size(args, PATCH_SIZE)  # the arch's own when not given
    check_args(args)
    os.makedirs(args.output_path, exist_ok=True)
    video_path = os.path.join(args.output_path, f"video{'_pca' if args.pca else ''}.{args.video_format}")
    given_fps = None if isinstance(args.fps, DefaultFps) else args.fps

    if args.video_only:
        # ============ assembling the video ... ============
        images = list_images(args.input_path)
        check_same_size(images, args.input_path)
        write_video((np.array(Image.open(p).convert("RGB")) for p in images), video_path, args.fps)
        return

    # ============ checking frames ... ============
    frames = None  # a folder is checked before any work; a video's frames are extracted after the model loads
    if os.path.isdir(args.input_path):
        frames = list_images(args.input_path)
        if args.resize is None or len(args.resize) == 1:  # one size in, one size out: a video has one frame size
            check_same_size(frames, args.input_path)

    # ============ building network ... ============
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = utils.build_attention_backbone(args, device)

    # ============ extracting frames ... ============
    input_fps = None
    if frames is None:
        frames, input_fps = extract_frames(args.input_path, os.path.join(args.output_path, "frames"))

    # ============ attention (or PCA) images and video ... ============
    images_dir = os.path.join(args.output_path, "pca" if args.pca else "attention")
    os.makedirs(images_dir, exist_ok=True)
    images = (pca_images if args.pca else attention_images)(model, frames, images_dir, device, args)
    write_video(images, video_path, given_fps or input_fps or args.fps)


def natural_key(name: str) -> list:
    """Sort key reading digit runs as numbers, so frame-9 comes before frame-10 (and frame-9999 before frame-10000)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: str) -> list:
    """The image files of folder in natural order; one-line errors for an empty folder or a file that is no image."""
    names = [n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    others = [n for n in names if not n.lower().endswith(utils.IMG_EXTENSIONS)]
    if others:
        raise utils.InputError(f"--input_path {folder}: {others[0]} is not an image ({len(others)} such files); "
                               f"the folder must hold only frames ({', '.join(utils.IMG_EXTENSIONS)})")
    if not names:
        raise utils.InputError(f"--input_path {folder}: no images in this folder")
    names.sort(key=natural_key)
    stems = [os.path.splitext(n)[0] for n in names]
    if len(set(stems)) < len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise utils.InputError(f"--input_path {folder}: several frames are named {dup}.* (their attention images "
                               f"would overwrite each other)")
    return [os.path.join(folder, n) for n in names]


def image_size(path: str) -> tuple:
    """(width, height) from the file header, with a one-line error for a file that is not a readable image."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise utils.InputError(f"{path}: not a readable image ({e})") from None


def check_same_size(paths: list, source: str) -> None:
    """Every frame of a video has one size: say which frame differs (before any work is done)."""
    first = image_size(paths[0])
    for p in paths[1:]:
        size = image_size(p)
        if size != first:
            raise utils.InputError(f"{source}: frames differ in size: {os.path.basename(p)} is {size[0]}x{size[1]}, "
                                   f"{os.path.basename(paths[0])} {first[0]}x{first[1]} (give --resize HEIGHT WIDTH)")


def extract_frames(video: str, frames_dir: str):
    """Every frame of the video as frames_dir/frame-0000.jpg, ... ; returns their paths and the video's frame rate."""
    if video.lower().endswith(utils.IMG_EXTENSIONS):
        raise utils.InputError(f"--input_path {video}: an image, not a video (for one image use "
                               f"visualize_attention.py; for frames give their folder)")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines would bury our one-line error
    capture = cv2.VideoCapture(video)
    if not capture.isOpened():
        raise utils.InputError(f"--input_path {video}: OpenCV cannot read this video (unknown format or damaged file)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    os.makedirs(frames_dir, exist_ok=True)
    old = [n for n in os.listdir(frames_dir) if n.lower().endswith(utils.IMG_EXTENSIONS)]
    paths = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        path = os.path.join(frames_dir, f"frame-{len(paths):04d}.jpg")
        if not cv2.imwrite(path, frame):
            raise utils.InputError(f"could not write {path}")
        paths.append(path)
    capture.release()
    if not paths:
        raise utils.InputError(f"--input_path {video}: no frame could be decoded (unknown format or damaged file)")
    fps = fps if fps > 0 and np.isfinite(fps) else None
    print(f"Video {video}: {len(paths)} frames at {fps or 'unknown'} fps extracted to {frames_dir}")
    stale = len(set(old) - {os.path.basename(p) for p in paths})
    if stale:
        print(f"Note: {frames_dir} also holds {stale} older images; only the {len(paths)} frames just extracted "
              "are used")
    return paths, fps


class FrameDataset(torch.utils.data.Dataset):
    """Frames as normalised tensors, resized as --resize asks and cropped to a multiple of the patch size."""

    def __init__(self, paths: list, resize, patch_size: int):
        self.paths, self.patch_size = paths, patch_size
        self.transform = utils.attention_transform(resize)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i: int):
        """The frame's tensor, or the one-line error message when it cannot be decoded or is smaller than a patch
        (raised by the reader)."""
        try:
            with Image.open(self.paths[i]) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"{self.paths[i]}: not a readable image ({e})"
        img = self.transform(img)
        if min(img.shape[-2:]) < self.patch_size:
            return (f"{self.paths[i]}: {img.shape[-2]}x{img.shape[-1]} pixels as the model sees it (see --resize), "
                    f"smaller than one {self.patch_size}x{self.patch_size} patch")
        return utils.crop_to_patch_multiple(img, self.patch_size)


def collate_frames(items: list):
    """The batch's frames stacked, or the message of a frame that failed to decode.

    Raised in a DataLoader worker, the error would come back as a multi-line traceback.
    """
    errors = [x for x in items if isinstance(x, str)]
    return errors[0] if errors else torch.stack(items)


def frame_batches(frames: list, device: torch.device, args):
    """Yield the frames, --batch_size at a time and in order, as (B, 3, H, W) tensors on device.

    --num_workers processes decode them ahead of the model; a frame that cannot be used is a one-line error.
    """
    loader = torch.utils.data.DataLoader(FrameDataset(frames, args.resize, args.patch_size),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=collate_frames, pin_memory=device.type == "cuda")
    for batch in loader:
        if isinstance(batch, str):
            raise utils.InputError(batch)
        yield batch.to(device, non_blocking=True)


def attention_images(model, frames: list, attention_dir: str, device: torch.device, args):
    """Yield, frame by frame and in order, the RGB attention image, also saved as attention_dir/attn-<frame>.jpg."""
    cmap = matplotlib.colormaps["inferno"]
    start, model_time, done = time.time(), 0.0, 0
    for b, batch in enumerate(frame_batches(frames, device, args)):
        t = time.time()
        attentions = utils.cls_attention_maps(model, batch)
        masks = utils.attention_mass_mask(attentions, args.threshold)  # (B, heads, h, w), like attentions
        maps = (attentions * masks).mean(dim=1, keepdim=True)  # (B, 1, h, w): mean over heads of the kept mass
        maps = utils.upsample_patches(maps, args.patch_size)[:, 0].cpu().numpy()  # (B, H, W)
        model_time += time.time() - t
        for rgb in saved_frames((colorize(attention, cmap) for attention in maps), frames, done, attention_dir, "attn"):
            done += 1
            yield rgb
        if b % 10 == 0 or done == len(frames):
            print(f"attention: {done}/{len(frames)} frames")
    total = time.time() - start
    print(f"Attention images of {done} frames in {attention_dir}: {total:.1f} s, {done / total:.2f} frames/s "
          f"({done / model_time:.2f} frames/s in the model, on {device})")


def pca_images(model, frames: list, pca_dir: str, device: torch.device, args):
    """Yield, frame by frame and in order, the RGB image of the PCA of the frame's patch features, also saved as
    pca_dir/pca-<frame>.jpg.

    The frames go through the model twice: the first pass fits one PCA on the patch features of all
    frames (fit_video_pca), the second colours each frame's patches by their scores on its first 3
    components, min-max scaled over the fitted features, so a colour means the same in every frame.
    """
    pca = fit_video_pca(model, frames, device, args)
    start, done = time.time(), 0
    for b, batch in enumerate(frame_batches(frames, device, args)):
        features = utils.patch_features(model, batch)  # (B, h, w, D)
        B, h, w, dim = features.shape
        rgb = pca.rgb(features.reshape(-1, dim).cpu()).reshape(B, h, w, 3).permute(0, 3, 1, 2)  # (B, 3, h, w)
        rgb = utils.upsample_patches(rgb, args.patch_size)  # (B, 3, H, W)
        images = (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for image in saved_frames(images, frames, done, pca_dir, "pca"):
            done += 1
            yield image
        if b % 10 == 0 or done == len(frames):
            print(f"PCA: {done}/{len(frames)} frames")
    print(f"PCA images of {done} frames in {pca_dir}: {time.time() - start:.1f} s, on {device}")


def saved_frames(images, frames: list, first: int, folder: str, prefix: str):
    """Yield each (H, W, 3) uint8 image after saving it as folder/<prefix>-<stem>.jpg, the stem that of its frame,
    frames[first], frames[first + 1], ..."""
    for i, image in enumerate(images, first):
        stem = os.path.splitext(os.path.basename(frames[i]))[0]
        Image.fromarray(image).save(os.path.join(folder, f"{prefix}-{stem}.jpg"))
        yield image


def fit_video_pca(model, frames: list, device: torch.device, args) -> utils.PatchPCA:
    """One PCA (utils.PatchPCA, its signs by its rule, frame borders taken for background) of the patch features of
    all frames, or, when there are more than --pca_fit_tokens, of as many drawn at random (seed 0), an equal share
    of each frame: the features fitted on are held in memory (on the CPU)."""
    share = max(1, args.pca_fit_tokens // len(frames))
    generator = torch.Generator().manual_seed(0)
    samples, borders, total = [], [], 0
    for batch in frame_batches(frames, device, args):
        features = utils.patch_features(model, batch).float().cpu()  # (B, h, w, D)
        B, h, w, dim = features.shape
        border = utils.border_patches(h, w).flatten()  # (h * w,)
        for frame_features in features.reshape(B, h * w, dim):
            keep = torch.randperm(h * w, generator=generator)[:share] if share < h * w else torch.arange(h * w)
            samples.append(frame_features[keep])
            borders.append(border[keep])
        total += B * h * w
    features = torch.cat(samples)
    if len(features) < total:
        print(f"PCA fitted on {len(features)} of the {total} patch features of {len(frames)} frames, {share} drawn "
              f"at random from each frame, to fit in memory (--pca_fit_tokens {args.pca_fit_tokens})")
    else:
        print(f"PCA fitted on all {total} patch features of {len(frames)} frames")
    return utils.PatchPCA.fit(features, border=torch.cat(borders))


def colorize(attention: np.ndarray, cmap) -> np.ndarray:
    """(H, W) floats to (H, W, 3) uint8 through the colour map, scaled from the map's min to its max (as plt.imsave)."""
    lo, hi = float(attention.min()), float(attention.max())
    scaled = (attention - lo) / (hi - lo) if hi > lo else np.zeros_like(attention)
    return cmap(scaled, bytes=True)[..., :3]


def write_video(images, video_path: str, fps: float) -> None:
    """Write RGB frames (an iterable of (H, W, 3) uint8 of one size) as a video; a partial file never replaces one."""
    ext = os.path.splitext(video_path)[1]
    tmp = f"{video_path[:-len(ext)]}.partial{ext}"  # the extension picks the container
    writer, count, size = None, 0, None
    try:
        for rgb in images:
            if writer is None:
                size = (rgb.shape[1], rgb.shape[0])
                writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*FOURCC[ext[1:]]), fps, size)
                if not writer.isOpened():
                    raise utils.InputError(f"OpenCV cannot write {ext[1:]} videos here ({video_path})")
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            count += 1
        if writer is None:
            raise utils.InputError(f"no frames to write to {video_path}")
        writer.release()
        os.replace(tmp, video_path)
    finally:
        if writer is not None:
            writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"Video {video_path}: {count} frames of {size[0]}x{size[1]} at {fps:g} fps")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Generation self-attention video", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
