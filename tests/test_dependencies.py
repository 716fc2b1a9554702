"""pyproject's requirements admit only versions that have what the code calls."""

import re
import sys

import pytest
from packaging.requirements import Requirement

from conftest import REPO


def _requirements() -> dict[str, Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {(req := Requirement(line)).name.lower(): req for line in project["dependencies"]}


def test_the_numpy_pin_admits_no_version_without_bitwise_count():
    """np.bitwise_count (data/doctor.py's near-duplicate search) arrived in numpy 2.0."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "finetune").rglob("*.py"))
    assert re.search(r"\bnp\.bitwise_count\(", source), "np.bitwise_count is gone: the numpy>=2.0 pin may go too"
    numpy = _requirements()["numpy"]
    probes = ("1.24.4", "1.26.4", "2.0.0", "2.4.6")
    assert [v for v in probes if numpy.specifier.contains(v)] == ["2.0.0", "2.4.6"]
