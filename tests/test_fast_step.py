"""The lean training step follows the plain one: same losses and weights over several fp32 steps on CPU; torch.compile
changes nothing; the benchmark runs on CPU. On a GPU: no host synchronisation inside a step."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import main_dino
import utils
from conftest import run_script


def tiny_args(**overrides):
    args = main_dino.get_args_parser().parse_args([])
    args.arch, args.patch_size, args.out_dim, args.drop_path_rate = "vit_tiny", 8, 64, 0.1
    args.global_crops_size, args.local_crops_size, args.local_crops_number = 32, 16, 3
    args.clip_grad, args.freeze_last_layer, args.compile = 0.05, 1, False
    args.use_fp16 = False
    vars(args).update(overrides)
    return args


ONE_CPU = utils.Distributed()  # what init_distributed_mode finds in one process without a GPU


def crops(args, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def set_schedules(optimizer, lr, wd):
    for j, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if j == 0:
            group["weight_decay"] = wd


class PlainDINO:
    """The original's step written out without any of the speed-ups: explicit attention, a log-softmax for each
    (teacher crop, student crop) pair, a Python loop per parameter for clipping and EMA, AdamW's for-loop."""

    def __init__(self, student, teacher, args, teacher_temp=0.04):
        self.student, self.teacher, self.args, self.teacher_temp = student, teacher, args, teacher_temp
        self.center = torch.zeros(1, args.out_dim)
        self.optimizer = torch.optim.AdamW(utils.get_params_groups(student), foreach=False)
        self.clipped = set()  # names of parameters whose gradient was clipped at least once

    def step(self, images, epoch, momentum):
        ncrops = len(images)
        with sdpa_kernel(SDPBackend.MATH):
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
        student_out = (student_output / 0.1).chunk(ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total, terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(ncrops):
                if v != iq:
                    total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                    terms += 1
        loss = total / terms
        self.center = 0.9 * self.center + 0.1 * teacher_output.detach().mean(0, keepdim=True)

        self.optimizer.zero_grad()
        loss.backward()
        for name, p in self.student.named_parameters():
            if p.grad is not None:
                coef = self.args.clip_grad / (p.grad.norm(2).item() + 1e-6)
                if coef < 1:
                    p.grad.mul_(coef)
                    self.clipped.add(name)
        if epoch < self.args.freeze_last_layer:
            for name, p in self.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        self.optimizer.step()
        with torch.no_grad():
            for p_s, p_t in zip(self.student.module.parameters(), self.teacher.parameters()):
                p_t.mul_(momentum).add_((1 - momentum) * p_s)
        return loss.detach()


def build_pair(args):
    """main_dino's networks, and an identical deep copy for the plain reference."""
    torch.manual_seed(0)
    student, teacher, teacher_without_ddp = main_dino.build_networks(args, ONE_CPU)
    return (student, teacher, teacher_without_ddp), (copy.deepcopy(student), copy.deepcopy(teacher))


def run_lean(nets, args, steps, compile_backend=None):
    student, teacher, teacher_without_ddp = nets
    if compile_backend:
        for model in (student.module, teacher_without_ddp):
            model.compile_parts(backend=compile_backend)
    dino_loss = utils.DINOLoss(args.out_dim, args.local_crops_number + 2, 0.04, 0.04, 0, 2)
    optimizer = utils.build_optimizer("adamw", utils.get_params_groups(student), fused=True)
    autocast, fp16_scaler = main_dino.build_precision(args, ONE_CPU.device)
    dino = main_dino.DINO(student, teacher, teacher_without_ddp, dino_loss, optimizer, autocast, fp16_scaler,
                          args.clip_grad, args.freeze_last_layer)
    losses = []
    for i, (epoch, lr, wd, momentum) in enumerate(steps):
        set_schedules(optimizer, lr, wd)
        torch.manual_seed(100 + i)  # the same stochastic-depth draws in both runs
        losses.append(dino.train_step(crops(args, seed=i), epoch, momentum, 0.04)["loss"].item())
    return losses


def run_plain(student, teacher, args, steps):
    """PlainDINO's losses over steps, with run_lean's crops and stochastic-depth draws; returns (PlainDINO, losses)."""
    plain = PlainDINO(student, teacher, args)
    losses = []
    for i, (epoch, lr, wd, momentum) in enumerate(steps):
        set_schedules(plain.optimizer, lr, wd)
        torch.manual_seed(100 + i)
        losses.append(plain.step(crops(args, seed=i), epoch, momentum).item())
    return plain, losses


# (epoch, lr, weight decay, teacher momentum): the last layer frozen, then free; the weight decay large enough that
# leaving it out of a group would show in the weights (lr * wd = 4e-4 of each weight per step)
STEPS = [(0, 1e-3, 0.1, 0.99), (0, 2e-3, 0.2, 0.99), (1, 2e-3, 0.3, 0.995), (1, 1e-3, 0.4, 0.995),
         (1, 1e-3, 0.4, 0.999)]


def test_lean_step_follows_the_plain_fp32_step():
    args = tiny_args()
    (student, teacher, teacher_without_ddp), (plain_student, plain_teacher) = build_pair(args)
    lean_losses = run_lean((student, teacher, teacher_without_ddp), args, STEPS)

    plain, plain_losses = run_plain(plain_student, plain_teacher, args, STEPS)

    assert all(math.isfinite(x) for x in lean_losses)
    assert lean_losses == pytest.approx(plain_losses, rel=1e-5)
    assert len(set(lean_losses)) == len(STEPS)  # the weights moved: every step saw a different loss
    # clipping took effect on some parameters and not on others, so both branches of the rule were compared
    names = [n for n, _ in plain_student.named_parameters()]
    assert 0 < len(plain.clipped) < len(names)
    assert_same_weights(student, plain_student, STEPS)
    assert_same_weights(teacher, plain_teacher, STEPS)


def test_bf16_step_on_cpu_follows_the_plain_fp32_step():
    """The CPU fast path (bf16 autocast, where the attention takes the explicit product) keeps the mathematics:
    its losses follow the plain fp32 step's to bf16's precision, step after step."""
    args = tiny_args(use_bf16=True)
    (student, teacher, teacher_without_ddp), (plain_student, plain_teacher) = build_pair(args)
    bf16_losses = run_lean((student, teacher, teacher_without_ddp), args, STEPS)
    _, plain_losses = run_plain(plain_student, plain_teacher, args, STEPS)
    assert bf16_losses == pytest.approx(plain_losses, rel=2e-2)
    assert bf16_losses != pytest.approx(plain_losses, rel=1e-6)  # it did run in bf16


def test_attention_takes_the_explicit_product_on_cpu_in_bf16_and_computes_the_same(monkeypatch):
    from vision_transformer import Attention
    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=4)
    x = torch.randn(3, 17, 64)
    reference, _ = attn(x)  # fp32: the fused kernel
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = attn(x)
    assert not calls  # the explicit product, not the fused kernel (2-5x slower in bf16 on CPU)
    attn(x)
    assert calls  # fp32 keeps the fused kernel
    torch.testing.assert_close(fast.float(), reference, rtol=3e-2, atol=3e-2)


def assert_same_weights(model, reference, steps):
    """Equal weights up to float noise, as Adam lets it be: an entry whose gradient is at the noise level moves by
    about lr whatever the gradient's sign. So: no entry apart by more than Adam's largest steps, and all but a few
    entries equal to 1e-4, except in the key part of qkv.bias, whose gradient is exactly 0 in exact arithmetic
    (softmax ignores a constant added to all scores of a query): there every entry is float noise."""
    largest_moves = 2 * sum(lr for _, lr, _, _ in steps)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        p, p_ref = p.detach(), p_ref.detach()
        assert (p - p_ref).abs().max() <= largest_moves, name
        if name.endswith("attn.qkv.bias"):
            (q, _, v), (q_ref, _, v_ref) = p.chunk(3), p_ref.chunk(3)
            p, p_ref = torch.cat([q, v]), torch.cat([q_ref, v_ref])
        apart = (p - p_ref).abs() > 1e-4 * p_ref.abs() + 1e-6
        assert apart.sum() <= max(3, 0.01 * p.numel()), (name, int(apart.sum()))


@pytest.mark.slow
def test_compiled_step_follows_eager():
    """torch.compile of backbone and head (static shapes per resolution) computes the same steps.

    The aot_eager backend traces exactly what inductor would get (graphs, AOT autograd) but skips code
    generation, which takes minutes on CPU; the GPU benchmark runs the real one.
    """
    args = tiny_args(local_crops_number=2)
    eager_nets, _ = build_pair(args)
    compiled_nets, _ = build_pair(args)
    steps = STEPS[1:4]
    eager = run_lean(eager_nets, args, steps)
    compiled = run_lean(compiled_nets, args, steps, compile_backend="aot_eager")
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert_same_weights(compiled_nets[0], eager_nets[0], steps)
    assert_same_weights(compiled_nets[1], eager_nets[1], steps)


def test_compile_flag_keeps_the_checkpoint_keys():
    args = tiny_args()
    torch.manual_seed(0)
    plain_keys = [set(m.state_dict()) for m in main_dino.build_networks(args, ONE_CPU)[:2]]
    args.compile = True
    student, teacher, teacher_without_ddp = main_dino.build_networks(args, ONE_CPU)
    assert [set(m.state_dict()) for m in (student, teacher)] == plain_keys
    for model in (student.module, teacher_without_ddp):
        compiled_backbone, compiled_features, compiled_head, compiled_ibot_head = model.__dict__["_compiled"]
        assert compiled_backbone._orig_mod is model.backbone and compiled_head._orig_mod is model.head
        assert compiled_ibot_head is None  # the DINO head serves iBOT's patches, when iBOT is on
        assert model.backbone._compiled_call_impl is None  # the backbone itself stays eager for the k-NN monitoring


def test_regrouped_loss_equals_the_sum_over_pairs_with_gradients():
    torch.manual_seed(0)
    batch, out_dim, ncrops = 3, 50, 10
    student_output = torch.randn(ncrops * batch, out_dim, requires_grad=True)
    teacher_output = torch.randn(2 * batch, out_dim)
    loss_fn = utils.DINOLoss(out_dim, ncrops, 0.04, 0.07, 0, 5)
    loss_fn.center.normal_()
    center = loss_fn.center.clone()
    loss = loss_fn(student_output, teacher_output, epoch=2)
    (grad,) = torch.autograd.grad(loss, student_output)

    s = student_output.detach().double().requires_grad_()
    q = F.softmax((teacher_output.double() - center.double()) / 0.07, dim=-1).chunk(2)
    logp = [F.log_softmax(c / 0.1, dim=-1) for c in s.chunk(ncrops)]
    pairs = [(iq, v) for iq in range(2) for v in range(ncrops) if v != iq]
    expected = sum((-q[iq] * logp[v]).sum(-1).mean() for iq, v in pairs) / len(pairs)
    (expected_grad,) = torch.autograd.grad(expected, s)
    assert len(pairs) == 18
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-5, atol=1e-7)


def test_fused_adamw_is_the_same_update_as_foreach():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))]
    models.append(copy.deepcopy(models[0]))
    optimizers = [utils.build_optimizer("adamw", utils.get_params_groups(m), fused=f)
                  for m, f in zip(models, (True, False))]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    for step in range(4):
        x = torch.randn(8, 5)
        for model, optimizer in zip(models, optimizers):
            set_schedules(optimizer, 0.01, 0.04 * (step + 1))
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            optimizer.step()
    for p_fused, p_foreach in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p_fused, p_foreach, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_benchmark_runs_on_cpu_and_prints_json_lines():
    proc = run_script(["benchmarks/bench_train.py", "--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64",
                       "--batch_size_per_gpu", "4", "--global_crops_size", "32", "--local_crops_size", "16",
                       "--local_crops_number", "2", "--iters", "2", "--warmup", "1", "--num_images", "16",
                       "--image_size", "48", "40", "--num_workers", "1", "--knn_batch_size", "8",
                       "--aug_worker_images", "8", "--variant", "lean", "original", "--augmentation", "gpu", "cpu",
                       "--objectives", "dino", "ibot_koleo"])
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # nothing but JSON lines on stdout
    stages = [(r["stage"], r.get("variant") or r.get("augmentation")) for r in records]
    assert stages == [("step", "lean"), ("step", "lean"), ("step", "original"), ("aug_worker", "cpu"),
                      ("aug_worker", "gpu"), ("aug_device", "gpu"), ("data", "gpu"), ("e2e", "gpu"), ("data", "cpu"),
                      ("e2e", "cpu"), ("knn_model", None), ("knn_e2e", None)]
    assert [r["objectives"] for r in records[:3]] == ["dino", "ibot_koleo", "dino"]  # the original has only DINO
    for r in records:
        assert r["images_per_s"] > 0 and r["device"] == "cpu" and r.get("peak_mem_gib") is None
    assert records[0]["crops"] == "2x32+2x16" and records[0]["batch_size"] == 4 and records[0]["autocast"] is None
    # --iters 2 under the default 5 rounds: 2 interleaved rounds of one step each, for every configuration
    assert [len(r["rounds_images_per_s"]) for r in records[:3]] == [2, 2, 2] and records[0]["iters"] == 2
    assert records[-1]["images"] == 16


@pytest.mark.slow
def test_step_profile_prints_the_shares_of_the_operators_time():
    proc = run_script(["benchmarks/profile_step.py", "--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64",
                       "--batch_size_per_gpu", "4", "--global_crops_size", "32", "--local_crops_size", "16",
                       "--local_crops_number", "2", "--steps", "1", "--warmup", "1"])
    record = json.loads(proc.stdout)
    shares = record["share_of_operator_time"]
    assert sum(shares.values()) == pytest.approx(1, abs=0.01) and shares["matrix products"] > 0.1
    assert record["matrix_products_gflop_per_s"] > 0 and record["seconds_per_step"] > 0


@pytest.mark.slow
def test_benchmark_bad_input_is_one_line(tmp_path):
    proc = run_script(["benchmarks/bench_train.py", "--stages", "e2e", "--data_path", str(tmp_path / "none")],
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: data folder {tmp_path / 'none'}: does not exist"]


# ============ on a GPU ============


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("objectives", [{}, {"ibot_loss_weight": 1.0, "koleo_loss_weight": 0.1,
                                             "centering": "sinkhorn_knopp"}], ids=["dino", "dinov2_objectives"])
def test_lean_step_never_waits_for_the_gpu(precision, objectives):
    """Not even with iBOT's masks: they are drawn on the host and copied over without waiting."""
    args = tiny_args(use_fp16=precision == "fp16", use_bf16=precision == "bf16", **objectives)
    dino = main_dino.DINO.build(args, utils.Distributed(device=torch.device("cuda", 0)))  # fused AdamW on CUDA
    set_schedules(dino.optimizer, 1e-3, 0.04)
    images = [c.cuda() for c in crops(args)]

    def step():
        return dino.train_step(images, 1, 0.996, 0.04)["loss"]

    step()  # first-call allocations and lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(x.item()) for x in losses)
