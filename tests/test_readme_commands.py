"""README followed in order works: every `finetune ...` line of its bash blocks runs, in order, in one empty folder, on
a tiny image folder. The README's placeholders become real files; the harness shrinks every recipe (ResNet-18 at
32 px without downloaded weights, one epoch per phase) so the sequence runs in minutes. What it checks is that each
command finds what the commands before it left (runs/ants, its export, runs/cmp/...) and none stops on the one before."""

import copy
import re
import shlex
import shutil

from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import loading

from conftest import REPO, make_folder

PLACEHOLDERS = {  # README's stand-ins and what they become in the test folder
    "path/to/folder": "data",
    "path/to/test_folder": "held_out",
    "img1.jpg": "held_out/cat/img_00.jpg",
    "more_images/": "held_out/dog",
    "photos/": "held_out/eel",
    "/path/to/model.safetensors": "weights.safetensors",
}
MAY_EXIT_1 = {"check", "export"}  # as README says: untrainable data; an int8 model refused past --max-accuracy-drop


def readme_commands() -> list[str]:
    """The `finetune` lines of README's bash blocks, in order (continuations joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("finetune "):
                commands.append(line)
    return commands


def _shrunk(original):
    """recipe_from_dict, then the harness's shrinking: the command line's overrides are applied first."""

    def recipe_from_dict(tree, *, overrides=(), source="<dict>"):
        small = copy.deepcopy(original(tree, overrides=overrides, source=source).to_dict())
        small["model"].update(name="resnet18", pretrained=False)
        small["transforms"].update(input_size=32, crop_pct=1.0)
        small["data"].update(num_workers=0, batch_size=8)
        small["eval"]["gradcam"] = False
        for phase in small["train"].get("phases") or [small["train"]]:
            phase["epochs"] = 1
        return original(small, source=source)

    return recipe_from_dict


def test_readme_commands_run_in_order(tmp_path, monkeypatch):
    commands = readme_commands()
    assert commands[:2] == ["finetune recipes", "finetune train last_stage --data path/to/folder --out runs/ants"]
    assert any(c.startswith("finetune export runs/ants --format both") for c in commands)
    make_folder(tmp_path / "data", per_class=10)
    make_folder(tmp_path / "held_out", per_class=3)
    (tmp_path / "weights.safetensors").write_bytes(b"")  # named by a --set that the harness overrides
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "recipe_from_dict", _shrunk(loading.recipe_from_dict))
    served = []  # `finetune serve` runs until stopped: here it builds its app and returns (tests/test_serve.py serves)
    monkeypatch.setattr("uvicorn.run", lambda app, **options: served.append(app))
    for command in commands:
        for placeholder, real in PLACEHOLDERS.items():
            command = command.replace(placeholder, real)
        args = shlex.split(command)[1:]
        quiet = [] if args[0] in ("recipes", "inspect", "report") else ["--quiet"]
        result = CliRunner().invoke(app, [*args, *quiet])
        allowed = {0, 1} if args[0] in MAY_EXIT_1 else {0}
        assert result.exit_code in allowed, f"{command}: exit {result.exit_code}\n{result.output[-3000:]}"
    assert (tmp_path / "runs" / "ants" / "export" / "model.onnx").is_file()
    assert (tmp_path / "runs" / "diff" / "diff.md").is_file() and (tmp_path / "preds.csv").is_file()
    assert served and served[0].title == "finetune: resnet18"
    shutil.rmtree(tmp_path / "runs")
