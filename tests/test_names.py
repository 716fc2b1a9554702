"""Names are data, never markup (issue 27, item 4): class and file names with '$', '<b>', '|' reach the plots as plain
text and the HTML escaped, and two spellings of one name in different Unicode forms are refused up front."""

import html
import logging
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import matplotlib
import numpy as np
import pandas as pd
import pytest

from finetune import train
from finetune.errors import DataError
from finetune.reporting import plots

from conftest import make_folder, tiny_recipe

MARKUP = ("cost_$1_to_$2", "a^2_$x$", "<b>bold & co")
# Names that Markdown would read as markup: a table's cell border, emphasis, a tag, a link, an image, a formula
MARKDOWN_NAMES = ("a|b", "*x*", "<script>", "[x](y)", "![i](z.png)", "_u_", "`c`", "~~s~~", "&amp;", "x\\", "$1_$2")
RUN_CLASSES = (*MARKUP, *MARKDOWN_NAMES[:6])


@pytest.fixture(scope="module")
def markup_run(tmp_path_factory):
    """One small run whose classes are all names that look like markup (mathtext, HTML, Markdown)."""
    root = tmp_path_factory.mktemp("markup")
    data = make_folder(root / "data", per_class=4, classes=RUN_CLASSES)
    return train(recipe=tiny_recipe(data={"test_fraction": 0.25}), data=data, out=root / "run", progress=False).run_dir


def test_dollar_signs_are_drawn_as_typed_not_parsed_as_mathtext(tmp_path):
    matrix = pd.DataFrame(np.eye(3), index=list(MARKUP), columns=list(MARKUP))
    with matplotlib.rc_context({"text.parse_math": True}), pytest.raises(ValueError):  # what the names did before
        plots.plot_confusion_matrix.__wrapped__(matrix, matrix.astype(int), tmp_path / "old.png", title="t")
    plots.plot_confusion_matrix(matrix, matrix.astype(int), tmp_path / "cm.png", title="cost_$1_to_$2")
    plots.plot_confusion_difference(matrix - matrix.T, tmp_path / "diff.png", title="$x$ vs $y")
    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    plots.plot_image_grid(images, [f"{n}\nconfidence $0.5" for n in MARKUP], tmp_path / "grid.png", columns=3)
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("cm.png", "diff.png", "grid.png"))
    assert matplotlib.rcParams["text.parse_math"] is True  # the caller's settings are left as they were


def test_a_run_whose_class_names_look_like_markup_trains_and_reports(markup_run):
    report = markup_run / "report"
    html_page = (report / "report.html").read_text()
    assert "&lt;b&gt;bold &amp; co" in html_page and "<b>bold" not in html_page and "<script>" not in html_page
    assert (report / "confusion_matrix.png").stat().st_size > 1000
    assert set(pd.read_csv(report / "per_class.csv", keep_default_na=False)["class"]) == set(RUN_CLASSES)


@pytest.mark.parametrize("kind", ["folder", "manifest"])
def test_one_name_in_two_unicode_forms_is_refused_with_both_spellings(tmp_path, kind):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    data = make_folder(tmp_path / "data", per_class=4, classes=(nfc, nfd, "tea"))
    if kind == "manifest":
        rows = [(str(p), p.parent.name) for p in sorted(data.rglob("*.*"))]
        pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "m.csv", index=False)
        data = tmp_path / "m.csv"
    with pytest.raises(DataError, match=r"class names .* and .* are both 'café' written in two Unicode forms") as caught:
        train(recipe=tiny_recipe(), data=data, out=tmp_path / "run", progress=False)
    assert "cafe\\u0301" in str(caught.value) and "caf\\xe9" in str(caught.value)
    assert not (tmp_path / "run").exists()


def _markdown():
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])


@pytest.mark.parametrize("name", [*MARKDOWN_NAMES, "<b>bold & co", "**bold**", "a\\|b", "line\nbreak", "<http://e.x>"])
def test_escape_markdown_renders_every_name_as_its_own_text(name):
    from finetune.reporting.markdown import escape_markdown

    rendered = _markdown().renderInline(escape_markdown(name))
    assert html.unescape(rendered) == " ".join(name.split())  # as typed, a line break as a space
    assert "<" not in rendered  # no tag: no <em>, <a>, <img>, <code>, <script>


def _tables_intact(text: str) -> None:
    """Every Markdown table renders with as many cells in each row as in its header, and no markup from a name."""
    rendered = _markdown().render(text)
    for table in re.findall(r"<table>.*?</table>", rendered, flags=re.S):
        header = len(re.findall(r"<th[ >]", table.split("</thead>")[0]))
        for row in re.findall(r"<tr>(.*?)</tr>", table.split("</thead>")[1], flags=re.S):
            assert len(re.findall(r"<td[ >]", row)) == header, row
    for tag in ("<script", "<img", "<code>", "<del>", "<b>"):
        assert tag not in rendered, (tag, text)
    assert all(said.startswith("Per-class moves") for said in re.findall(r"<em>(.*?)</em>", rendered))  # diff.md's own
    assert re.findall(r"<a href=\"([^\"]*)\"", rendered) == re.findall(r"<a href=\"(.*?report\.html)\"", rendered)


def test_summary_and_diff_markdown_keep_names_as_text(markup_run, tmp_path):
    from finetune.reporting.diff import diff_reports

    summary = (markup_run / "report" / "summary.md").read_text()
    _tables_intact(summary)
    page = _markdown().render(summary)
    assert all(html.escape(name, quote=False) in page for name in RUN_CLASSES)
    diff_reports(run_a=markup_run, run_b=markup_run, out=tmp_path / "diff")
    _tables_intact((tmp_path / "diff" / "diff.md").read_text())


def test_the_leaderboard_markdown_keeps_recipe_model_and_class_names_as_text():
    from finetune.reporting.leaderboard import leaderboard_markdown

    names = list(MARKDOWN_NAMES[:4])
    board = pd.DataFrame(
        {
            "recipe": names,
            "model": ["m|1", "*m*", "<m>", "[m](n)"],
            "accuracy": 0.5,
            "accuracy_lo": 0.4,
            "accuracy_hi": 0.6,
            "macro_f1": 0.5,
            "vs_leader": "leader",
            "worst_class": ["c|1", "_c_", "<i>", "`c`"],
            "worst_class_recall": 0.3,
            "params": 1e6,
            "gmacs": 0.1,
            "trainable_params": 1000,
            "epochs": 1,
            "seconds": 5.0,
            "report": [f"{n}/report/report.html" for n in names],
        }
    )
    means = pd.DataFrame(
        {"recipe": names, **dict.fromkeys(("accuracy_mean", "accuracy_std", "accuracy_ci_lo_mean", "accuracy_ci_hi_mean"), 0.5)}
    ).assign(macro_f1_mean=0.5, macro_f1_std=0.1, seconds_mean=5.0)
    text = leaderboard_markdown(board, data="data|<x>", split="test", means=means, seeds=2)
    _tables_intact(text)
    links = re.findall(r"<a href=\"([^\"]*)\"", _markdown().render(text))
    assert [Path(unquote(link)).parts[0] for link in links] == names  # each link reaches its own run folder


@pytest.mark.parametrize(
    "spelling",
    ["relative", "absolute", "dot-dot", "dot", "symlinked file", "symlinked folder", "double slash"],
)
def test_one_file_under_two_labels_is_refused_however_its_path_is_spelled(tmp_path, spelling):
    data = make_folder(tmp_path / "data", per_class=4)
    target = data / "cat" / "img_00.jpg"
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jpg").symlink_to(target)
    (tmp_path / "folder").symlink_to(data / "cat")
    other = {
        "relative": "data/cat/img_00.jpg",
        "absolute": str(target),
        "dot-dot": "sub/../data/cat/../cat/img_00.jpg",
        "dot": "./data/./cat/img_00.jpg",
        "symlinked file": "link.jpg",
        "symlinked folder": "folder/img_00.jpg",
        "double slash": "data//cat//img_00.jpg",
    }[spelling]
    rows = [(str(p.relative_to(tmp_path)), p.parent.name) for p in sorted(data.rglob("*.*"))]
    rows.append((other, "dog"))
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(manifest, index=False)
    with pytest.raises(DataError, match=r"img_00\.jpg.* is listed under 2 labels \(cat, dog\); keep one line per image"):
        train(recipe=tiny_recipe(), data=manifest, out=tmp_path / "run", progress=False)
    rows[-1] = (other, "cat")  # the same file twice under one label: kept once
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(manifest, index=False)
    from finetune.data.scan import read_manifest

    samples = read_manifest(manifest)
    assert len(samples) == len(rows) - 1 and samples["path"].map(lambda p: Path(p).resolve()).is_unique


@pytest.mark.parametrize("splits", [("test",), ("val",), ("val", "test"), ("Test", "VALIDATION")])
@pytest.mark.parametrize("kind", ["manifest", "folder"])
def test_data_without_training_images_is_one_line(tmp_path, splits, kind):
    if kind == "folder":
        for split in splits:
            make_folder(tmp_path / "data" / split, per_class=3)
        data = tmp_path / "data"
    else:
        images = sorted(make_folder(tmp_path / "images", per_class=3).rglob("*.*"))
        rows = [(str(p), p.parent.name, splits[i % len(splits)]) for i, p in enumerate(images)]
        data = tmp_path / "m.csv"
        pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(data, index=False)
    with pytest.raises(
        DataError, match=r"has no training images: every image is pre-split \(.* in (test|val)\); mark some"
    ) as caught:
        train(recipe=tiny_recipe(), data=data, out=tmp_path / "run", progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "run").exists()


NASTY_TERMINAL = ("red\x1b[31m", "back\rline", "bell\x07", "csi\x9b2J", "rtl\u202eexe.jpg")


def test_control_characters_in_names_never_reach_the_terminal(tmp_path):
    """`finetune check` prints file names (findings) and logs them; `finetune train` prints its error with them."""
    from typer.testing import CliRunner

    from finetune.cli import app

    data = make_folder(tmp_path / "data", per_class=4)
    for i, name in enumerate(NASTY_TERMINAL):
        (data / "cat" / f"{name}{i}.jpg").write_bytes(b"not an image")
    output = CliRunner().invoke(app, ["check", str(data), "--quiet"]).output  # no progress bars (their \r is ours)
    assert all(shown in output for shown in ("red\\x1b[31m0", "back\\x0dline1", "bell\\x072", "csi\\x9b2J3", "rtl\\u202eexe")), (
        output
    )
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", output), output
    missing = tmp_path / "gone\x1b[2J\r"
    result = CliRunner().invoke(app, ["train", "quickstart", "--data", str(missing)])
    assert result.exit_code == 2 and "gone\\x1b[2J\\x0d" in result.output and "\x1b" not in result.output


def test_terminal_text_shows_every_control_character_and_keeps_lines():
    from finetune.cli.base import TerminalFormatter, terminal_text

    assert terminal_text("a\x1b[1mb\rc\td\ne\x00\x7f\x85") == "a\\x1b[1mb\\x0dc\td\ne\\x00\\x7f\\x85"
    assert terminal_text("bad\udcffbyte") == "bad\\xffbyte"  # a file name that is not UTF-8 prints its byte
    record = logging.LogRecord("finetune", logging.WARNING, __file__, 1, "skipped %s", ("x\x1b[2Jy",), None)
    assert TerminalFormatter("%(message)s").format(record) == "skipped x\\x1b[2Jy"
