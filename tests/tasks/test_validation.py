"""The validation report: numbers against truth, figures and a page whose every image loads.

A tiny simulated survey goes through Coadd.yaml and the diffim subset of DIA.yaml once per
module; the report is built from it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from butler.butler import Butler
from pipeline.cli import main as pipetask
from tasks.cli import main as diapipe
from tasks.simulation import get_preset, write_repository
from tasks.validation import build_report
from tasks.validation.metrics import completeness_curve, transient_recovery

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("validation") / "repo"
    write_repository(path, get_preset("tiny"))
    args = ["-b", str(path), "-i", "SimCam/defaults", "-j", "2", "--no-progress"]
    assert pipetask(["run", "-p", str(ROOT / "pipelines" / "Coadd.yaml"), "-o", "u/coadd", *args]) == 0
    args[3] = "SimCam/defaults,u/coadd"
    assert pipetask(["run", "-p", str(ROOT / "pipelines" / "DIA.yaml") + "#getTemplate,subtractImages,detectAndMeasure", "-o", "u/dia", *args]) == 0
    return path


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.open_tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")
        elif tag not in ("meta", "br", "link"):
            self.open_tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open_tags and self.open_tags[-1] == tag, f"</{tag}> closes {self.open_tags[-1:]}"
        self.open_tags.pop()


def test_transient_recovery_against_truth(repo: Path) -> None:
    butler = Butler(repo, collections=["u/dia", "SimCam/defaults"])
    recovery = transient_recovery(butler)
    t = recovery.transients
    assert len(recovery.data_ids) == 10 and len(t) >= 30
    # every simulated transient row is an active transient of that visit-detector's truth
    truth = butler.get("truth_transients", instrument="SimCam", visit=int(t["visit"][0]), detector=int(t["detector"][0]))
    assert int(t["id"][0]) in set(truth["id"][truth["isActive"]])
    completeness, n = recovery.completeness(10.0)
    assert n >= 15 and completeness >= 0.9
    faint, n_faint = recovery.completeness(0.0, 3.0)
    assert n_faint == 0 or faint <= 0.5  # below 3 sigma hardly anything can be found
    assert abs(recovery.flux_ratio_median(10.0) - 1.0) < 0.05
    centres, frac, counts = completeness_curve(recovery, np.array([1.0, 10.0, 1e5]))
    clean = np.asarray(t["onCleanPixels"], dtype=bool)
    assert 0 < clean.sum() < len(t)  # some transients fall on flagged pixels (edges, bad columns)
    assert counts.sum() == np.sum(clean & np.isfinite(t["expectedSnr"]) & (t["expectedSnr"] >= 1.0))
    assert frac[1] == pytest.approx(completeness, abs=1e-9)


def test_report_page_and_images(repo: Path, tmp_path: Path) -> None:
    summary = build_report(repo, ["u/dia", "SimCam/defaults"], tmp_path / "report")
    page = summary.html_path.read_text()
    parser = _Images()
    parser.feed(page)
    assert not parser.open_tags
    assert sorted(parser.sources) == sorted(p.name for p in summary.images)
    assert {"gallery.png", "completeness.png", "kernel_mosaic.png"} <= set(parser.sources)
    for name in parser.sources:
        path = summary.html_path.parent / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0.01  # not blank
    # the forced-photometry sections were not run: the page says so instead of failing
    assert any("deepCoadd_forced_src" in note for note in summary.notes)
    saved = json.loads((summary.html_path.parent / "summary.json").read_text())
    assert saved["numbers"]["transients"]["visitDetectors"] == 10
    names = [c["name"] for c in saved["checks"]]
    assert "transient completeness, S/N >= 10" in names


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_report_renders_in_chromium(repo: Path, tmp_path: Path) -> None:
    summary = build_report(repo, ["u/dia", "SimCam/defaults"], tmp_path / "report")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1400,3000", summary.html_path.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = imread(shot)
    assert pixels.shape[:2] == (3000, 1400)
    # images drawn: a page of text alone is almost all white
    assert np.mean(pixels[..., :3] < 0.9) > 0.05


def test_validate_command(repo: Path, tmp_path: Path, capsys) -> None:
    assert diapipe(["validate", str(repo), "u/dia,SimCam/defaults", "-o", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "transient completeness" in out and (tmp_path / "r" / "index.html").exists()
    assert diapipe(["validate", str(repo), "no/such", "-o", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diapipe: error: collection 'no/such' does not exist") and err.count("\n") == 1
