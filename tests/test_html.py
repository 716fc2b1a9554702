"""report.html and the extra report files: numbers checked, HTML parsed, rendered headless when Chromium exists."""

import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune import evaluate, train
from finetune.cli import app
from finetune.config.loading import recipe_from_dict
from finetune.errors import DataError, RunDirError
from finetune.evaluation.calibration import calibration_table, expected_calibration_error
from finetune.evaluation.metrics import most_confused
from finetune.inference.predictions import Predictions
from finetune.reporting.diff import diff_reports
from finetune.reporting.report import write_report

from conftest import tiny_recipe

SECTION_IDS = {
    "summary",
    "metrics",
    "per-class",
    "confusion",
    "confused",
    "curves",
    "errors",
    "unsure",
    "calibration",
    "augmentation",
}


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.srcs, self.hrefs, self.figures = set(), [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        if tag == "a":
            self.hrefs.append(attrs.get("href", ""))
        if tag == "figure":
            self.figures += 1


def _parse(path):
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector


def test_ece_matches_direct_computation():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.45, 0.55]])
    targets = np.array([0, 1, 0, 1])  # right, wrong, right, right
    preds = Predictions(paths=list("abcd"), probs=probs, targets=targets)
    table = calibration_table(preds, bins=15)
    # direct: confidences 0.9 / 0.8 / 0.6 / 0.55 fall in bins (0.867,0.933], (0.733,0.8], (0.533,0.6] (the last two together)
    direct = (abs(1 - 0.9) + abs(0 - 0.8) + 2 * abs(1 - (0.6 + 0.55) / 2)) / 4
    assert expected_calibration_error(table) == pytest.approx(direct)
    assert table["count"].sum() == 4 and (table.loc[table["count"] > 0, "accuracy"].between(0, 1)).all()


def test_most_confused_pairs():
    counts = pd.DataFrame([[5, 3, 0], [1, 6, 0], [0, 4, 2]], index=list("abc"), columns=list("abc"))
    table = most_confused(counts)
    assert list(zip(table["true"], table["predicted"], table["count"])) == [("c", "b", 4), ("a", "b", 3), ("b", "a", 1)]
    assert table["fraction_of_true"].iloc[0] == pytest.approx(4 / 6)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_folder

    root = tmp_path_factory.mktemp("html")
    data = make_folder(root / "data", per_class=8)
    recipe = recipe_from_dict(tiny_recipe(train={"epochs": 2, "lr": 0.0001}))  # a weak model: some errors to show
    return train(recipe=recipe, data=data, out=root / "run", progress=False), data


def test_report_html_is_self_contained_with_every_section(trained_run):
    result, _ = trained_run
    folder = result.report.folder
    for name in (
        "report.html",
        "most_confused.csv",
        "calibration.csv",
        "training_curves.png",
        "reliability.png",
        "augmentation_preview.png",
    ):
        assert (folder / name).stat().st_size > 0, name
    text = (folder / "report.html").read_text(encoding="utf-8")
    parsed = _parse(folder / "report.html")
    assert parsed.ids >= SECTION_IDS
    assert parsed.srcs and all(src.startswith("data:image/png;base64,") for src in parsed.srcs)
    assert all(href.startswith("#") for href in parsed.hrefs)
    assert "http://" not in text and "https://" not in text and "<script" not in text
    preds = pd.read_csv(folder / "predictions.csv")
    wrong = (preds["true_label"] != preds["predicted_label"]).sum()
    assert parsed.figures == min(wrong, 12) + min(len(preds) - wrong, 12)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 <= metrics["ece"] <= 1
    calibration = pd.read_csv(folder / "calibration.csv")
    assert calibration["count"].sum() == metrics["num_images"]


def test_eval_of_a_bare_checkpoint_says_what_is_missing(trained_run, tmp_path):
    result, data = trained_run
    shutil.copy(result.best_checkpoint, tmp_path / "model.pt")
    report = evaluate(run=tmp_path / "model.pt", data=data, out=tmp_path / "report", progress=False)
    text = (report.folder / "report.html").read_text(encoding="utf-8")
    assert "Not available: this report was made from a checkpoint without its run folder" in text
    assert not (report.folder / "training_curves.png").exists()


def _synthetic_report(folder, seed, accuracy_boost):
    rng = np.random.default_rng(seed)
    targets = np.repeat(np.arange(3), 20)
    logits = rng.normal(size=(60, 3))
    logits[np.arange(60), targets] += accuracy_boost
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    write_report(
        Predictions(paths=[f"{i}.png" for i in range(60)], probs=probs, targets=targets),
        ["ant", "bee", "wasp"],
        folder,
        top_k=2,
        title="t",
    )


def test_report_diff(tmp_path):
    _synthetic_report(tmp_path / "a" / "report", 0, 0.5)
    _synthetic_report(tmp_path / "b" / "report", 1, 2.5)
    result = diff_reports(run_a=tmp_path / "a", run_b=tmp_path / "b", out=tmp_path / "diff")
    a = pd.read_csv(tmp_path / "a" / "report" / "per_class.csv").set_index("class")
    b = pd.read_csv(tmp_path / "b" / "report" / "per_class.csv").set_index("class")
    diff = pd.read_csv(tmp_path / "diff" / "per_class_diff.csv").set_index("class")
    assert np.allclose(diff.loc[a.index, "f1_delta"], b["f1"] - a["f1"], atol=1e-6)
    confusion = pd.read_csv(tmp_path / "diff" / "confusion_diff.csv", index_col=0)
    assert np.allclose(confusion.sum(axis=1), 0.0, atol=1e-6)  # rows of two row-normalised matrices
    assert (tmp_path / "diff" / "confusion_diff.png").stat().st_size > 5000
    text = (tmp_path / "diff" / "diff.md").read_text()
    assert "## Fixed (F1 up by 0.02 or more)" in text and "## Broke (F1 down by 0.02 or more)" in text
    assert "not tested against noise" in text
    from finetune.reporting.diff import _changes

    moves = pd.DataFrame({"class": ["x", "y", "z"], "f1_delta": [0.3, -0.012, -0.05]})
    assert _changes(moves, positive=True) == "x (+0.300)" and _changes(moves, positive=False) == "z (-0.050)"
    assert result.headline.set_index("metric").loc["accuracy", "delta"] > 0
    cli = CliRunner().invoke(app, ["report", "diff", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "d2")])
    assert cli.exit_code == 0 and "accuracy" in cli.stdout


def test_report_diff_errors(tmp_path):
    with pytest.raises(RunDirError, match=r"holds no report"):
        diff_reports(run_a=tmp_path, run_b=tmp_path, out=tmp_path / "d")
    _synthetic_report(tmp_path / "a", 0, 1.0)
    write_report(
        Predictions(paths=["x"], probs=np.array([[0.6, 0.4]]), targets=np.array([0])),
        ["ant", "moth"],
        tmp_path / "b",
        top_k=1,
        title="t",
    )
    with pytest.raises(DataError, match=r"different classes \(only in one: \['bee', 'moth', 'wasp'\]\)"):
        diff_reports(run_a=tmp_path / "a", run_b=tmp_path / "b", out=tmp_path / "d")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (CI installs Debian's chromium)")
def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    result, _ = trained_run
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--hide-scrollbars",
                f"--screenshot={shot}",
                "--window-size=1200,3000",
                (result.report.folder / "report.html").as_uri(),
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape[0] >= 3000 and pixels.std() > 20  # text, tables and figures, not a blank page
    assert (pixels < 100).mean() > 0.01  # dark ink: text and plots are drawn


def test_class_and_file_names_are_escaped_in_report_html(tmp_path):
    names = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "plain"]
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]])
    preds = Predictions(paths=["a<b>.png", "<i>b</i>.png", "c", "d"], probs=probs, targets=np.array([0, 1, 2, 1]))
    write_report(preds, names, tmp_path, top_k=2, title="<h1>t</h1>")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<img src=x" not in html and "<script>" not in html and "<i>b</i>" not in html and "<h1>t</h1>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;script&gt;alert(2)&lt;/script&gt;" in html


def test_report_diff_writes_an_escaped_self_contained_page(tmp_path):
    classes = ["<b>ant</b>", "bee", "wasp & co"]
    for name, seed, boost in (("a", 0, 0.5), ("b", 1, 2.5)):
        rng = np.random.default_rng(seed)
        targets = np.repeat(np.arange(3), 20)
        logits = rng.normal(size=(60, 3))
        logits[np.arange(60), targets] += boost
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        preds = Predictions(paths=[f"{i}.png" for i in range(60)], probs=probs, targets=targets)
        write_report(preds, classes, tmp_path / name / "report", top_k=2, title="t")
    diff_reports(run_a=tmp_path / "a", run_b=tmp_path / "b", out=tmp_path / "diff")
    page = tmp_path / "diff" / "diff.html"
    text = page.read_text(encoding="utf-8")
    assert "&lt;b&gt;ant&lt;/b&gt;" in text and "<b>ant</b>" not in text and "wasp &amp; co" in text
    collected = _parse(page)
    assert collected.srcs and all(src.startswith("data:image/png;base64,") for src in collected.srcs)  # nothing fetched
    assert "Paired bootstrap on the same images" in text and "Fixed (F1 up by 0.02 or more)" in text
    assert "Confusions that shrank most" in text and "Per class (worst F1 change first)" in text


def test_leaderboard_times_and_sizes_read_as_people_write_them():
    from finetune.reporting.leaderboard import count, duration

    assert [duration(s) for s in (7.4, 86.3, 3725)] == ["7 s", "1 min 26 s", "1 h 02 min"]
    assert [count(n) for n in (1539, 11_689_512, 3_375_483)] == ["1,539", "11.7 M", "3.4 M"]


def test_matrix_titles_stay_clear_of_the_colour_bar(monkeypatch, tmp_path):
    """A long title over the confusion matrix (and its difference) used to run under the colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from finetune.reporting import plots

    drawn = []

    def keep(fig, path):
        FigureCanvasAgg(fig)  # what savefig draws with
        fig.tight_layout()
        drawn.append(fig)

    monkeypatch.setattr(plots, "_save", keep)
    names = ["ant", "bee", "wasp"]
    frame = pd.DataFrame(np.eye(3) * 0.5 + 0.1, index=names, columns=names)
    title = "resnet50: 5-fold out-of-fold predictions (1,234 images) on a long folder name"
    plots.plot_confusion_matrix(frame, (frame * 10).astype(int), tmp_path / "m.png", title=title)
    plots.plot_confusion_difference(frame - 0.3, tmp_path / "d.png", title=title)
    for fig in drawn:
        renderer = fig.canvas.get_renderer()
        (text,) = [t for t in fig.findobj(Text) if t.get_text() and t.get_text() == fig.get_suptitle()]
        heading = text.get_window_extent(renderer)
        bar = fig.axes[-1].get_window_extent(renderer)  # the colour bar's axes
        assert not heading.overlaps(bar)
        assert heading.x0 >= 0 and heading.x1 <= fig.bbox.width  # wrapped to the figure, not cut at its edge


def test_per_class_f1_bar_has_its_own_cell(tmp_path):
    """The F1 bar drew behind the F1 number and hid it: the bar now fills a cell of its own."""
    from finetune.reporting.html import F1_BAR, _per_class_html

    per_class = pd.DataFrame(
        {
            "class": ["a", "b"],
            **{f"{m}{s}": [0.9, 0.5] for m in ("precision", "recall", "f1") for s in ("", "_lo", "_hi")},
            "support": [10, 10],
        }
    )
    html = _per_class_html(per_class)
    cells = re.findall(r'<td id="(T_\w+_row\d+_col\d+)" class="data row\d+ col(\d+)" >([^<]*)</td>', html)
    header = re.findall(r'<th id="T_\w+_level0_col(\d+)" class="col_heading level0 col\d+" >([^<]*)</th>', html)
    columns = {name: col for col, name in header}
    styles = dict(re.findall(r"#(T_\w+_row\d+_col\d+) \{([^}]*)\}", html))
    f1_cells = [(cid, text) for cid, col, text in cells if col == columns["f1"]]
    bar_cells = [(cid, text) for cid, col, text in cells if col == columns[F1_BAR]]
    assert [text for _, text in f1_cells] == ["0.500", "0.900"] and all("gradient" not in styles.get(c, "") for c, _ in f1_cells)
    assert [text for _, text in bar_cells] == ["", ""] and all("linear-gradient" in styles.get(c, "") for c, _ in bar_cells)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (CI installs Debian's chromium)")
def test_a_table_wider_than_the_page_scrolls_in_its_own_box_not_the_page(tmp_path):
    """diff.html's per-class deltas (16 columns) and a leaderboard with long cells ran off the right edge of the
    page; every table of the small pages now scrolls inside the page's width."""
    from finetune.reporting.page import Section, write_page

    wide = pd.DataFrame({f"average_precision_delta_{i}": [f"-0.0{i}0 [-0.045, +0.002]: within noise"] for i in range(16)})
    page = tmp_path / "page.html"
    write_page(page, title="wide", intro=[], sections=[Section("Per class", table=wide)])
    probe = tmp_path / "probe.html"  # the page, and a line of script that writes how wide the page scrolls
    script = "<script>document.title = 'width=' + document.documentElement.scrollWidth</script>"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                f"--user-data-dir={profile}",
                "--window-size=1200,800",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout
    width = int(re.search(r"<title>width=(\d+)</title>", dom).group(1))
    assert width <= 1200, width
