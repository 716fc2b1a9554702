"""`torchrun --nproc_per_node=2 -m finetune train` on CPU (gloo) gives the single-process result, and resumes; so do
two torchrun launches joined as two nodes by c10d rendezvous on 127.0.0.1, also after one of them is killed."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from finetune import train
from finetune.cli import app
from finetune.config.loading import recipe_from_dict

from conftest import tiny_recipe

# 18 training images: one batch of 18 in one process = one batch of 9 on each of 2 ranks (gradients averaged).
# No augmentation and no BatchNorm in train mode (each rank would normalise with its own batch statistics),
# so the two runs see the same numbers up to float rounding.
RECIPE = tiny_recipe(
    data={"batch_size": 18},
    transforms={"train": "none"},
    train={
        "epochs": 2,
        "lr": 0.05,
        "optimizer": "sgd",
        "freeze": ["stem", "layer1", "layer2", "layer3", "layer4"],
        "feature_cache": "off",
    },
)
COLUMNS = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1"]


def _torchrun(*args):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "finetune",
        "train",
        *map(str, args),
        "--quiet",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state_dict"]


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(state):
    if state.epoch == 1:
        raise _Interrupt


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from conftest import make_folder

    root = tmp_path_factory.mktemp("ddp")
    data = make_folder(root / "data")
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    result = train(recipe=recipe_from_dict(RECIPE), data=data, out=root / "single", progress=False)
    return root, data, result.run_dir


def _same_as_single(run, single_run):
    a, b = _weights(single_run), _weights(run)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    history, expected = pd.read_csv(run / "metrics.csv"), pd.read_csv(single_run / "metrics.csv")
    assert list(history["epoch"]) == [1, 2]  # rank 0 alone writes: one row per epoch
    pd.testing.assert_frame_equal(history[COLUMNS], expected[COLUMNS], atol=1e-4)


def test_two_processes_match_one(single):
    root, data, single_run = single
    done = _torchrun(root / "recipe.yaml", "--data", data, "--out", root / "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("accuracy") == 1  # one summary line, from rank 0
    _same_as_single(root / "ddp", single_run)
    assert (root / "ddp" / "report" / "report.html").exists()


def test_torchrun_resumes_a_run(single):
    root, data, single_run = single
    run = root / "interrupted"
    with pytest.raises(_Interrupt):
        train(recipe=recipe_from_dict(RECIPE), data=data, out=run, progress=False, on_epoch_end=_stop_after_first_epoch)
    done = _torchrun("--resume", run)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_as_single(run, single_run)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(entry: list[str], *, timeout: float = 240) -> list[tuple[int, str]]:
    """The same torchrun command started twice, as two nodes of one process each meeting at a c10d rendezvous on
    127.0.0.1 (what each machine of a real job runs, with the first machine's address); (returncode, stderr) of each.
    A launch still running after `timeout` is killed (its own process group) and reads as -9."""
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    command += [f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test{port}", "--local-addr=127.0.0.1", *entry]
    launches = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(2)
    ]
    ended = []
    for launch in launches:
        try:
            _, err = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            _, err = launch.communicate()
        ended.append((launch.returncode, err))
    return ended


# The process of global rank 1 kills its own torchrun launch (its "node") with SIGKILL, then itself, once rank 0
# has written epoch 1's last.pt (atomically: a file that is there is whole). Killing at once raced rank 0's write
# on a loaded machine: the surviving agent could lose its rendezvous store and stop rank 0 before it wrote.
DYING_NODE = """
    import os, signal, sys, time
    from pathlib import Path
    import torch
    from finetune import train

    def _epoch_one_written(last):
        return last.exists() and torch.load(last, weights_only=True)["epoch"] == 1

    def node_dies(state):
        if state.epoch == 1 and os.environ["RANK"] == "1":
            last, deadline = Path(sys.argv[3]) / "checkpoints" / "last.pt", time.monotonic() + 120
            while not _epoch_one_written(last) and time.monotonic() < deadline:
                time.sleep(0.1)
            os.kill(os.getppid(), signal.SIGKILL)
            os._exit(1)

    train(recipe=sys.argv[1], data=sys.argv[2], out=sys.argv[3], progress=False, on_epoch_end=node_dies)
"""


def test_two_nodes_match_one_process(single):
    root, data, single_run = single
    ended = _two_nodes(["-m", "finetune", "train", str(root / "recipe.yaml"), "--data", str(data), "--out", str(root / "nodes")])
    assert [code for code, _ in ended] == [0, 0], ended[0][1][-3000:] + ended[1][1][-3000:]
    assert sum("rank 0 of 2 joined (gloo) on cpu, node" in err for _, err in ended) == 1  # one global rank 0, on one node
    _same_as_single(root / "nodes", single_run)  # written once: one metrics.csv row per epoch
    assert (root / "nodes" / "report" / "report.html").exists()


def test_two_nodes_resume_after_one_is_killed(single, tmp_path):
    root, data, single_run = single
    run, script = root / "killed", tmp_path / "node_dies.py"
    script.write_text(textwrap.dedent(DYING_NODE))
    ended = _two_nodes([str(script), str(root / "recipe.yaml"), str(data), str(run)], timeout=240)
    assert all(code != 0 for code, _ in ended)  # the killed node, and the one whose peer vanished
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    ended = _two_nodes(["-m", "finetune", "train", "--resume", str(run), "--quiet"])
    assert [code for code, _ in ended] == [0, 0], ended[0][1][-3000:] + ended[1][1][-3000:]
    _same_as_single(run, single_run)


def test_a_lost_peer_ends_the_process_in_one_line_saying_how_to_resume():
    from finetune.errors import TrainingError
    from finetune.training.distributed import Ranks, peers_watched

    gloo = "[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4502. This is typically caused"
    with pytest.raises(TrainingError) as caught, peers_watched(Ranks(rank=0, world=2), run=Path("runs/a")):
        raise RuntimeError(gloo + " by a remote worker crashing. Check the logs of the remote worker.\nmore")
    assert str(caught.value) == (
        "another process of this torchrun job stopped or became unreachable (Connection closed by peer [127.0.0.1]:4502); "
        "the epochs finished before it are checkpointed: run the same torchrun command with "
        "'finetune train --resume runs/a' on every node"
    )
    with pytest.raises(RuntimeError, match="shape mismatch"), peers_watched(Ranks(rank=0, world=2), run=Path("x")):
        raise RuntimeError("shape mismatch")  # not the process group's: a bug keeps its traceback
    with pytest.raises(RuntimeError, match="gloo"), peers_watched(Ranks(), run=Path("x")):
        raise RuntimeError("gloo")  # one process: no peers to lose


def test_torchrun_needs_an_out_folder():
    done = CliRunner().invoke(app, ["train", "recipes/quickstart.yaml"], env={"WORLD_SIZE": "2", "RANK": "0"})
    assert (
        done.exit_code == 2
        and "error: under torchrun every process must write to the same run folder: pass --out RUN" in done.output
    )


def test_unsupported_torchrun_settings_say_so(monkeypatch, image_folder):
    from finetune.data.loader import ImageDataset, make_loader
    from finetune.errors import DataError, RecipeError
    from finetune.training.distributed import setup

    dataset = ImageDataset([str(p) for p in sorted(image_folder.rglob("*.*"))][:4], [0, 1, 0, 1], None)
    with pytest.raises(DataError, match="data.sampler: weighted is not supported under torchrun; use sampler: shuffle"):
        make_loader(dataset, batch_size=2, num_workers=0, shuffle=True, seed=0, balanced=True, rank=0, world=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="train.device is cuda but no GPU is visible; use train.device: auto"):
        setup("cuda")
