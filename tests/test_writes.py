"""Nothing lost, nothing mixed: a report is one evaluation (written aside, swapped in whole), every write the OS
refuses (a full disk, a file-size limit, a read-only place) is one line in every command, library warnings go
through logging, and a killed compare continues."""

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from finetune import compare, diff_reports, evaluate, train
from finetune.config.loading import recipe_from_dict
from finetune.errors import RunDirError
from finetune.files import published_together, replaced_folder
from finetune.run_dir import RunDir

from conftest import REPO, make_folder, tiny_recipe

FULL_DISK = OSError(errno.ENOSPC, "No space left on device")
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run, its data and a second labelled folder."""
    root = tmp_path_factory.mktemp("writes")
    data = make_folder(root / "data", per_class=6)
    result = train(recipe=recipe_from_dict(tiny_recipe()), data=data, out=root / "run", progress=False)
    return root, result.run_dir, data, make_folder(root / "new", per_class=3)


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _no_staging_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and (".new." in p.name or ".old." in p.name)]


# -- a report is one evaluation -------------------------------------------------------------------------------------

FAILURES = {
    "full disk": (FULL_DISK, RunDirError, r"^cannot write .*: the disk is full; .*run the command again$"),
    "size limit": (OSError(errno.EFBIG, "File too large"), RunDirError, r"larger than the file-size limit \(ulimit -f\)"),
    "torch's zip writer": (TORCH_FULL, RunDirError, r"the write failed \(a full disk or a file-size limit\)"),
    "read-only": (OSError(errno.EROFS, "Read-only file system"), RunDirError, r"^cannot write .*: Read-only file system"),
    "a bug": (ValueError("boom"), ValueError, "boom"),
    "Ctrl-C": (KeyboardInterrupt(), KeyboardInterrupt, ""),
}


@pytest.mark.parametrize("failure", list(FAILURES), ids=list(FAILURES))
def test_a_failed_folder_write_leaves_the_previous_folder_whole(tmp_path, failure):
    raised, kind, message = FAILURES[failure]
    out = tmp_path / "report"
    with replaced_folder(out, marker="metrics.json") as staging:
        (staging / "metrics.json").write_text("first")
        (staging / "only_in_first.csv").write_text("first")

    def second() -> None:
        with replaced_folder(out, marker="metrics.json") as staging:
            (staging / "metrics.json").write_text("second")
            raise raised

    with pytest.raises(kind, match=message):
        second()
    assert _contents(out) == {n: hashlib.sha256(b"first").hexdigest() for n in ("metrics.json", "only_in_first.csv")}
    _no_staging_left(tmp_path)


@pytest.fixture(scope="module")
def first_report(trained, tmp_path_factory):
    _, run, _, new = trained
    return evaluate(run=run, data=new, out=tmp_path_factory.mktemp("first") / "report", progress=False)


@pytest.mark.parametrize(
    ("stage", "failure"), [("tables", "full disk"), ("figures", "torch's zip writer"), ("page", "Ctrl-C"), ("page", "a bug")]
)
def test_a_failed_eval_leaves_the_previous_report_whole(trained, first_report, tmp_path, monkeypatch, stage, failure):
    from finetune.reporting import report as report_module

    _, run, _, new = trained
    out = Path(shutil.copytree(first_report.folder, tmp_path / "report"))
    before = _contents(out)
    target = {"tables": "predictions_table", "figures": "plot_reliability", "page": "render_html"}[stage]
    raised, kind, message = FAILURES[failure]

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(report_module, target, fail)
    with pytest.raises(kind, match=message):
        evaluate(run=run, data=new, out=out, progress=False)
    assert _contents(out) == before  # the previous evaluation, every file of it
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == first_report.metrics["accuracy"]
    _no_staging_left(tmp_path)


def test_a_new_report_replaces_the_old_one_whole_and_never_foreign_files(trained, first_report, tmp_path):
    _, run, _, new = trained
    out = Path(shutil.copytree(first_report.folder, tmp_path / "report"))
    (out / "augmentation_preview.png").write_bytes(b"from an older evaluation")
    report = evaluate(run=run, data=new, out=out, progress=False)
    assert report.folder == out and (out / "metrics.json").exists()
    assert (out / "augmentation_preview.png").read_bytes() != b"from an older evaluation"  # nothing of two evaluations
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(RunDirError, match=r"--out .*notes holds files that are not a finetune output \(no metrics.json\)"):
        evaluate(run=run, data=new, out=foreign, progress=False)
    assert (foreign / "mine.txt").read_text() == "keep me"
    for other in (run, foreign / "mine.txt"):  # a run folder, a file: never replaced by a diff either
        with pytest.raises(
            RunDirError, match=r"--out .*(holds files that are not a finetune output|is a file, not a folder|is the run folder)"
        ):
            diff_reports(run_a=run, run_b=run, out=other)
    assert (foreign / "mine.txt").read_text() == "keep me" and RunDir(run).is_run()


def test_staging_left_by_a_killed_writer_is_cleared(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".report.new.{dead.stdout.strip()}.abcd1234"
    left.mkdir()
    (left / "metrics.json").write_text("{}")
    with replaced_folder(tmp_path / "report", marker="metrics.json") as staging:
        (staging / "metrics.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


@pytest.mark.parametrize("failure", [FULL_DISK, KeyboardInterrupt()], ids=["full disk", "Ctrl-C"])
def test_files_published_together_keep_the_previous_set(tmp_path, failure):
    names = ("board.csv", "board_seeds.csv", "board.md")
    with published_together(tmp_path, names) as staging:
        for name in names:
            (staging / name).write_text("old")
    (tmp_path / "runs_of_mine").mkdir()  # what else the folder holds is never touched

    def failing() -> None:
        with published_together(tmp_path, names) as staging:
            (staging / "board.csv").write_text("new")
            raise failure

    with pytest.raises((RunDirError, KeyboardInterrupt)):
        failing()
    assert {n: (tmp_path / n).read_text() for n in names} == dict.fromkeys(names, "old")
    with published_together(tmp_path, names) as staging:
        (staging / "board.csv").write_text("new")
        (staging / "board.md").write_text("new")
    assert not (tmp_path / "board_seeds.csv").exists()  # a file of the previous set the new one lacks goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.csv", "board.md", "runs_of_mine"]


def test_report_diff_is_swapped_in_whole(trained, tmp_path, monkeypatch):
    from finetune.reporting import diff as diff_module

    _, run, _, _ = trained
    out = tmp_path / "diff"
    diff_module.diff_reports(run_a=run, run_b=run, out=out)
    before = _contents(out)
    monkeypatch.setattr(diff_module, "write_page", lambda *a, **k: (_ for _ in ()).throw(FULL_DISK))
    with pytest.raises(RunDirError, match=r"the disk is full"):
        diff_module.diff_reports(run_a=run, run_b=run, out=out)
    assert _contents(out) == before
    _no_staging_left(tmp_path)


def test_eval_on_new_images_after_the_training_images_moved(trained, tmp_path):
    root, run, data, new = trained
    moved = shutil.copytree(run, tmp_path / "run")
    shutil.move(data, tmp_path / "moved")  # the run's splits.csv now names files that are gone
    try:
        report = evaluate(run=moved, data=new, progress=False).folder
    finally:
        shutil.move(tmp_path / "moved", data)
    assert report == Path(moved) / "report"
    assert (report / "metrics.json").exists() and not (report / "augmentation_preview.png").exists()


# -- every write is guarded -----------------------------------------------------------------------------------------


LIMITED = textwrap.dedent(
    """
    import json, resource, signal, sys
    from typer.testing import CliRunner
    from finetune.cli import app

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    results = {}
    for name, args in json.loads(sys.argv[2]).items():
        result = CliRunner().invoke(app, args)
        results[name] = {"code": result.exit_code, "stderr": result.stderr, "crash": repr(result.exception)}
    print(json.dumps(results))
    """
)


def _limited(limit: int, commands: dict[str, list[str]]) -> dict[str, dict]:
    """Run CLI commands in a process whose files may not grow past `limit` bytes (ulimit -f)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", LIMITED, str(limit), json.dumps(commands)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_file_size_limit_is_one_line_in_every_command(trained, tmp_path):
    root, run, data, new = trained
    resumable = shutil.copytree(run, tmp_path / "resumable")
    (resumable / ".lock").unlink(missing_ok=True)  # resume's lock file is written again (the PID)
    picture = next(Path(new).rglob("*.jpg"))
    out = tmp_path / "out"
    commands = {
        "eval": ["eval", str(run), "--data", str(new), "--out", str(out / "eval")],
        "export": ["export", str(run), "--format", "torchscript", "--out", str(out / "export")],
        "predict": ["predict", str(run), str(new), "--out", str(out / "predictions.csv")],
        "check --json": ["check", str(new), "--json", str(out / "check.json")],
        "explain": ["explain", str(run), str(picture), "--out", str(out / "explain")],
        "resume's lock": ["train", "--resume", str(resumable)],
        "report diff": ["report", "diff", str(run), str(run), "--out", str(out / "diff")],
    }
    quiet = {name: [*args, "--quiet"] if name != "report diff" else args for name, args in commands.items()}
    reject = ["predict", str(run), str(new), "--reject", "auto", "--target-accuracy", "0.5", "--quiet"]
    results = _limited(0, quiet | {"--reject auto": reject})
    kept = results.pop("--reject auto")  # its reject.json is a record for people: the predictions still come
    assert kept["code"] == 0 and kept["stderr"].strip().endswith(
        "reject.json not written (File too large); the threshold above is used all the same"
    ), kept
    for name, result in results.items():
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2, (name, result)
        assert "Traceback" not in result["stderr"] and len(lines) == 1, (name, result["stderr"])
        assert "cannot write" in lines[0] and "file-size limit" in lines[0], (name, lines[0])
        assert ".tmp" not in lines[0] and "previous .lock" not in lines[0], lines[0]  # the file meant, no false comfort
    assert not (out / "eval").exists() and not (out / "diff").exists()  # nothing half-written


CHECKPOINT_LIMIT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from finetune import train
    from finetune.config.loading import recipe_from_dict

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def after(state):  # after epoch 1 is checkpointed, the disk "fills": no file may grow past 64 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))

    try:
        train(recipe=recipe_from_dict(json.loads(sys.argv[1])), data=sys.argv[2], out=sys.argv[3], progress=False,
              on_epoch_end=after)
    except Exception as exc:
        print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
    """
)


def test_a_checkpoint_torch_cannot_write_is_one_line_and_the_previous_stays(trained, tmp_path):
    """torch's zip writer raises RuntimeError (not OSError) when a write fails: still the one-line disk error."""
    _, _, data, _ = trained
    recipe = tiny_recipe(train={"epochs": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", CHECKPOINT_LIMIT, json.dumps(recipe), str(data), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    failure = json.loads(done.stdout.strip().splitlines()[-1])
    assert failure["type"] == "RunDirError", failure
    assert "\n" not in failure["message"]
    assert "checkpoints/" in failure["message"] and "is intact; free space" in failure["message"], failure
    assert f"finetune train --resume {tmp_path / 'run'}" in failure["message"]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1  # the previous checkpoint is whole (resuming from it: test_run_folder.py)


def test_a_tensorboard_folder_that_cannot_be_written_is_one_line(trained, tmp_path, monkeypatch):
    from tensorboard.summary.writer import record_writer
    from typer.testing import CliRunner

    from finetune.cli import app

    _, _, data, _ = trained
    recipe = tmp_path / "tb.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(log=["tensorboard"])))

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)  # fails in the writer's own thread
    result = CliRunner().invoke(app, ["train", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and "cannot write" in lines[0] and "tensorboard" in lines[0] and "disk is full" in lines[0]


# -- warnings through logging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("quiet", [False, True], ids=["shown", "--quiet"])
def test_library_warnings_go_through_logging_and_quiet_silences_them(tmp_path, monkeypatch, quiet):
    from PIL import Image
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.runs import check as check_module

    data = make_folder(tmp_path / "data", per_class=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 32 x 32 images: over the limit, under twice it (a warning)
    real = check_module.check_dataset

    def noisy(*args, **kwargs):
        np.log(np.zeros(1))  # numpy's RuntimeWarning: divide by zero
        return real(*args, **kwargs)

    monkeypatch.setattr(check_module, "check_dataset", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # the session swaps it; pytest's is kept
        args = ["check", str(data), *(["--quiet"] if quiet else [])]
        result = CliRunner().invoke(app, args, env={"FINETUNE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code in (0, 1), result.output
    said = result.stderr
    if quiet:
        assert "Warning" not in said and "warning:" not in said, said
    else:
        assert "warning: divide by zero encountered in log (RuntimeWarning)" in said, said
        assert "(DecompressionBombWarning)" in said, said
        assert "warnings.warn(" not in said and ".py:" not in said  # one log line each, not Python's two-line form


# -- a killed compare continues -------------------------------------------------------------------------------------


def test_a_killed_compare_continues_where_it_stopped(tmp_path, monkeypatch, caplog):
    from finetune.runs import compare as compare_module

    data = make_folder(tmp_path / "data", per_class=4)
    recipes = []
    for name, epochs in (("first", 1), ("second", 2)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(train={"epochs": epochs, "lr": 0.002})))
        recipes.append(path)
    out = tmp_path / "cmp"

    def stop_second(state):
        if "second" in str(calls[-1]) and state.epoch == 1:
            raise KeyboardInterrupt  # killed after the second run's first epoch

    calls: list[str] = []
    real_train = compare_module.train

    def interrupted(**kwargs):
        calls.append(str(kwargs.get("out")))
        return real_train(**kwargs, on_epoch_end=stop_second)

    monkeypatch.setattr(compare_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(recipes=recipes, data=data, out=out, progress=False)
    monkeypatch.undo()
    kept = (out / "first" / "checkpoints" / "best.pt").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="finetune")
    result = compare(recipes=recipes, data=data, out=out, progress=False)
    assert sorted(result.leaderboard["recipe"]) == ["first", "second"]
    assert (out / "first" / "checkpoints" / "best.pt").stat().st_mtime_ns == kept  # finished: read back, not retrained
    said = [r.getMessage() for r in caplog.records]
    assert any("first finished in an earlier compare" in m for m in said), said
    assert any("resuming" in m and "second" in m and "after epoch 1" in m for m in said), said
    assert list(RunDir(out / "second").root.joinpath("metrics.csv").read_text().splitlines()[1:][-1].split(","))[0] == "2"
    again = compare(recipes=recipes, data=data, out=out, progress=False)  # a finished compare: every run read back
    assert again.leaderboard.equals(result.leaderboard)
    edited = tmp_path / "second.yaml"
    edited.write_text(yaml.safe_dump(tiny_recipe(train={"epochs": 2, "lr": 0.05})))
    with pytest.raises(RunDirError, match=r"cmp/second holds a run of another recipe \(train.lr: 0.002 -> 0.05\)"):
        compare(recipes=recipes, data=data, out=out, progress=False)


def test_reports_written_at_once_each_arrive_whole(tmp_path):
    """Several processes replacing one report folder: the last one wins, and the folder is always one of them."""
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from finetune.files import replaced_folder
        for round in range(30):
            with replaced_folder(Path(sys.argv[1]), marker="metrics.json") as staging:
                for name in ("metrics.json", "a.csv", "b.csv"):
                    (staging / name).write_text(sys.argv[2])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "report"
    writers = [subprocess.Popen([sys.executable, "-c", script, str(out), tag], env=env) for tag in ("x", "y", "z")]
    assert all(w.wait(timeout=120) == 0 for w in writers)
    assert len({(out / n).read_text() for n in ("metrics.json", "a.csv", "b.csv")}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_linked_report_folder_is_replaced_behind_its_link(tmp_path):
    real = tmp_path / "real"
    with replaced_folder(real, marker="metrics.json") as staging:
        (staging / "metrics.json").write_text("1")
    (tmp_path / "link").symlink_to(real)
    with replaced_folder(tmp_path / "link", marker="metrics.json") as staging:
        (staging / "metrics.json").write_text("2")
    assert (tmp_path / "link").is_symlink() and (real / "metrics.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


KILLED_EVAL = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from finetune import evaluate
    from finetune.reporting import report

    def stalled(*, path, **kwargs):  # the tables and figures are written; the page is being written when the kill comes
        path.write_text("half a page")
        Path(sys.argv[4]).write_text("ready")
        time.sleep(600)

    report.render_html = stalled
    evaluate(run=sys.argv[1], data=sys.argv[2], out=sys.argv[3], progress=False)
    """
)


def test_kill_9_in_the_middle_of_an_eval_leaves_the_previous_report(trained, first_report, tmp_path):
    import signal
    import time

    _, run, _, new = trained
    out = Path(shutil.copytree(first_report.folder, tmp_path / "report"))
    before = _contents(out)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_EVAL, str(run), str(new), str(out), str(ready)], env=env)
    deadline = time.monotonic() + 240
    while not ready.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), "the eval never reached its page"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    assert _contents(out) == before  # the previous report, whole
    assert any(".new." in p.name for p in tmp_path.iterdir())  # the killed writer's staging folder...
    evaluate(run=run, data=new, out=out, progress=False)
    _no_staging_left(tmp_path)  # ...is cleared by the next writer
