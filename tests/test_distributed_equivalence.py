"""Distributed training is the same algorithm: 2 gloo processes with B images each take the same DINO steps as
1 process with all 2 * B images (same loss, center, averaged gradients, student and teacher weights)."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import main_dino
import utils

B = 4  # images per process in the 2-process run; the 1-process run takes all 2 * B
NITER = 2  # iterations per epoch, 2 epochs: 2 steps with the head's last layer frozen (epoch 0), 2 with it free
RTOL, ATOL = 1e-5, 1e-6
CLIP = 0.05  # clips most parameters' (averaged) gradients at every step, not all of them


def tiny_args(batch_size_per_gpu, rank, world_size):
    """tests/test_fast_step.py's tiny model, with rank/world_size/gpu/device as main_dino's init would set them."""
    args = main_dino.get_args_parser().parse_args([])
    args.arch, args.patch_size, args.out_dim = "vit_tiny", 8, 64
    args.drop_path_rate = 0.0  # stochastic depth draws per image: the two runs could not draw the same ones
    args.global_crops_size, args.local_crops_size, args.local_crops_number = 32, 16, 2
    args.clip_grad = CLIP
    args.freeze_last_layer, args.compile, args.use_fp16 = 1, False, False
    args.epochs, args.warmup_epochs = 2, 0  # no warmup: the first step's lr is not 0
    # peak lr 0.005 * 8 / 256 = 1.6e-4 for the total batch of 8: the weights move by ~4e-4, and the loss does not
    # collapse (at 10x this lr it falls from 3.9 to 0.004 in 4 steps, and the gradients with it)
    args.lr = 0.005
    args.momentum_teacher = 0.9  # the teacher moves by 10% of its gap to the student each step, not by 0.4%
    args.batch_size_per_gpu = batch_size_per_gpu
    return args


def global_batch(args, it):
    """The crops of iteration `it` for the whole batch of 2 * B images, the same in every process."""
    g = torch.Generator().manual_seed(1000 + it)
    sizes = [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number
    return [torch.randn(2 * B, 3, s, s, generator=g) for s in sizes]


def run_steps(rank, world_size):
    """main_dino's setup, then NITER * epochs train_steps on this rank's rows of every crop, schedules set as
    main_dino sets them; returns the losses, the pre-clipping gradient norms, the center and the weights."""
    batch = 2 * B // world_size
    args = tiny_args(batch, rank, world_size)
    torch.manual_seed(0)  # the same initial weights in both runs (DDP would broadcast rank 0's anyway)
    dino = main_dino.DINO.build(args, utils.Distributed(rank=rank, world_size=world_size))
    student, teacher_without_ddp, dino_loss = dino.student, dino.teacher_without_ddp, dino.dino_loss
    schedules = main_dino.Schedules.build(args, world_size, NITER)  # the lr scales with the total batch, 2 * B

    # utils.clip_gradients returns the norms it clipped from: those of the gradients after DDP averaged them
    grad_norms, real_clip_gradients = [], utils.clip_gradients

    def recording_clip_gradients(model, clip):
        names = [n for n, p in model.named_parameters() if p.grad is not None]
        norms = real_clip_gradients(model, clip)
        grad_norms.append(dict(zip(names, norms.tolist())))
        return norms

    initial = {k: v.clone() for k, v in student.module.state_dict().items()}
    last_layer = student.module.head.last_layer.weight_v
    losses, frozen = [], []  # frozen: the step left the head's last layer as it was
    utils.clip_gradients = recording_clip_gradients
    try:
        for epoch in range(args.epochs):
            for i in range(NITER):
                it = NITER * epoch + i
                momentum, teacher_temp = schedules.apply(dino.optimizer, it)
                images = [c[rank * batch:(rank + 1) * batch] for c in global_batch(args, it)]
                last_layer_before = last_layer.detach().clone()
                loss = dino.train_step(images, epoch, momentum, teacher_temp)["loss"]
                losses.append(loss.item())
                frozen.append(torch.equal(last_layer, last_layer_before))
    finally:
        utils.clip_gradients = real_clip_gradients
    return {"losses": losses, "grad_norms": grad_norms, "frozen": frozen, "initial": initial,
            "center": dino_loss.center.clone(), "student": student.module.state_dict(),
            "teacher": teacher_without_ddp.state_dict()}


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(run_steps(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_weights(state, reference, what):
    """Every entry within rtol 1e-5 / atol 1e-6 but a few (at most 4 + 0.01% of a tensor), and those within 1e-5.

    The few: entries whose gradient is about AdamW's eps (1e-8). There the step lr * g / (|g| + eps) changes by
    lr / eps = 1.6e4 times any change of g, so the float rounding between the runs (one matmul over 2B rows
    against two over B rows averaged by DDP: 1e-6 of a tensor's largest gradient, ~5e-10) moves them by up to
    ~5e-6 (measured: 4.9e-6 at one entry of patch_embed, set at the first step). 1e-5 is 6% of that step's lr; a
    wrong gradient moves nearly every entry by about lr, since Adam's step is about lr wherever |g| >> eps.
    """
    assert state.keys() == reference.keys()
    for name, ref in reference.items():
        diff = (state[name] - ref).abs()
        apart = int((diff > RTOL * ref.abs() + ATOL).sum())
        assert apart <= 4 + 1e-4 * ref.numel(), f"{what} {name}: {apart} of {ref.numel()} entries apart"
        assert diff.max() <= 1e-5, f"{what} {name}: max difference {diff.max():.3g}"


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one_with_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = run_steps(0, 1)

    # the steps covered what they should: last layer frozen in epoch 0 only, clipping and not clipping every step
    assert single["frozen"] == ranks[0]["frozen"] == [True, True, False, False]
    for norms in single["grad_norms"]:
        assert 0 < sum(n > CLIP for n in norms.values()) < len(norms)

    # the replicas stay identical (DDP averages the same gradients into both, the center is reduced over both)
    for key in ("student", "teacher"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"the ranks' {key} {name} differ"
    center_gap = (ranks[0]["center"] - ranks[1]["center"]).abs().max()
    assert center_gap == 0, f"the ranks' centers differ by up to {center_gap:.3g}"

    # loss: each rank's is the mean over its B images, so the mean of the two is the mean over all 2B
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the ranks did see different images
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean_losses == pytest.approx(single["losses"], rel=RTOL, abs=ATOL)
    # the gradients clipping saw: DDP's average of the two ranks' gradients is the whole batch's gradient
    for step, (norms, ref) in enumerate(zip(ranks[0]["grad_norms"], single["grad_norms"])):
        assert norms.keys() == ref.keys()
        assert list(norms.values()) == pytest.approx(list(ref.values()), rel=RTOL), f"step {step}"
    # the center: the mean of the teacher outputs over both processes' images
    assert single["center"].abs().max() > 1e-2
    torch.testing.assert_close(ranks[0]["center"], single["center"], rtol=RTOL, atol=ATOL)

    # the weights moved far more than the tolerance, and to the same place
    moved = max((single["student"][k] - single["initial"][k]).abs().max() for k in single["initial"])
    assert moved > 1e-4
    assert_same_weights(ranks[0]["student"], single["student"], "student")
    assert_same_weights(ranks[0]["teacher"], single["teacher"], "teacher")
