"""GPU paths: AMP bf16/fp16, channels_last, torch.compile, pinned-memory loaders, torchrun with nccl, export parity
with the model on CUDA. Marked `gpu` and skipped without CUDA; run them whenever a GPU machine is at hand:
`python -m pytest -m gpu`."""

import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml

from finetune import export, predict, train

from conftest import make_folder, tiny_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("gpu") / "data", per_class=16, size=64)


def _cuda(**train_options):
    return tiny_recipe(data={"test_fraction": 0.2}, train={"epochs": 2, "device": "cuda", **train_options})


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_with_finite_losses(tmp_path, data, amp):
    result = train(recipe=_cuda(amp=amp), data=data, out=tmp_path / amp, progress=False)
    assert np.isfinite(result.history[["train_loss", "val_loss"]].to_numpy()).all()
    assert result.report.metrics["num_images"] > 0


def test_channels_last_gives_the_contiguous_results(tmp_path, data, monkeypatch):
    # TF32 (cuDNN's default for fp32 convolutions) rounds differently per layout; training then drifts apart by
    # ~2% in two epochs, so the layouts are compared without it: one forward to 1e-4, and the first epoch's loss
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    plain = train(recipe=_cuda(amp="off", feature_cache="off"), data=data, out=tmp_path / "plain", progress=False)
    nhwc = train(
        recipe=_cuda(amp="off", feature_cache="off", channels_last=True), data=data, out=tmp_path / "nhwc", progress=False
    )
    np.testing.assert_allclose(nhwc.history["train_loss"].iloc[0], plain.history["train_loss"].iloc[0], rtol=1e-3)
    model = timm.create_model("resnet18", num_classes=3).cuda().eval()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        contiguous = model(images)
        channels_last = model.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, contiguous, atol=1e-4, rtol=1e-4)


def test_compile_trains_and_saves_plain_checkpoints(tmp_path, data):
    result = train(recipe=_cuda(compile=True), data=data, out=tmp_path / "compiled", progress=False)
    keys = torch.load(result.best_checkpoint, weights_only=True)["state_dict"].keys()
    assert not any(k.startswith("_orig_mod.") for k in keys)


def test_training_loaders_pin_memory_on_cuda(tmp_path, data, monkeypatch):
    from finetune.training import loop

    pinned = []
    real = loop.make_loader

    def spy(*args, **kwargs):
        pinned.append(kwargs.get("pin_memory", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "make_loader", spy)
    train(recipe=_cuda(feature_cache="off", epochs=1), data=data, out=tmp_path / "pin", progress=False)
    assert True in pinned


def _torchrun(processes: int, recipe: dict, data, out) -> subprocess.CompletedProcess:
    (out.parent / "r.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "finetune", "train", str(out.parent / "r.yaml"), "--data", str(data), "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_torchrun_with_one_process_trains_alone_on_the_gpu(tmp_path, data):
    """One process joins no group (a group of one would gain nothing; NCCL itself is checked by
    test_nccl_initialises_and_runs_collectives_on_one_gpu): the log says rank 0 of 1 on cuda:0, and the run is complete."""
    done = _torchrun(1, _cuda(), data, tmp_path / "one")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchrun with one process: rank 0 of 1, no process group joined; training on cuda:0" in done.stderr
    assert "joined (" not in done.stderr
    history = pd.read_csv(tmp_path / "one" / "metrics.csv")
    assert list(history["epoch"]) == [1, 2]
    assert torch.load(tmp_path / "one" / "checkpoints" / "best.pt", weights_only=True)["state_dict"]


NCCL_OF_ONE = """
import os, torch, torch.distributed as dist
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
assert dist.get_backend() == "nccl"
tensor = torch.arange(4.0, device="cuda")
dist.all_reduce(tensor)  # a real NCCL collective (world size 1: the sum is the tensor itself)
dist.barrier()
pieces = [None]
dist.all_gather_object(pieces, {"rank": dist.get_rank()})
assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0] and pieces == [{"rank": 0}]
print("nccl", torch.cuda.nccl.version(), "on", torch.cuda.get_device_name(0), "ok")
dist.destroy_process_group()
"""


def test_nccl_initialises_and_runs_collectives_on_one_gpu(tmp_path):
    """NCCL refuses two ranks on one device, so one GPU checks NCCL with a group of one: it initialises over TCP,
    all-reduces a CUDA tensor, meets a barrier and gathers objects (what finetune's DDP path calls), in a fresh process
    so no group outlives the test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", NCCL_OF_ONE], capture_output=True, text=True, timeout=300, env={**os.environ, "PORT": str(port)}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nccl" in done.stdout and "ok" in done.stdout


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="NCCL refuses two ranks on one GPU: this needs two GPUs (test_nccl_initialises_and_runs_collectives_on_one_gpu "
    "checks NCCL on one)",
)
def test_torchrun_joins_an_nccl_group_on_two_gpus(tmp_path, data):
    done = _torchrun(2, _cuda(), data, tmp_path / "two")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 0 of 2 joined (nccl) on cuda:0" in done.stderr  # rank 1 logs errors only (rank 0 speaks for the job)
    history = pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert list(history["epoch"]) == [1, 2]  # rank 0 alone writes: one row per epoch


def test_export_parity_for_a_model_trained_on_cuda(tmp_path, data):
    run = train(recipe=_cuda(), data=data, out=tmp_path / "run", progress=False).run_dir
    exported = export(run=run, out=tmp_path / "export", formats="onnx", progress=False)
    assert exported.parity["onnx"]["top1_agreement"] == 1.0
    images = sorted(data.rglob("*.*"))[:8]
    np.testing.assert_allclose(
        predict(run=exported.files["onnx"], inputs=images, progress=False)["confidence"],
        predict(run=run, inputs=images, progress=False)["confidence"],
        atol=1e-3,
    )
