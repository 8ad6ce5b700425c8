"""The batched multi-crop (--augmentation gpu): each operation against torchvision, the random parameters against the
original's probabilities and ranges, the whole pipeline against the original CPU pipeline in distribution."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from scipy import stats
from torchvision.transforms import InterpolationMode, v2

import utils
from conftest import make_image_folder, run_script

MEAN, STD = torch.tensor(utils.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(utils.IMAGENET_STD).view(3, 1, 1)


def natural_image(seed=0, size=(64, 48)):
    """Smooth colour fields plus noise, with a flat grey patch and a black one (hue's special cases)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.clip(np.asarray(img).astype(int) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    arr[:6, :6], arr[-6:, -6:] = 128, 0
    return Image.fromarray(arr.astype(np.uint8))


def image_batch(n=12, size=20, seed=0):
    """Float images in [0, 1] with grey, black, white and saturated pixels besides random ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, :, 0, :3] = torch.tensor([0.5, 0.0, 1.0])  # grey, black, white
    x[:, :, 1, :3] = torch.eye(3)  # pure red, green, blue
    x[:, :, 2, :2] = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]).T  # yellow, cyan: ties of the maximum
    return x


def no_op_params(n):
    """Parameters under which every step after the crop is the identity."""
    return {"flip": torch.zeros(n, dtype=torch.bool), "jitter": torch.zeros(n, dtype=torch.bool),
            "order": torch.arange(4).repeat(n, 1), "jitter_factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n),
            "gray": torch.zeros(n, dtype=torch.bool), "blur": torch.zeros(n, dtype=torch.bool),
            "sigma": torch.ones(n), "solarize": torch.zeros(n, dtype=torch.bool)}


def torchvision_reference(img, p, i):
    """Crop i through torchvision's functional tensor ops, one call per operation, in the original order."""
    jitter_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if p["flip"][i]:
        img = TF.hflip(img)
    if p["jitter"][i]:
        for op in p["order"][i].tolist():
            img = jitter_ops[op](img, p["jitter_factors"][i, op].item())
    if p["gray"][i]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p["blur"][i]:
        sigma = p["sigma"][i].item()
        img = TF.gaussian_blur(img, [13, 13], [sigma, sigma])
    if p["solarize"][i]:
        img = TF.solarize(img, 128 / 255)
    return TF.normalize(img, utils.IMAGENET_MEAN, utils.IMAGENET_STD)


# ============ the worker half ============


def test_worker_crops_are_torchvision_random_resized_crops():
    img = natural_image()
    geometry = utils.MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 3, global_crops_size=32, local_crops_size=16)
    torch.manual_seed(5)
    crops, params = geometry(img)
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    torch.manual_seed(5)  # same draws: torchvision's own transform on the tensor image gives the same crops
    bicubic = InterpolationMode.BICUBIC
    ref = [v2.RandomResizedCrop(32, scale=(0.4, 1.0), interpolation=bicubic, antialias=True)(pixels) for _ in range(2)]
    ref += [v2.RandomResizedCrop(16, scale=(0.05, 0.4), interpolation=bicubic, antialias=True)(pixels)
            for _ in range(3)]
    assert [c.dtype for c in crops] == [torch.uint8] * 5
    for c, r in zip(crops, ref):
        torch.testing.assert_close(c, r, rtol=0, atol=0)
    torch.manual_seed(5)  # and the original's PIL crops, same boxes, differ by at most a grey level or two
    from torchvision import transforms
    pil_ref = [transforms.RandomResizedCrop(32, scale=(0.4, 1.0), interpolation=bicubic)(img) for _ in range(2)]
    pil_ref += [transforms.RandomResizedCrop(16, scale=(0.05, 0.4), interpolation=bicubic)(img) for _ in range(3)]
    for c, r in zip(crops, pil_ref):
        diff = (c.permute(1, 2, 0).int() - torch.from_numpy(np.array(r)).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.1
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "flip": (5,), "jitter": (5,), "order": (5, 4), "jitter_factors": (5, 4), "gray": (5,), "blur": (5,),
        "sigma": (5,), "solarize": (5,)}


def test_parameter_probabilities_and_ranges():
    torch.manual_seed(0)
    n_images, n_local = 4000, 2
    geometry = utils.MultiCropGeometry((0.4, 1.0), (0.05, 0.4), n_local)
    rows = [utils.sample_photometric_params(geometry.blur_p, geometry.solarize_p) for _ in range(n_images)]
    p = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # (n_images, 2 + n_local, ...)

    def assert_frequency(mask, prob):
        n = mask.numel()
        sd = max((prob * (1 - prob) / n) ** 0.5, 1e-12)
        assert abs(mask.float().mean().item() - prob) <= 5 * sd, (mask.float().mean().item(), prob)

    assert_frequency(p["flip"], 0.5)
    assert_frequency(p["jitter"], 0.8)
    assert_frequency(p["gray"], 0.2)
    for crop, (blur, solarize) in enumerate([(1.0, 0.0), (0.1, 0.2)] + [(0.5, 0.0)] * n_local):
        assert_frequency(p["blur"][:, crop], blur)
        assert_frequency(p["solarize"][:, crop], solarize)
    # the uniform ranges of ColorJitter(0.4, 0.4, 0.2, 0.1) and of the blur radius, by a Kolmogorov-Smirnov test
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    for op, (low, high) in enumerate(ranges.values()):
        values = p["jitter_factors"][..., op].flatten().numpy()
        assert low <= values.min() and values.max() <= high
        assert stats.kstest(values, "uniform", args=(low, high - low)).pvalue > 1e-3
    sigma = p["sigma"].flatten().numpy()
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0
    assert stats.kstest(sigma, "uniform", args=(0.1, 1.9)).pvalue > 1e-3
    # the order of the four jitter operations: each of the 24 permutations equally likely (chi-square)
    order = p["order"].reshape(-1, 4)
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = np.unique(codes.numpy(), return_counts=True)[1]
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > 1e-3


# ============ the device half ============


@pytest.mark.parametrize("operation", ["flip", "brightness", "contrast", "saturation", "hue", "gray", "blur",
                                       "solarize"])
def test_each_operation_matches_torchvision(operation):
    torch.manual_seed(1)
    n = 12
    x = image_batch(n)
    p = no_op_params(n)
    if operation in ("brightness", "contrast", "saturation", "hue"):
        op = ["brightness", "contrast", "saturation", "hue"].index(operation)
        p["jitter"][:] = True
        low, high = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)][op]
        p["jitter_factors"][:, op] = torch.linspace(low, high, n)
        if operation == "hue":
            p["jitter_factors"][-2:, op] = torch.tensor([0.5, -0.5])  # the extreme shifts torchvision allows
    elif operation == "blur":
        p["blur"][:] = True
        p["sigma"] = torch.linspace(0.1, 2.0, n)
    else:
        p[operation][::2] = True  # half the batch: the others must come out untouched
    out = utils.MultiCropOnDevice("cpu").augment(x.clone(), p)
    for i in range(n):
        torch.testing.assert_close(out[i], torchvision_reference(x[i], p, i), rtol=0, atol=2e-5)


def test_random_compositions_match_torchvision_in_each_crops_order():
    torch.manual_seed(2)
    n = 48
    x = image_batch(n, seed=3)
    p = utils.sample_photometric_params(torch.full((n,), 0.5), torch.full((n,), 0.5))
    p["jitter"][:] = True  # every crop jittered, so all 24 orders are likely to appear
    out = utils.MultiCropOnDevice("cpu").augment(x.clone(), p)
    for i in range(n):
        torch.testing.assert_close(out[i], torchvision_reference(x[i], p, i), rtol=0, atol=2e-5)


@pytest.mark.parametrize("radius", [0.5, 1.0, 2.0])
def test_blur_sigma_is_pils_radius(radius):
    """PIL's GaussianBlur(radius) (an extended box blur) is a Gaussian of sigma = radius: close inside the image."""
    img = natural_image(seed=4)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255

    def interior_diff(sigma):
        ours = utils.gaussian_blur_batched(x, torch.tensor([sigma]))[0].permute(1, 2, 0).numpy()
        pil = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=radius))) / 255
        return np.abs(ours - pil)[8:-8, 8:-8].mean() * 255  # in grey levels, away from the borders

    assert interior_diff(radius) < 1.0
    assert interior_diff(radius) < interior_diff(radius * 1.5) and interior_diff(radius) < interior_diff(radius / 1.5)


def test_params_reach_their_own_crop_after_collation(tmp_path):
    """Collated (B, ncrops) parameters apply to crop v of image b and nowhere else."""
    data = make_image_folder(str(tmp_path / "data"), n_classes=1, per_class=4, size=40)
    geometry = utils.MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 3, global_crops_size=24, local_crops_size=12)
    dataset = utils.ImageFolderSkipBad(data, transform=geometry)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1)
    (crops, params), _ = next(iter(loader))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    plain = no_op_params(4 * 5)
    params = {k: v.reshape(4, 5, *v.shape[1:]) for k, v in plain.items()}  # (B, ncrops, ...)
    params["gray"][1, 3] = True  # image 1, local crop 2 (crop index 3)
    params["solarize"][2, 0] = True  # image 2, global crop 1
    out = utils.MultiCropOnDevice("cpu")(crops, params)
    assert [tuple(o.shape) for o in out] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    assert all(o.dtype == torch.float32 for o in out)
    for v in range(5):
        for b in range(4):
            expected = TF.normalize(crops[v][b].float() / 255, utils.IMAGENET_MEAN, utils.IMAGENET_STD)
            if (b, v) == (1, 3):
                expected = TF.normalize(TF.rgb_to_grayscale(crops[v][b].float() / 255, 3), utils.IMAGENET_MEAN,
                                        utils.IMAGENET_STD)
            elif (b, v) == (2, 0):
                expected = TF.normalize(TF.solarize(crops[v][b].float() / 255, 128 / 255), utils.IMAGENET_MEAN,
                                        utils.IMAGENET_STD)
            torch.testing.assert_close(out[v][b], expected, rtol=0, atol=1e-5)


def test_whole_pipeline_has_the_distribution_of_the_cpu_pipeline():
    """Statistics of each crop, original PIL pipeline vs batched pipeline on one image: two-sample KS tests."""
    torch.manual_seed(0)
    img, n = natural_image(seed=1), 400
    original = utils.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, global_crops_size=32, local_crops_size=16)
    geometry = utils.MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 2, global_crops_size=32, local_crops_size=16)
    cpu = [original(img) for _ in range(n)]
    samples = [geometry(img) for _ in range(n)]
    crops = [torch.stack([s[0][v] for s in samples]) for v in range(4)]
    params = {k: torch.stack([s[1][k] for s in samples]) for k in samples[0][1]}
    batched = utils.MultiCropOnDevice("cpu")(crops, params)

    def statistics(crop):
        u = crop * STD + MEAN  # back to [0, 1]
        is_gray = float((u.max(0).values - u.min(0).values).max() < 1e-2)
        sharpness = (u[:, 1:] - u[:, :-1]).abs().mean().item()  # lower when blurred
        return [u.mean().item(), u.std().item(), is_gray, sharpness, (u[0] - u[2]).mean().item()]

    for v in range(4):
        # rounded: float noise of the normalisation (1e-9) must not tell exact ties (grey crops) apart
        a = np.array([statistics(c[v]) for c in cpu]).round(4)
        b = np.array([statistics(batched[v][i]) for i in range(n)]).round(4)
        for k, name in enumerate(["mean", "std", "gray", "sharpness", "red-blue"]):
            assert stats.ks_2samp(a[:, k], b[:, k]).pvalue > 1e-3, (v, name)


@pytest.mark.slow
def test_main_dino_trains_with_the_batched_augmentation(tmp_path):
    import main_dino
    assert main_dino.get_args_parser().parse_args([]).augmentation == "auto"  # gpu on CUDA, cpu otherwise
    data = make_image_folder(str(tmp_path / "data"), per_class=6)
    out = str(tmp_path / "out")
    proc = run_script(["main_dino.py", "--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32",
                       "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64",
                       "--batch_size_per_gpu", "6", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "1",
                       "--augmentation", "gpu", "--data_path", data, "--output_dir", out])
    assert "augmentation: gpu" in proc.stdout
    with open(os.path.join(out, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"]) and log[0]["train_loss"] > 0


# ============ on a GPU ============


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_same_result_and_no_host_sync():
    torch.manual_seed(3)
    b, ncrops = 8, 4
    crops = [torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8).pin_memory() for s in (32, 32, 16, 16)]
    rows = [utils.sample_photometric_params(torch.tensor([1.0, 0.1, 0.5, 0.5]), torch.tensor([0.0, 0.2, 0.0, 0.0]))
            for _ in range(b)]
    params = {k: torch.stack([r[k] for r in rows]).pin_memory() for k in rows[0]}
    expected = utils.MultiCropOnDevice("cpu")(crops, params)
    on_gpu = utils.MultiCropOnDevice("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        out = on_gpu(crops, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for o, e in zip(out, expected):
        torch.testing.assert_close(o.cpu(), e, rtol=0, atol=1e-4)
    assert len(out) == ncrops
