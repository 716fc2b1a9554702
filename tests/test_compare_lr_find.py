import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from finetune.config.schema import ModelConfig, PhaseConfig, TrainConfig
from finetune.errors import RecipeError, UsageError
from finetune.models.build import build_model
from finetune.runs.compare import compare
from finetune.runs.lr_find import find_lr
from finetune.training.lr_find import lr_range_test, suggest_lr
from finetune.training.optim import build_optimizer

from conftest import tiny_recipe


def _write(path, recipe):
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_compare_writes_a_leaderboard_on_one_split(tmp_path, image_folder):
    probe = _write(tmp_path / "probe.yaml", tiny_recipe(train={"freeze": ["stem", "layer1", "layer2", "layer3", "layer4"]}))
    full = _write(tmp_path / "full.yaml", tiny_recipe(seed=7, data={"val_fraction": 0.4}))
    result = compare(recipes=[probe, full], data=image_folder, out=tmp_path / "cmp", progress=False)
    board = pd.read_csv(tmp_path / "cmp" / "leaderboard.csv")
    assert sorted(board["recipe"]) == ["full", "probe"]
    assert {
        "accuracy",
        "macro_f1",
        "worst_class",
        "worst_class_recall",
        "trainable_params",
        "epochs",
        "seconds",
        "report",
    } <= set(board.columns)
    params = dict(zip(board["recipe"], board["trainable_params"]))
    assert params["probe"] == 512 * 3 + 3 and params["full"] > 11_000_000
    assert len(result.leaderboard) == 2 and result.leaderboard["macro_f1"].is_monotonic_decreasing
    # "full" asked for val_fraction 0.4, but gets the first recipe's split so the numbers are comparable
    a, b = (pd.read_csv(tmp_path / "cmp" / name / "splits.csv") for name in ("probe", "full"))
    resolved = lambda frame: dict(zip(frame["path"].map(lambda p: str(Path(p).resolve())), frame["split"]))  # noqa: E731
    assert resolved(a) == resolved(b)
    markdown = (tmp_path / "cmp" / "leaderboard.md").read_text()
    assert "[report.html](probe/report/report.html)" in markdown and "11.2 M" in markdown and "1,539" in markdown
    page = (tmp_path / "cmp" / "leaderboard.html").read_text()  # the same table on a page, each report one click away
    assert '<a href="probe/report/report.html">report.html</a>' in page and "11.2 M" in page and "1,539" in page
    assert re.search(r"<td>\d+ s</td>|<td>\d+ min \d\d s</td>", page) and "http" not in page
    for name in board["report"]:
        assert (tmp_path / "cmp" / name).exists()
    assert board["vs_leader"].iloc[0] == "leader"
    assert board["vs_leader"].iloc[1].endswith(("within noise", "worse"))  # a paired test on the same test images
    assert (board["accuracy_lo"] <= board["accuracy"]).all() and (board["accuracy"] <= board["accuracy_hi"]).all()


def test_compare_needs_two_recipes(tmp_path):
    with pytest.raises(UsageError, match="at least two recipes"):
        compare(recipes=[tmp_path / "a.yaml"], data=tmp_path, out=tmp_path / "o")


def test_range_test_leaves_model_and_optimizer_untouched():
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="resnet18"), num_classes=3)
    optimizer = build_optimizer(bundle.model, PhaseConfig(epochs=1, lr=0.01, layer_decay=0.5), TrainConfig(), bundle.stages)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    lrs_before = [g["lr"] for g in optimizer.param_groups]
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))) for _ in range(3)]
    curve = lr_range_test(
        bundle.model.train(), data, optimizer, torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), steps=12, progress=False
    )
    assert len(curve) >= 3 and (curve["lr"].diff().dropna() > 0).all()
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())
    assert [g["lr"] for g in optimizer.param_groups] == lrs_before and not optimizer.state


def test_suggestion_is_the_steepest_descent():
    lrs = [10 ** (-6 + i * 0.1) for i in range(60)]
    smoothed = [2.0 - 1.5 / (1 + pow(10, -(i - 30) / 3)) for i in range(50)] + [0.5 + (i - 50) for i in range(50, 60)]
    curve = pd.DataFrame({"lr": lrs, "loss": smoothed, "smoothed": smoothed})
    assert suggest_lr(curve) == pytest.approx(lrs[30], rel=0.3)


def test_find_lr_writes_curve(tmp_path, image_folder):
    recipe = _write(tmp_path / "r.yaml", tiny_recipe())
    result = find_lr(recipe=recipe, data=image_folder, out=tmp_path / "lr", steps=10, progress=False)
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 5000
    assert len(pd.read_csv(tmp_path / "lr" / "lr_find.csv")) == len(result.curve) > 0
    assert 1e-7 <= result.suggestion <= 10


class _Quadratic(torch.nn.Module):
    """loss = (w - t)^2 with t alternating 2 and 4: SGD on it diverges for every lr above 1 (|1 - 2 lr| > 1)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.w * x


def test_range_test_on_a_loss_with_a_known_divergence_point():
    model = _Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = [(torch.ones(1), torch.full((1,), 2.0)), (torch.ones(1), torch.full((1,), 4.0))]
    curve = lr_range_test(
        model,
        batches,
        optimizer,
        torch.nn.MSELoss(),
        device=torch.device("cpu"),
        start_lr=1e-4,
        end_lr=100.0,
        steps=200,
        progress=False,
    )
    assert curve["lr"].iloc[-1] > 1.0  # it ran past the divergence point ...
    assert curve["lr"].iloc[-1] < 100.0  # ... and stopped early once the loss blew up
    suggestion = suggest_lr(curve)
    assert 0.01 <= suggestion <= 1.0  # below divergence, where the loss falls fastest
    assert model.w.item() == 0.0  # restored


def test_find_lr_screens_images_like_train(tmp_path, image_folder):
    (image_folder / "cat" / "empty.jpg").write_bytes(b"")  # train skips it; lr-find must too
    recipe = _write(tmp_path / "r.yaml", tiny_recipe())
    result = find_lr(recipe=recipe, data=image_folder, out=tmp_path / "lr", steps=6, progress=False)
    assert len(result.curve) > 0


def test_an_unreliable_curve_is_said_to_be_so():
    from finetune.training.lr_find import unreliable

    lrs = [10 ** (-6 + i * 0.1) for i in range(60)]
    good = [2.0 - 1.5 / (1 + pow(10, -(i - 30) / 3)) for i in range(60)]
    assert unreliable(pd.DataFrame({"lr": lrs, "loss": good, "smoothed": good})) is None
    assert "only 8 steps were recorded" in unreliable(pd.DataFrame({"lr": lrs[:8], "loss": good[:8], "smoothed": good[:8]}))
    flat = [1.0 + 0.001 * (i % 3) for i in range(60)]
    assert "hardly falls" in unreliable(pd.DataFrame({"lr": lrs, "loss": flat, "smoothed": flat}))
    dip = [2.0] * 60
    dip[40] = 1.0
    assert "single dip" in unreliable(pd.DataFrame({"lr": lrs, "loss": dip, "smoothed": dip}))


def test_compare_shortens_phase_based_and_plain_recipes_together_over_seeds(tmp_path, image_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --data: the first run keeps relative paths, later ones the manifest's
    phases = [{"epochs": 2, "lr": 0.01, "trainable": ["head"]}, {"epochs": 4, "lr": 0.001}]
    staged = _write(tmp_path / "staged.yaml", tiny_recipe(train={"phases": phases, "feature_cache": "off"}))
    plain = _write(tmp_path / "plain.yaml", tiny_recipe(train={"epochs": 5}))
    with pytest.raises(RecipeError, match=r"conflict with phases"):  # what one --set cannot do
        compare(recipes=[staged, plain], data=image_folder, out=tmp_path / "x", overrides=["train.epochs=1"], progress=False)
    result = compare(recipes=[staged, plain], data="flat", out="cmp", progress=False, max_epochs=2, seeds=2)
    assert result.leaderboard["vs_leader"].iloc[1:].str.endswith(("within noise", "worse")).all()
    epochs = dict(zip(result.leaderboard["recipe"], result.leaderboard["epochs"]))
    assert epochs == {"staged-seed0": 2, "staged-seed1": 2, "plain-seed0": 2, "plain-seed1": 2}
    seeds = pd.read_csv(tmp_path / "cmp" / "leaderboard_seeds.csv")
    assert sorted(seeds["recipe"]) == ["plain", "staged"] and set(seeds["runs"]) == {2}
    board = result.leaderboard.assign(recipe=result.leaderboard["recipe"].str.replace(r"-seed\d$", "", regex=True))
    means = board.groupby("recipe")["accuracy"].mean()
    assert dict(zip(seeds["recipe"], seeds["accuracy_mean"])) == pytest.approx(means.to_dict(), abs=1e-4)
    assert "## Over seeds" in (tmp_path / "cmp" / "leaderboard.md").read_text()


@pytest.mark.parametrize(
    ("scale", "cap", "expected"),
    [(0.2, None, [1, 1]), (0.5, None, [1, 2]), (None, 3, [1, 2]), (None, 4, [1, 3]), (2.0, 5, [2, 3])],
)
def test_epochs_scale_and_cap_keep_every_phase(scale, cap, expected):
    from finetune.config.loading import recipe_from_dict

    recipe = recipe_from_dict(tiny_recipe(train={"phases": [{"epochs": 2, "lr": 0.1}, {"epochs": 4, "lr": 0.01}]}))
    assert [p.epochs for p in recipe.with_epochs(scale=scale, cap=cap).train.phases] == expected
    with pytest.raises(ValueError, match="the recipe has 2 phases; at most 1 epochs cannot give each one epoch"):
        recipe.with_epochs(cap=1)


def test_compare_one_recipe_over_models_of_several_families(tmp_path, image_folder):
    """`finetune compare RECIPE --models a,b`: one leaderboard over backbones, with their size and time."""
    from typer.testing import CliRunner

    from finetune.cli import app

    recipe = _write(tmp_path / "probe.yaml", tiny_recipe(train={"trainable": ["head"]}))
    args = [
        "compare",
        str(recipe),
        "--models",
        "resnet18,convnext_atto",
        "--data",
        str(image_folder),
        "--out",
        str(tmp_path / "cmp"),
    ]
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    board = pd.read_csv(tmp_path / "cmp" / "leaderboard.csv").set_index("recipe")
    assert sorted(board.index) == ["convnext_atto", "resnet18"] and set(board["model"]) == {"resnet18", "convnext_atto"}
    assert board.loc["resnet18", "params"] == 11_178_051 and board.loc["convnext_atto", "params"] == 3_375_483
    assert board.loc["resnet18", "trainable_params"] == 512 * 3 + 3  # the head
    assert board.loc["convnext_atto", "trainable_params"] == 320 * 2 + 320 * 3 + 3  # head.norm + head.fc
    assert board.loc["resnet18", "gmacs"] == pytest.approx(1.82 * (32 / 224) ** 2, rel=0.05)
    assert (board["seconds"] > 0).all() and board["accuracy_lo"].le(board["accuracy"]).all()
    markdown = (tmp_path / "cmp" / "leaderboard.md").read_text()
    assert re.search(r"\|\s*GMACs\s*\|", markdown) and re.search(r"\|\s*3\.4 M\s*\|\s*0\.01\s*\|\s*1,603\s*\|", markdown)
    assert "3.4 M" in result.output and "3375483" not in result.output  # the terminal's table reads like the page's
    assert re.search(r"\b\d+ s\b", result.output) and "leaderboard.html" in result.output
    assert "[report.html](convnext_atto/report/report.html)" in markdown


def test_compare_over_models_refuses_one_weights_file_for_several(tmp_path):
    recipe = _write(tmp_path / "r.yaml", tiny_recipe(model={"pretrained": str(tmp_path / "w.pth")}))
    with pytest.raises(UsageError, match=r"fits one architecture, not 2; --set model.pretrained=true .* or false"):
        compare(recipes=[recipe], models=["resnet18", "regnety_002"], data=tmp_path, out=tmp_path / "o")
    with pytest.raises(UsageError, match=r"or one recipe and --models"):
        compare(recipes=[recipe], models=["resnet18"], data=tmp_path, out=tmp_path / "o")
    plain = _write(tmp_path / "plain.yaml", tiny_recipe())
    with pytest.raises(RecipeError, match=r"unknown model 'convnext_atoo' \(did you mean 'convnext_atto'\?\)"):
        compare(recipes=[plain], models=["resnet18", "convnext_atoo"], data=tmp_path, out=tmp_path / "o")


def _count_calls(monkeypatch, module: str) -> list[int]:
    """How often the model's `module` runs during find_lr (a hook on the model prepare_run builds)."""
    import finetune.runs.lr_find as lr_find_module

    calls = [0]
    original = lr_find_module.prepare_run

    def prepare_and_hook(*args, **kwargs):
        prepared = original(*args, **kwargs)
        prepared.model.bundle.model.get_submodule(module).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return prepared

    monkeypatch.setattr(lr_find_module, "prepare_run", prepare_and_hook)
    return calls


@pytest.mark.parametrize("trainable", [["head"], ["layer4", "head"]])
def test_lr_find_steps_on_the_feature_cache_training_uses(tmp_path, image_folder, monkeypatch, trainable):
    """A linear_probe / last_stage phase: lr-find runs on the frozen prefix's cached outputs (the prefix does not run per
    step), gives the loss curve the images give, and leaves the cache training then reuses."""
    recipe = _write(
        tmp_path / "r.yaml",
        tiny_recipe(
            transforms={"train": "none"},
            model={"head": {"dropout": 0.2}},  # dropout draws the same with and without a caching pass before
            train={"trainable": trainable, "cache_precision": "fp32"},
        ),
    )
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    runs = {}
    for name, overrides in (("images", ["train.feature_cache=off"]), ("cached", [])):
        calls = _count_calls(monkeypatch, "layer1")
        result = find_lr(recipe=recipe, data=image_folder, out=tmp_path / name, overrides=overrides, steps=14, progress=False)
        runs[name] = (result, calls[0])
    (images, image_calls), (cached, cached_calls) = runs["images"], runs["cached"]
    assert not images.cached and cached.cached
    assert image_calls == len(images.curve) >= 10  # every step runs the frozen stages ...
    assert cached_calls <= 6  # ... the cached run only while filling the cache: 18 train + 6 val images in batches of 8
    pd.testing.assert_frame_equal(cached.curve, images.curve, rtol=1e-4, atol=1e-5)
    again = find_lr(recipe=recipe, data=image_folder, out=tmp_path / "again", steps=14, progress=False)
    pd.testing.assert_frame_equal(again.curve, cached.curve)  # the cache filled now: the same curve, bit for bit
    features = [folder for folder in (tmp_path / "cache").iterdir() if folder.name != "screening"]
    assert len(features) == 1  # the eval pipeline's entries: what training's phase reads


def test_lr_find_says_its_warning_once(tmp_path, image_folder, caplog):
    from typer.testing import CliRunner

    from finetune.cli import app

    recipe = _write(tmp_path / "r.yaml", tiny_recipe())
    args = ["lr-find", str(recipe), "--data", str(image_folder), "--out", str(tmp_path / "lr"), "--steps", "5", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = result.output + caplog.text
    assert said.count("only 5 steps were recorded") == 1, said
    assert "suggested lr:" in result.output and "(unreliable: see the warning above)" in result.output


def test_lr_plot_points_at_the_divergence_inside_the_plot_without_minor_grid():
    from finetune.reporting.plots import lr_curve_figure

    lrs = [10 ** (-7 + i * 0.1) for i in range(75)]
    smoothed = [2.0 - 1.5 / (1 + pow(10, -(i - 40) / 6)) for i in range(65)] + [0.6 * 2**k for k in range(1, 11)]
    curve = pd.DataFrame({"lr": lrs, "loss": smoothed, "smoothed": smoothed})
    fig = lr_curve_figure(curve, lrs[40])
    ax = fig.axes[0]
    (arrow,) = [text for text in ax.texts if text.get_text().startswith("diverges")]
    x, y = arrow.xy
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    assert left <= x <= right and bottom <= y <= top  # the arrow ends on the plotted curve, not past it
    assert (x, y) in set(zip(lrs, smoothed))
    assert not any(tick.gridline.get_visible() for tick in ax.xaxis.get_minor_ticks())
    raw = next(line for line in ax.get_lines() if line.get_label().startswith("loss"))
    assert raw.get_visible() and raw.get_zorder() > max(g.get_zorder() for g in ax.get_xgridlines())
