"""DINOv2's training objectives in main_dino.py, against formulas written here: Sinkhorn-Knopp centering
(--centering sinkhorn_knopp), its marginals, 2 processes equal 1, and the default left as the original's."""
import copy
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main_dino
import utils
from conftest import make_image_folder, run_in_gloo_processes, run_script
from vision_transformer import build_model


def sinkhorn_knopp_written_out(teacher_output, temp, n_iterations):
    """DINOv2's Sinkhorn-Knopp on one process, as its paper writes it: Q = exp(t / temp)^T (K x B) scaled to sum 1,
    then n_iterations of (rows to 1/K, columns to 1/B), and the columns scaled back to sum 1."""
    q = torch.exp(teacher_output.double() / temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def loss_fn(out_dim=32):
    return utils.DINOLoss(out_dim, 2, 0.04, 0.04, 0, 10)


def test_sinkhorn_knopp_follows_the_written_out_iterations():
    torch.manual_seed(0)
    teacher = torch.randn(48, 32) * 0.3
    for n in (1, 3):
        q = loss_fn().sinkhorn_knopp_teacher(teacher, 0.07, n_iterations=n)
        assert q.dtype == torch.float32 and q.shape == (48, 32)
        torch.testing.assert_close(q.double(), sinkhorn_knopp_written_out(teacher, 0.07, n), rtol=1e-5, atol=1e-8)


def test_sinkhorn_knopp_marginals():
    """Every image's assignment sums to 1; every prototype receives about B/K images, exactly once converged."""
    torch.manual_seed(1)
    teacher = torch.randn(64, 16)
    q = loss_fn(16).sinkhorn_knopp_teacher(teacher, 0.1)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))
    per_prototype = q.sum(dim=0)
    assert per_prototype.sum().item() == pytest.approx(64, rel=1e-5)
    assert (per_prototype - 64 / 16).abs().max() < 64 / 16  # about B/K after 3 iterations ...
    converged = loss_fn(16).sinkhorn_knopp_teacher(teacher, 0.1, n_iterations=500)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((16,), 64 / 16), rtol=1e-3, atol=0)  # ... then B/K
    # the teacher's ranking survives: each image's most likely prototype is the one it scored highest, mostly
    assert (converged.argmax(dim=1) == teacher.argmax(dim=1)).float().mean() > 0.5


def test_sinkhorn_knopp_does_not_overflow_where_the_written_out_form_does():
    """logits / temp above 88 overflow exp in fp32; the maximum subtracted first changes nothing else."""
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    assert not torch.isfinite(torch.exp(teacher / 0.02)).all()
    q = loss_fn(3).sinkhorn_knopp_teacher(teacher, 0.02)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), sinkhorn_knopp_written_out(teacher.double() - 2.0, 0.02, 3))
    # an image whose every logit lies 150 x temp under the batch's best: exp(-150) is 0 even as an fp32 subnormal, so
    # its column would be all zeros (0 / 0); raised to the smallest normal, the image still gets an assignment
    far = torch.tensor([[1.0, 0.9, 0.8], [-2.0, -2.0, -2.0]])
    assert (torch.exp(far / 0.02 - 50.0)[1] == 0).all()
    q = loss_fn(3).sinkhorn_knopp_teacher(far, 0.02)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(2))


def test_sinkhorn_knopp_leaves_the_center_alone():
    args = main_dino.get_args_parser().parse_args(["--centering", "sinkhorn_knopp"])
    vars(args).update(arch="vit_tiny", patch_size=16, out_dim=32, global_crops_size=32, local_crops_size=16,
                      local_crops_number=2, use_fp16=False)
    dino = main_dino.DINO.build(args, utils.Distributed())
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
    metrics = dino.train_step(images, epoch=0, momentum=0.996, teacher_temp=0.04)
    assert torch.isfinite(metrics["loss"]) and torch.equal(dino.dino_loss.center, torch.zeros(1, 32))


def test_centering_default_is_the_originals():
    assert main_dino.get_args_parser().parse_args([]).centering == "centering"


def _sinkhorn_knopp_of_rank(rank):
    torch.manual_seed(0)
    teacher = torch.randn(2 * 6, 8)  # the same 12 images on every rank; each takes its half
    return loss_fn(8).sinkhorn_knopp_teacher(teacher.chunk(2)[rank], 0.1)


@pytest.mark.slow
def test_sinkhorn_knopp_in_2_processes_equals_1():
    """DINOv2 sums Q, its rows (per prototype) and the image count over all processes: 2 halves give the whole."""
    halves = torch.cat(run_in_gloo_processes(_sinkhorn_knopp_of_rank))
    torch.manual_seed(0)
    whole = loss_fn(8).sinkhorn_knopp_teacher(torch.randn(2 * 6, 8), 0.1)
    torch.testing.assert_close(halves, whole)


@pytest.mark.slow
def test_unknown_centering_is_one_line(tmp_path):
    make_image_folder(str(tmp_path / "images"), per_class=2)
    proc = run_script(["main_dino.py", "--centering", "sinkhorn", "--data_path", str(tmp_path / "images"),
                       "--output_dir", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2 and "--centering" in proc.stderr and "sinkhorn_knopp" in proc.stderr
    assert not (tmp_path / "out" / "log.txt").exists()


@pytest.mark.slow
def test_a_sinkhorn_knopp_run_logs_and_resumes(tmp_path):
    make_image_folder(str(tmp_path / "images"), per_class=4)
    cmd = ["main_dino.py", "--arch", "vit_tiny", "--patch_size", "16", "--global_crops_size", "32",
           "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4",
           "--num_workers", "0", "--warmup_epochs", "0", "--centering", "sinkhorn_knopp",
           "--data_path", str(tmp_path / "images"),
           "--output_dir", str(tmp_path / "out")]
    run_script(cmd + ["--epochs", "1"])
    run_script(cmd + ["--epochs", "2"])
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.txt")]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["train_loss"] > 0 for r in log)
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert torch.equal(checkpoint["dino_loss"]["center"], torch.zeros(1, 64))


# ============ iBOT's masks ============

def one_block_written_out(rng, height, width, n_patches, min_patches=4, min_aspect=0.3):
    """DINOv2's blockwise masking of n_patches on an (height, width) grid when the first rectangle drawn fits (one
    try): area uniform in [min_patches, n_patches], log-aspect uniform in [log(min_aspect), -log(min_aspect)],
    sides rounded from sqrt(area * aspect) and sqrt(area / aspect), top then left uniform over the places left."""
    area = rng.uniform(min_patches, n_patches)
    aspect = math.exp(rng.uniform(math.log(min_aspect), -math.log(min_aspect)))
    h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if not (w < width and h < height and 0 < h * w <= n_patches):
        return None
    top, left = rng.randint(0, height - h), rng.randint(0, width - w)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + h, left:left + w] = True
    return mask


def test_masking_generator_makes_dinov2s_draws():
    """Under one seed the generator draws what DINOv2's procedure draws, in its order: for masks asked of exactly
    what one rectangle gives, the first try's rectangle is the mask."""
    checked = 0
    for seed in range(200):
        expected = one_block_written_out(random.Random(seed), 8, 8, 12)
        if expected is None or expected.sum() != 12:
            continue
        random.seed(seed)
        mask = utils.MaskingGenerator((8, 8), max_num_patches=32)(12)
        np.testing.assert_array_equal(mask, expected)
        checked += 1
    assert checked >= 5


def test_masking_generator_masks_at_most_what_is_asked():
    generator = utils.MaskingGenerator((7, 7), max_num_patches=0.5 * 7 * 7)
    random.seed(0)
    counts = []
    for asked in list(range(0, 25)) * 8:
        mask = generator(asked)
        assert mask.shape == (7, 7) and mask.dtype == bool and mask.sum() <= asked
        counts.append((asked, int(mask.sum())))
    assert all(n == 0 for asked, n in counts if asked == 0)
    # rectangles of 4 or more patches fill most requests; small leftovers can stay unmasked, as in DINOv2
    assert sum(n for _, n in counts) >= 0.8 * sum(asked for asked, _ in counts)
    # no single rectangle exceeds max_num_patches: a generator capped at 4 patches per block masks 4-patch blocks
    capped = utils.MaskingGenerator((7, 7), max_num_patches=4)
    assert all(capped(4).sum() <= 4 for _ in range(50))


class ExactGenerator:
    """Masks exactly the number of patches asked (the first ones of the grid) and records each request."""

    def __init__(self, shape):
        self.shape, self.asked = shape, []

    def __call__(self, n=0):
        self.asked.append(n)
        mask = np.zeros(self.shape[0] * self.shape[1], dtype=bool)
        mask[:n] = True
        return mask.reshape(self.shape)


def test_collate_masks_ratios_counts_and_weights():
    n_images, n_tokens, ratios, probability = 10, 64, (0.1, 0.5), 0.5
    generator = ExactGenerator((8, 8))
    random.seed(3)
    masks = utils.collate_masks(n_images, n_tokens, ratios, probability, generator)
    n_masked_images = int(n_images * probability)
    # one request per masked image, the i-th within the i-th of 5 equal slices of [0.1, 0.5]; then the rest: none
    bounds = np.linspace(0.1, 0.5, n_masked_images + 1)
    for i, asked in enumerate(generator.asked[:n_masked_images]):
        assert int(n_tokens * bounds[i]) - 1 <= asked <= int(n_tokens * bounds[i + 1])
    assert generator.asked[n_masked_images:] == [0] * (n_images - n_masked_images)
    collated = masks["collated_masks"]
    assert collated.shape == (n_images, n_tokens) and collated.dtype == torch.bool
    assert sorted(collated.sum(1).tolist()) == sorted(generator.asked)  # the rows are the masks, shuffled
    assert masks["upperbound"] == sum(int(n_tokens * b) for b in bounds[1:]) >= collated.sum()
    indices = masks["mask_indices_list"]
    assert torch.equal(indices, torch.tensor([i for i, m in enumerate(collated.flatten().tolist()) if m]))
    assert masks["n_masked_patches"].tolist() == [len(indices)]
    row_of = indices // n_tokens  # each masked patch weighs 1 / (masked patches of its image)
    torch.testing.assert_close(masks["masks_weight"], 1 / collated.sum(1)[row_of].float())
    assert masks["masks_weight"].sum().item() == pytest.approx(n_masked_images)


def test_mask_generator_for_is_dinov2s_train_setup():
    generator = utils.mask_generator_for(224, 14)
    assert generator.get_shape() == (16, 16) and generator.max_num_patches == 128  # half the 256 tokens
    assert utils.mask_generator_for(28, 7).max_num_patches == 8


# ============ iBOT's loss, KoLeo ============

def test_ibot_forward_masked_is_the_mean_over_crops_of_each_crops_mean():
    torch.manual_seed(0)
    n_crops, n_tokens, k = 4, 6, 10
    masks = torch.zeros(n_crops, n_tokens, dtype=torch.bool)
    masks[0, :3] = True
    masks[2, [1, 4]] = True  # crops 1 and 3 unmasked: they count in the mean, with 0
    student = torch.randn(int(masks.sum()), k)
    teacher = F.softmax(torch.randn(int(masks.sum()), k), dim=-1)
    loss = utils.iBOTPatchLoss(k, student_temp=0.1).forward_masked(student, teacher, masks)
    ce = -(teacher.double() * F.log_softmax(student.double() / 0.1, dim=-1)).sum(-1)
    expected = (ce[:3].mean() + ce[3:].mean()) / n_crops
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    explicit = utils.iBOTPatchLoss(k).forward_masked(student, teacher, masks,
                                                     masks_weight=torch.tensor([1 / 3] * 3 + [1 / 2] * 2))
    assert explicit.item() == pytest.approx(expected.item(), rel=1e-6)


def test_ibot_center_is_an_ema_of_the_mean_patch_output():
    loss = utils.iBOTPatchLoss(5, center_momentum=0.9)
    tokens = torch.arange(15.0).reshape(3, 5)
    loss.update_center(tokens)
    torch.testing.assert_close(loss.center, 0.1 * tokens.mean(0).reshape(1, 1, 5))
    loss.update_center(torch.zeros(0, 5))  # a step without masked patches leaves it
    torch.testing.assert_close(loss.center, 0.1 * tokens.mean(0).reshape(1, 1, 5))
    probs = loss.softmax_center_teacher(tokens, 0.5)
    torch.testing.assert_close(probs, F.softmax((tokens - loss.center.reshape(1, 5)) / 0.5, dim=-1))


def test_ibot_sinkhorn_knopp_marginals():
    torch.manual_seed(2)
    patches = torch.randn(40, 8)
    q = utils.iBOTPatchLoss(8).sinkhorn_knopp_teacher(patches, 0.1, torch.tensor([40]))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(40))
    torch.testing.assert_close(q.double(), sinkhorn_knopp_written_out(patches, 0.1, 3), rtol=1e-5, atol=1e-8)


def test_koleo_on_points_whose_nearest_neighbours_are_known():
    """Unit vectors at angles 0, 0.1, 0.3, 1.0, 2.2 rad: the nearest neighbours are 0.1 away for the first two, then
    0.2, 0.7 and 1.2; a chord at angle a is 2 sin(a / 2) long."""
    angles = torch.tensor([0.0, 0.1, 0.3, 1.0, 2.2], dtype=torch.float64)
    points = torch.stack((torch.cos(angles), torch.sin(angles)), dim=1) * torch.tensor([[1.0], [2], [3], [0.5], [7]],
                                                                                     dtype=torch.float64)
    gaps = torch.tensor([0.1, 0.1, 0.2, 0.7, 1.2], dtype=torch.float64)
    expected = -torch.log(2 * torch.sin(gaps / 2)).mean()  # (the 1e-8s DINOv2 adds change the 8th digit)
    assert utils.KoLeoLoss()(points.float()).item() == pytest.approx(expected.item(), rel=1e-6)
    # scale does not matter (the features are normalised), and it falls as the points spread
    spread = torch.stack((torch.cos(angles * 1.4), torch.sin(angles * 1.4)), dim=1)
    assert utils.KoLeoLoss()(spread.float()) < utils.KoLeoLoss()(points.float())


# ============ the step: how the terms add up ============

def objective_args(**overrides):
    args = main_dino.get_args_parser().parse_args([])
    vars(args).update(arch="vit_tiny", patch_size=8, out_dim=32, global_crops_size=32, local_crops_size=16,
                      local_crops_number=2, drop_path_rate=0.0, clip_grad=0.0, freeze_last_layer=0, use_fp16=False,
                      ibot_loss_weight=0.7, koleo_loss_weight=0.3, batch_size_per_gpu=3)
    vars(args).update(overrides)
    return args


def fixed_masks(batch, seed=0):
    """collate_masks of 2 x batch crops of 16 patches, drawn under a fixed seed, with draw_masks' n_masked."""
    random.seed(seed)
    masks = utils.collate_masks(2 * batch, 16, (0.1, 0.5), 0.5, utils.mask_generator_for(32, 8))
    return {**masks, "n_masked": len(masks["mask_indices_list"])}


def cross_entropy(q, s_logits):
    return -(q * F.log_softmax(s_logits / 0.1, dim=-1)).sum(-1)


def koleo_written_out(features):
    x = F.normalize(features.double(), dim=-1)
    dots = x @ x.t() - 3 * torch.eye(len(x), dtype=x.dtype)
    nearest = x[dots.argmax(1)]
    return -torch.log((x - nearest + 1e-8).norm(dim=-1) + 1e-8).mean()


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_a_step_with_every_objective_is_the_written_out_sum(centering, monkeypatch):
    """One step with iBOT and KoLeo on: the loss is the original's [CLS] mean over (teacher crop, other student crop)
    pairs, plus 0.7 x the mean over the 6 global crops of each crop's mean cross-entropy on its masked patches (the
    teacher sees the crops unmasked), plus 0.3 x KoLeo of each global crop's backbone [CLS]; the logged terms sum to
    it, and the centers move by the batch means (the patch loss's over the masked patches)."""
    args = objective_args(centering=centering)
    torch.manual_seed(0)
    dino = main_dino.DINO.build(args, utils.Distributed())
    masks = fixed_masks(3)
    monkeypatch.setattr(dino, "draw_masks", lambda batch, device: masks)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
    student, teacher = (copy.deepcopy(m.module if hasattr(m, "module") else m)
                        for m in (dino.student, dino.teacher))
    metrics = dino.train_step(images, epoch=0, momentum=0.99, teacher_temp=0.04)

    index, collated = masks["mask_indices_list"], masks["collated_masks"]
    with torch.no_grad():
        t = teacher.backbone.forward_features(torch.cat(images[:2]))
        t_cls = teacher.head(t["x_norm_clstoken"])
        t_patch = teacher.head(t["x_norm_patchtokens"].flatten(0, 1)[index])
    if centering == "sinkhorn_knopp":
        q = sinkhorn_knopp_written_out(t_cls, 0.04, 3)
        q_patch = sinkhorn_knopp_written_out(t_patch, 0.04, 3)
    else:
        q, q_patch = F.softmax(t_cls.double() / 0.04, -1), F.softmax(t_patch.double() / 0.04, -1)
    s_global = student.backbone.forward_features(torch.cat(images[:2]), masks=collated)
    s_cls = student.head(torch.cat((s_global["x_norm_clstoken"], student.backbone(torch.cat(images[2:])))))
    s_patch = student.head(s_global["x_norm_patchtokens"].flatten(0, 1)[index])
    s_crops = s_cls.double().chunk(4)
    pairs = [cross_entropy(q.chunk(2)[i], s_crops[v]).mean() for i in range(2) for v in range(4) if v != i]
    dino_term = sum(pairs) / len(pairs)
    ce_patch, row = cross_entropy(q_patch, s_patch.double()), index // 16
    ibot_term = sum(ce_patch[row == r].mean() for r in row.unique()) / 6
    koleo_term = sum(koleo_written_out(c) for c in s_global["x_norm_clstoken"].chunk(2))
    expected = dino_term + 0.7 * ibot_term + 0.3 * koleo_term

    assert metrics["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["ibot_loss"].item() == pytest.approx(0.7 * ibot_term.item(), rel=1e-5)
    assert metrics["koleo_loss"].item() == pytest.approx(0.3 * koleo_term.item(), rel=1e-5)
    local = sum(cross_entropy(q.chunk(2)[i], s_crops[v]).mean() for i in range(2) for v in (2, 3)) / len(pairs)
    assert metrics["dino_local_crops_loss"].item() == pytest.approx(local.item(), rel=1e-5)
    terms = [metrics[k] for k in ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")]
    assert sum(terms).item() == pytest.approx(metrics["loss"].item(), rel=1e-6)
    assert {"ibot_teacher_entropy", "ibot_teacher_batch_entropy", "teacher_entropy", "kl"} <= set(metrics)
    if centering == "centering":
        torch.testing.assert_close(dino.dino_loss.center, 0.1 * t_cls.mean(0, keepdim=True))
        torch.testing.assert_close(dino.ibot_patch_loss.center, 0.1 * t_patch.mean(0).reshape(1, 1, -1))
    else:  # Sinkhorn-Knopp leaves both centers
        assert not dino.dino_loss.center.any() and not dino.ibot_patch_loss.center.any()


def test_the_student_sees_the_mask_token_where_masked():
    torch.manual_seed(0)
    vit = build_model("vit_tiny", patch_size=8, mask_token=True).eval()
    with torch.no_grad():
        vit.mask_token.normal_()
        x = torch.randn(2, 3, 32, 32)
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[0, [0, 5, 6]] = True
        out = vit.forward_features(x, masks=masks)
        # written out: the patch embeddings, the masked ones replaced, then [CLS], the position embedding, blocks
        tokens = vit.patch_embed(x)
        tokens[masks] = vit.mask_token.expand(int(masks.sum()), -1)
        tokens = torch.cat((vit.cls_token.expand(2, -1, -1), tokens), dim=1)
        tokens = tokens + vit.interpolate_pos_encoding(tokens, 32, 32)  # (tests/test_vision_transformer.py's rule)
        for blk in vit.blocks:
            tokens = blk(tokens)
        tokens = vit.norm(tokens)
    torch.testing.assert_close(out["x_norm_clstoken"], tokens[:, 0])
    torch.testing.assert_close(out["x_norm_patchtokens"], tokens[:, 1:])
    torch.testing.assert_close(vit(x[1:]), out["x_norm_clstoken"][1:])  # an unmasked crop: forward's [CLS]


def test_a_separate_ibot_head_has_its_own_prototypes_and_keys():
    args = objective_args(ibot_separate_head=True, ibot_out_dim=24, koleo_loss_weight=0.0)
    dino = main_dino.DINO.build(args, utils.Distributed())
    keys = dino.state_dict()
    assert keys["student"]["module.ibot_head.last_layer.weight_v"].shape == (24, 256)
    assert "ibot_head.last_layer.weight_v" in keys["teacher"] and keys["ibot_patch_loss"]["center"].shape == (1, 1, 24)
    assert "module.backbone.mask_token" in keys["student"] and "backbone.mask_token" in keys["teacher"]
    monkey_masks = fixed_masks(3)
    dino.draw_masks = lambda batch, device: monkey_masks
    images = [torch.randn(3, 3, s, s) for s in (32, 32, 16, 16)]
    metrics = dino.train_step(images, epoch=0, momentum=0.99, teacher_temp=0.04)
    assert torch.isfinite(metrics["ibot_loss"]) and "koleo_loss" not in metrics


# ============ each default leaves the original's run ============

def test_defaults_are_the_originals():
    args = main_dino.get_args_parser().parse_args([])
    assert (args.ibot_loss_weight, args.koleo_loss_weight, args.layerwise_decay, args.patch_embed_lr_mult,
            args.layerscale, args.drop_path_uniform, args.ibot_separate_head, args.pretrained_weights) == \
        (0.0, 0.0, 1.0, 1.0, 0.0, False, False, "")
    assert (args.mask_sample_probability, tuple(args.mask_ratio_min_max)) == (0.5, (0.1, 0.5))  # DINOv2's, unused
    assert main_dino.Objectives.from_args(args) == main_dino.Objectives()


def test_default_flags_keep_the_originals_keys_groups_and_log():
    """With every new flag at its default: no mask token, no iBOT head or center in the checkpoint, the original's
    two parameter groups, and a step that logs only the [CLS] terms. (tests/test_fast_step.py checks that this step
    follows the original's, written out, over 5 fp32 steps.)"""
    args = objective_args(ibot_loss_weight=0.0, koleo_loss_weight=0.0)
    dino = main_dino.DINO.build(args, utils.Distributed())
    state = dino.state_dict()
    assert not any("mask_token" in k or "ibot_head" in k or "ls1" in k for k in state["student"])
    assert "ibot_patch_loss" not in state and len(state["optimizer"]["param_groups"]) == 2
    reference = utils.get_params_groups(dino.student)
    assert [len(g["params"]) for g in dino.optimizer.param_groups] == [len(g["params"]) for g in reference]
    metrics = dino.train_step([torch.randn(3, 3, s, s) for s in (32, 32, 16, 16)], 0, 0.99, 0.04)
    assert set(metrics) == {"loss", "dino_global_crops_loss", "dino_local_crops_loss", "teacher_entropy",
                            "teacher_batch_entropy", "kl"}


# ============ optimisation ============

def test_layerwise_decay_multipliers_follow_dinov2s_rule():
    """vit_tiny (12 blocks) at decay 0.5: block i trains at 0.5^(12 - i), the embeddings at 0.5^13 (the patch
    embedding times 0.2 more), the final norm and the heads at 1; no weight decay on biases and 1-D parameters."""
    args = objective_args(ibot_loss_weight=0.0, koleo_loss_weight=0.0, layerwise_decay=0.5, patch_embed_lr_mult=0.2,
                          use_bn_in_head=True, layerscale=1e-5)
    student = main_dino.build_networks(args, utils.Distributed())[0]
    groups = utils.get_params_groups_with_decay(student.module, 0.5, 0.2)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == 0.5 ** 12
    assert by_name["backbone.blocks.11.mlp.fc2.bias"]["lr_multiplier"] == 0.5
    assert by_name["backbone.blocks.4.ls1.gamma"]["lr_multiplier"] == 0.5 ** 8
    assert by_name["backbone.cls_token"]["lr_multiplier"] == by_name["backbone.pos_embed"]["lr_multiplier"] == 0.5 ** 13
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.5 ** 13)
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == by_name["head.mlp.0.weight"]["lr_multiplier"] == 1
    assert by_name["head.last_layer.weight_v"]["is_last_layer"] and not by_name["head.mlp.0.weight"]["is_last_layer"]
    # the original's weight-decay rule: the head's batch-norm weights (1-D) and the layer scales are not decayed
    names = ("head.mlp.1.weight", "backbone.blocks.4.ls1.gamma", "backbone.blocks.0.attn.qkv.bias",
             "backbone.blocks.0.attn.qkv.weight", "backbone.cls_token")
    assert [by_name[n]["wd_multiplier"] for n in names] == [0, 0, 0, 1, 1]
    fused = utils.fuse_params_groups(groups)
    assert sum(len(g["params"]) for g in fused) == len(groups)
    assert len({(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in fused}) == len(fused)

    dino = main_dino.DINO.build(args, utils.Distributed())
    schedules = main_dino.Schedules.build(args, 1, 10)
    schedules.apply(dino.optimizer, 5)
    lr, wd = schedules.lr[5], schedules.weight_decay[5]
    for group in dino.optimizer.param_groups:
        assert group["lr"] == pytest.approx(lr * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(wd * group["wd_multiplier"])


def test_layerscale_and_uniform_drop_path():
    vit = build_model("vit_tiny", patch_size=8, layerscale=1e-4, drop_path_rate=0.2, drop_path_uniform=True)
    assert all(torch.equal(b.ls1.gamma, torch.full((192,), 1e-4)) for b in vit.blocks)
    assert [b.drop_path.drop_prob for b in vit.blocks] == [0.2] * 12
    growing = build_model("vit_tiny", patch_size=8, drop_path_rate=0.2)
    assert growing.blocks[0].drop_path.__class__.__name__ == "Identity" and growing.blocks[11].drop_path.drop_prob == \
        pytest.approx(0.2)
    assert build_model("dinov2_vits14", layerscale=0.0).blocks[0].ls1.gamma[0].item() == pytest.approx(1e-5)


# ============ loading for evaluation, and from DINOv2's weights ============

def test_evaluation_loads_a_dino_vit_trained_with_layerscale_and_a_mask_token(tmp_path):
    torch.manual_seed(0)
    trained = build_model("vit_tiny", patch_size=8, layerscale=1e-5, mask_token=True).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "ckp.pth")
    plain = build_model("vit_tiny", patch_size=8)
    utils.load_pretrained_weights(plain, str(tmp_path / "ckp.pth"), "teacher", "vit_tiny", 8, fit_options=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), trained(x))
    with pytest.raises(utils.InputError, match="unexpected keys"):  # training loads into the layout of its flags
        utils.load_pretrained_weights(build_model("vit_tiny", patch_size=8), str(tmp_path / "ckp.pth"),
                                      "teacher", "vit_tiny", 8)


def test_dinov2_arch_continues_from_a_published_backbone(tmp_path, capsys):
    torch.manual_seed(1)
    published = build_model("dinov2_vits14_reg")  # DINOv2's layout: LayerScale, registers, mask token
    torch.save(published.state_dict(), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    args = objective_args(arch="dinov2_vits14_reg", patch_size=14, global_crops_size=28, local_crops_size=14,
                          pretrained_weights=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"),
                          output_dir=str(tmp_path / "out"))
    student, teacher, _ = main_dino.build_networks(args, utils.Distributed())
    for model in (student.module, teacher):
        for k, v in published.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[k], v), k
    assert student.module.backbone.mask_token.requires_grad  # iBOT trains it
    assert "holds a backbone only: the DINO head start" in capsys.readouterr().out


# ============ bad input ============

@pytest.mark.parametrize("flags,message", [
    ("--mask_ratio_min_max 0.5 0.1", "--mask_ratio_min_max 0.5 0.1: expected min <= max"),
    ("--mask_ratio_min_max 0.1 1.5", "--mask_ratio_min_max 0.1 1.5: each value must be in [0, 1]"),
    ("--mask_sample_probability 1.2", "--mask_sample_probability 1.2: must be in [0, 1]"),
    ("--ibot_loss_weight -1", "--ibot_loss_weight -1.0: must be >= 0"),
    ("--koleo_loss_weight -0.1", "--koleo_loss_weight -0.1: must be >= 0"),
    ("--layerwise_decay 0", "--layerwise_decay 0.0: must be in (0, 1]"),
    ("--layerwise_decay 1.1", "--layerwise_decay 1.1: must be in (0, 1]"),
    ("--ibot_loss_weight 1 --arch resnet18",
     "--ibot_loss_weight 1: iBOT masks patch tokens, which --arch resnet18 does not have (use a ViT)"),
    ("--ibot_loss_weight 1 --mask_sample_probability 0.1 --batch_size_per_gpu 2",
     "--mask_sample_probability 0.1: masks none of the 4 global crops of a batch (int(4 x p) = 0); raise it or the "
     "batch"),
    ("--ibot_loss_weight 1 --mask_ratio_min_max 0 0.001",
     "--mask_ratio_min_max 0 0.001: masks no patch of the 196 of a global crop (int(196 x 0.001) = 0)"),
    ("--koleo_loss_weight 0.1 --batch_size_per_gpu 1",
     "--koleo_loss_weight 0.1: KoLeo compares each image with its nearest neighbour in the batch; "
     "--batch_size_per_gpu 1 has none"),
    ("--layerwise_decay 0.9 --arch resnet18",
     "--layerwise_decay 0.9: decays the lr over the blocks of DINO's and DINOv2's ViTs; --arch resnet18 is not one "
     "of them"),
    ("--pretrained_weights /no/such.pth", "--pretrained_weights /no/such.pth: no such file"),
])
def test_bad_objective_flags_are_one_line(flags, message):
    args = main_dino.get_args_parser().parse_args(flags.split())
    with pytest.raises(utils.InputError) as e:
        main_dino.check_args(args)
    assert str(e.value) == message


# ============ 2 processes ============

def _ibot_parts_of_rank(rank):
    torch.manual_seed(0)
    tokens = torch.randn(10, 6)  # 10 masked patches' teacher outputs: rank 0 holds 3 of them, rank 1 the other 7
    mine = tokens[:3] if rank == 0 else tokens[3:]
    loss = utils.iBOTPatchLoss(6)
    loss.update_center(mine)
    return loss.center, loss.sinkhorn_knopp_teacher(mine, 0.1, torch.tensor([len(mine)]))


@pytest.mark.slow
def test_ibot_in_2_processes_is_global_where_dinov2_is():
    """Sinkhorn-Knopp over the masked patches sums over processes, as DINOv2's: 2 processes give 1 process's
    assignment of all 10 patches. The center, as DINOv2's, averages the 2 processes' means (3 and 7 patches), which
    is not the mean of the 10 (KoLeo, likewise, compares each process's images among themselves)."""
    (center_0, q_0), (center_1, q_1) = run_in_gloo_processes(_ibot_parts_of_rank)
    torch.manual_seed(0)
    tokens = torch.randn(10, 6)
    expected = 0.1 * (tokens[:3].mean(0) + tokens[3:].mean(0)) / 2
    torch.testing.assert_close(center_0, expected.reshape(1, 1, 6))
    torch.testing.assert_close(center_1, center_0)
    assert not torch.allclose(center_0, 0.1 * tokens.mean(0).reshape(1, 1, 6))
    whole = utils.iBOTPatchLoss(6).sinkhorn_knopp_teacher(tokens, 0.1, torch.tensor([10]))
    torch.testing.assert_close(torch.cat((q_0, q_1)), whole)


# ============ a run with every option ============

@pytest.mark.slow
def test_a_run_with_every_objective_logs_resumes_and_evaluates(tmp_path):
    make_image_folder(str(tmp_path / "images"), per_class=4)
    cmd = ["main_dino.py", "--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32",
           "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4",
           "--num_workers", "0", "--warmup_epochs", "0", "--ibot_loss_weight", "1", "--koleo_loss_weight", "0.1",
           "--ibot_separate_head", "true", "--ibot_out_dim", "48", "--layerwise_decay", "0.9",
           "--patch_embed_lr_mult", "0.2", "--layerscale", "1e-5", "--drop_path_uniform", "true",
           "--centering", "sinkhorn_knopp", "--data_path", str(tmp_path / "images"),
           "--output_dir", str(tmp_path / "out")]
    run_script(cmd + ["--epochs", "1"])
    run_script(cmd + ["--epochs", "2"])
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.txt")]
    assert [r["epoch"] for r in log] == [0, 1]
    terms = ("train_dino_global_crops_loss", "train_dino_local_crops_loss", "train_ibot_loss", "train_koleo_loss")
    for line in log:
        assert sum(line[t] for t in terms) == pytest.approx(line["train_loss"], rel=1e-6)
        assert line["train_ibot_teacher_entropy"] > 0
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["ibot_patch_loss"]["center"].shape == (1, 1, 48)
    assert len(checkpoint["optimizer"]["param_groups"]) > 2  # the multipliers' groups

    # a resume whose options change the checkpoint's keys is one line
    proc = run_script(cmd + ["--epochs", "3", "--ibot_loss_weight", "0"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: checkpoint.pth in this --output_dir was trained with iBOT (--ibot_loss_weight > 0: a mask_token and "
        "the patch loss's center) on, this run has off: its networks have other keys; resume with its flags, or "
        "give another --output_dir"]

    # eval_knn reads the LayerScale and the mask token from the keys
    make_image_folder(str(tmp_path / "knn" / "train"), per_class=4)
    make_image_folder(str(tmp_path / "knn" / "val"), per_class=2, seed=1)
    proc = run_script(["eval_knn.py", "--arch", "vit_tiny", "--patch_size", "8", "--pretrained_weights",
                       tmp_path / "out" / "checkpoint.pth", "--data_path", tmp_path / "knn", "--resize_size", "32",
                       "--crop_size", "32", "--nb_knn", "3", "--num_workers", "0", "--use_cuda", "false"])
    assert "3-NN classifier result" in proc.stdout
