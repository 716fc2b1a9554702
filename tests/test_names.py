"""Names are data, never markup (issue 27, item 4): class and file names with '$', '<b>', '|' reach the plots as plain
text and the HTML escaped, and two spellings of one name in different Unicode forms are refused up front."""

import unicodedata

import matplotlib
import numpy as np
import pandas as pd
import pytest

from finetune import train
from finetune.errors import DataError
from finetune.reporting import plots

from conftest import make_folder, tiny_recipe

MARKUP = ("cost_$1_to_$2", "a^2_$x$", "<b>bold & co")


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


def test_a_run_whose_class_names_look_like_markup_trains_and_reports(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6, classes=MARKUP)
    result = train(recipe=tiny_recipe(), data=data, out=tmp_path / "run", progress=False)
    report = result.run_dir / "report"
    html = (report / "report.html").read_text()
    assert "&lt;b&gt;bold &amp; co" in html and "<b>bold" not in html
    assert (report / "confusion_matrix.png").stat().st_size > 1000
    assert set(pd.read_csv(report / "per_class.csv")["class"]) == set(MARKUP)


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
