"""CUDA paths of training: fp16 with GradScaler, bf16, NCCL. Skipped without a GPU."""
import math
import os
import socket

import pytest
import torch

from conftest import make_image_folder, run_script, script_env
from test_main_dino import read_log, tiny_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_env(n=1):
    env = script_env()
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_training_on_gpu(tmp_path, precision):
    data = make_image_folder(str(tmp_path / "data"), per_class=16)
    out = str(tmp_path / "out")
    flags = {"fp16": dict(use_fp16="true"), "bf16": dict(use_bf16="true"), "fp32": dict(use_fp16="false")}[precision]
    proc = run_script(tiny_args(data, out, epochs=2, **flags), env=gpu_env())
    assert "device cuda:0" in proc.stdout
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ("fp16_scaler" in ckpt) == (precision == "fp16")
    assert all(math.isfinite(r["train_loss"]) for r in read_log(out))


def test_attention_paths_agree_in_half_precision():
    from vision_transformer import Attention
    torch.manual_seed(0)
    attn = Attention(384, 6).cuda()
    x = torch.randn(4, 197, 384, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        fused, _ = attn(x)
        explicit, _ = attn(x, return_attention=True)
    torch.testing.assert_close(fused.float(), explicit.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_two_gpus_nccl(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=16)
    out = str(tmp_path / "out")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                       *tiny_args(data, out, epochs=1, batch_size_per_gpu=4)], env=gpu_env(2))
    assert "world size 2" in proc.stdout
    assert len(read_log(out)) == 1
