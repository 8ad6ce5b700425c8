"""utils.py: schedules, loss and center, clipping, parameter groups, EMA, multi-crop, checkpoints, weights, data."""
import argparse
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import utils
from conftest import make_image_folder, run_in_gloo_processes
from vision_transformer import build_model

# ============ schedules ============


def test_cosine_scheduler_matches_formula():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.0)
    warm = [0.0, 1 / 3, 2 / 3, 1.0]
    n = 8
    cos = [0.1 + 0.9 * (1 + math.cos(math.pi * i / n)) / 2 for i in range(n)]
    np.testing.assert_allclose(s, warm + cos)
    assert utils.cosine_scheduler(0.996, 1, 2, 5)[0] == 0.996


def test_teacher_temperature_schedule_and_bad_warmup():
    loss = utils.DINOLoss(16, 4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                          nepochs=5)
    np.testing.assert_allclose(loss.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07])
    with pytest.raises(utils.InputError, match="--warmup_teacher_temp_epochs 6 is more than --epochs 5"):
        utils.DINOLoss(16, 4, 0.04, 0.07, 6, 5)


# ============ loss and center ============


def slow_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """The loss written out with numpy: mean over cross-view pairs of the per-sample cross-entropy."""
    student, teacher, center = student.double().numpy(), teacher.double().numpy(), center.double().numpy()
    B = teacher.shape[0] // 2
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            per_sample = []
            for b in range(B):
                t = (teacher[iq * B + b] - center[0]) / teacher_temp
                q = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
                s = student[v * B + b] / student_temp
                logp = s - s.max() - np.log(np.exp(s - s.max()).sum())
                per_sample.append(-(q * logp).sum())
            total += np.mean(per_sample)
            terms += 1
    return total / terms


def test_dino_loss_and_center_update_on_a_tiny_example():
    torch.manual_seed(0)
    B, K, ncrops = 3, 7, 4
    student, teacher = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
    loss_fn = utils.DINOLoss(K, ncrops, 0.04, 0.04, 0, 10, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.fill_(0.5)
    loss = loss_fn(student, teacher, epoch=0)
    expected = slow_dino_loss(student, teacher, torch.full((1, K), 0.5), ncrops, 0.1, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # center: EMA with momentum 0.9 of the batch mean of the teacher outputs
    torch.testing.assert_close(loss_fn.center, 0.9 * 0.5 + 0.1 * teacher.mean(0, keepdim=True))



def test_dino_loss_forward_is_algorithm_1_in_its_three_methods():
    """forward = softmax_center_teacher (centre, sharpen), cross_entropy, update_center: the pieces train_step calls."""
    torch.manual_seed(1)
    B, K, ncrops = 4, 9, 6
    student, teacher = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
    whole, pieces = (utils.DINOLoss(K, ncrops, 0.04, 0.07, 3, 5) for _ in range(2))
    for loss_fn in (whole, pieces):
        loss_fn.center.copy_(torch.randn(1, K) * 0.1 if loss_fn is whole else whole.center)
    probs = pieces.softmax_center_teacher(teacher, 0.055)  # epoch 1 of the 3-epoch warmup 0.04 -> 0.07
    torch.testing.assert_close(probs, torch.softmax((teacher - whole.center) / 0.055, dim=-1))
    assert not probs.requires_grad
    loss = pieces.cross_entropy(student, probs)
    center_before = pieces.center.clone()
    assert torch.equal(pieces.center, center_before)  # only update_center moves it
    pieces.update_center(teacher)
    assert torch.equal(whole(student, teacher, epoch=1), loss)
    assert torch.equal(whole.center, pieces.center)
    expected = slow_dino_loss(student, teacher, center_before, ncrops, 0.1, 0.055)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _center_of_rank(rank):
    torch.manual_seed(rank)
    teacher = torch.randn(4, 5) + rank
    loss_fn = utils.DINOLoss(5, 2, 0.04, 0.04, 0, 1)
    loss_fn.update_center(teacher)
    return teacher, loss_fn.center.clone()


@pytest.mark.slow
def test_center_is_the_mean_over_all_processes():
    (t0, c0), (t1, c1) = run_in_gloo_processes(_center_of_rank)
    expected = 0.1 * torch.cat([t0, t1]).mean(0, keepdim=True)
    torch.testing.assert_close(c0, expected)
    torch.testing.assert_close(c1, expected)


# ============ optimisation ============


def test_per_parameter_clipping():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    grads = [torch.full_like(p, 0.01) if i == 0 else torch.full_like(p, 10.0)
             for i, p in enumerate(model.parameters())]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    norms = utils.clip_gradients(model, clip=3.0)
    for p, g, n in zip(model.parameters(), grads, norms):
        assert n.item() == pytest.approx(g.norm().item(), rel=1e-6)
        if g.norm() > 3.0:  # each parameter on its own is brought to norm 3
            assert p.grad.norm().item() == pytest.approx(3.0 * g.norm().item() / (g.norm().item() + 1e-6), rel=1e-5)
        else:
            torch.testing.assert_close(p.grad, g)


def test_params_groups_exclude_biases_and_norms_from_weight_decay():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    model[2].weight.requires_grad = False
    reg, not_reg = utils.get_params_groups(model)
    assert [p.shape for p in reg["params"]] == [torch.Size([4, 3])]
    assert [p.shape for p in not_reg["params"]] == [torch.Size([4]), torch.Size([4]), torch.Size([4])]
    assert not_reg["weight_decay"] == 0.0 and "weight_decay" not in reg


def test_last_layer_frozen_during_first_epochs():
    from vision_transformer import DINOHead
    head = DINOHead(8, 16, norm_last_layer=False)
    head(torch.randn(2, 8)).sum().backward()
    utils.cancel_gradients_last_layer(epoch=0, model=head, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None
    head(torch.randn(2, 8)).sum().backward()
    utils.cancel_gradients_last_layer(epoch=1, model=head, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is not None


def test_teacher_ema():
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    utils.update_teacher(student, teacher, momentum=0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_lars_step_by_hand():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = nn.Parameter(torch.tensor([1.0, 1.0]))
    p.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([0.5, 0.5])
    opt = utils.LARS([{"params": [p], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    opt.param_groups[0]["weight_decay"] = 0.1
    opt.step()
    dp = np.array([0.3, 1.4])  # grad + wd * p
    q = 0.001 * 5.0 / np.linalg.norm(dp)
    np.testing.assert_allclose(p.detach().numpy()[0], [3.0, 4.0] - 0.1 * q * dp, rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), [0.95, 0.95], rtol=1e-6)  # 1-D: no decay, no trust ratio


def test_bool_flag():
    assert utils.bool_flag("on") and utils.bool_flag("True") and utils.bool_flag("1")
    assert not (utils.bool_flag("off") or utils.bool_flag("false") or utils.bool_flag("0"))
    with pytest.raises(argparse.ArgumentTypeError):
        utils.bool_flag("maybe")


def test_local_rank_accepts_both_spellings():
    parser = argparse.ArgumentParser()
    utils.add_distributed_args(parser)
    assert parser.parse_args(["--local_rank", "3"]).local_rank == 3
    assert parser.parse_args(["--local-rank=2"]).local_rank == 2


def test_slurm_step_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(local_rank=0, dist_url="env://")
    assert utils.init_distributed_mode(args) == utils.Distributed(0, 1, 0, torch.device("cpu"))
    assert vars(args) == {"local_rank": 0, "dist_url": "env://"}  # the flags stay as parsed
    assert os.environ["MASTER_ADDR"] == "node7" and os.environ["MASTER_PORT"] == str(15000 + 123456 % 40000)
    # a requeued job (same id, next restart) gets another port: the old run's may not be free yet
    assert utils.slurm_port("123456", "1") != utils.slurm_port("123456", "0")
    assert len({utils.slurm_port(str(j)) for j in range(1000, 1100)}) == 100


# ============ multi-crop ============


class RecordingBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))


def test_multicrop_groups_consecutive_resolutions():
    backbone = RecordingBackbone()
    wrapper = utils.MultiCropWrapper(backbone, nn.Identity())
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(4)]
    out = wrapper(crops)
    assert backbone.calls == [(4, 3, 32, 32), (8, 3, 16, 16)]  # one backbone pass per resolution
    torch.testing.assert_close(out, torch.cat([c.mean(dim=(2, 3)) for c in crops]))


def test_data_augmentation_crops():
    aug = utils.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 3, global_crops_size=40, local_crops_size=16)
    crops = aug(Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8)))
    assert [tuple(c.shape) for c in crops] == [(3, 40, 40)] * 2 + [(3, 16, 16)] * 3
    default = utils.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 8)
    assert [tuple(c.shape[-2:]) for c in default(Image.new("RGB", (300, 250)))] == [(224, 224)] * 2 + [(96, 96)] * 8


# ============ checkpoints and weights ============


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    utils.save_on_master({"epoch": 1}, path)

    def exploding_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        utils.save_on_master({"epoch": 2}, path)
    monkeypatch.undo()
    assert utils.torch_load(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temp file left behind


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_torch_load_allows_namespace_but_never_runs_code(tmp_path):
    ok = str(tmp_path / "original.pth")
    # as the original wrote them: args pickled as a Namespace, numpy floats in the optimizer state
    torch.save({"args": argparse.Namespace(arch="vit_small"), "epoch": 3,
                "optimizer": {"param_groups": [{"lr": np.float64(1e-4), "weight_decay": np.float64(0.04)}]}}, ok)
    loaded = utils.torch_load(ok)
    assert loaded["args"].arch == "vit_small" and loaded["optimizer"]["param_groups"][0]["lr"] == 1e-4
    evil = str(tmp_path / "evil.pth")
    torch.save({"x": Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        utils.torch_load(evil)


def test_pretrained_weights_prefix_rules_and_strictness(tmp_path):
    torch.manual_seed(0)
    source = build_model("vit_tiny", patch_size=16)
    full = {"teacher": {**{f"backbone.{k}": v for k, v in source.state_dict().items()},
                        "head.mlp.0.weight": torch.zeros(3)},
            "student": {f"module.backbone.{k}": v + 1 for k, v in source.state_dict().items()}}
    path = str(tmp_path / "checkpoint.pth")
    torch.save(full, path)
    for key, shift in (("teacher", 0), ("student", 1)):
        model = build_model("vit_tiny", patch_size=16)
        utils.load_pretrained_weights(model, path, key, "vit_tiny", 16)
        torch.testing.assert_close(model.pos_embed, source.pos_embed + shift)
    with pytest.raises(utils.InputError, match=r"no key 'momentum'.*teacher, student"):
        utils.load_pretrained_weights(build_model("vit_tiny"), path, "momentum", "vit_tiny", 16)
    with pytest.raises(utils.InputError, match=r"pos_embed \[1, 197, 192\] in file vs \[1, 785, 192\] in model"):
        utils.load_pretrained_weights(build_model("vit_tiny", patch_size=8), path, "teacher", "vit_tiny", 8)
    with pytest.raises(utils.InputError, match="no such file"):
        utils.load_pretrained_weights(build_model("vit_tiny"), str(tmp_path / "typo.pth"), "teacher", "vit_tiny", 16)


def test_published_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    assert utils.published_weights_url("vit_small", 16) == url
    with pytest.raises(utils.InputError, match="could not download " + url):
        utils.load_pretrained_weights(build_model("vit_small"), "", "teacher", "vit_small", 16)


# ============ data ============


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    root = make_image_folder(str(tmp_path / "data"), n_classes=2, per_class=3)
    bad = os.path.join(root, "class1", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    dataset = utils.ImageFolderSkipBad(root)
    images = [dataset[i][0] for i in range(len(dataset))]
    assert len(images) == 7 and all(img.size == (32, 32) for img in images)
    assert dataset.num_skipped() == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "broken.jpg" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: skipping unreadable image")
    dataset[[s[0] for s in dataset.samples].index(bad)]
    assert "broken.jpg" not in capsys.readouterr().err


def test_image_folder_errors(tmp_path):
    with pytest.raises(utils.InputError, match="does not exist"):
        utils.check_image_folder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(utils.InputError, match="no class subfolders"):
        utils.check_image_folder(str(tmp_path / "empty"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(utils.InputError, match="must sit in <root>/<class>/"):
        utils.check_image_folder(str(tmp_path / "flat"))
    (tmp_path / "noimg" / "c").mkdir(parents=True)
    (tmp_path / "noimg" / "c" / "notes.txt").write_text("x")
    with pytest.raises(utils.InputError, match="no images"):
        utils.check_image_folder(str(tmp_path / "noimg"))
