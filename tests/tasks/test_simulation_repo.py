"""The simulated repository (tiny preset), SimCam registration and the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from butler.butler import Butler
from butler.cli import cli as butler_cli
from butler.errors import DatasetExistsError
from butler.exposure import Exposure
from butler.psf import GridPsf
from tasks.instruments.simcam import SimCam
from tasks.simulation import (
    DATASET_TYPES,
    TRUTH_COLUMNS,
    get_preset,
    plan_survey,
    simulate_visit_detector,
    write_repository,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("sim") / "repo"
    summary = write_repository(repo, get_preset("tiny"))
    return repo, summary


def test_repository_has_the_expected_datasets(tiny_repo) -> None:
    repo, summary = tiny_repo
    config = get_preset("tiny")
    n_vd = config.n_visits * len(config.detector_ids)
    assert summary["datasets_written"] == 4 * n_vd + 1
    with Butler(repo, collections="SimCam/defaults") as butler:
        types = {dt.name: dt for dt in butler.query_dataset_types()}
        for name, (dims, storage_class) in DATASET_TYPES.items():
            assert set(types[name].dimensions) >= set(dims)
            assert types[name].storage_class == storage_class
            expected = 1 if name == "truth_sky" else n_vd
            assert len(butler.query_datasets(name)) == expected
        assert len(butler.query_datasets("skyMap")) == 1
        data_ids = butler.query_data_ids(["visit", "detector"], datasets="calexp")
        assert {(d["visit"], d["detector"]) for d in data_ids} == {
            (v, d) for v in summary["visits"] for d in config.detector_ids
        }
        assert dict(butler.query_collections())["SimCam/defaults"] == "CHAINED"


def test_visit_records_and_regions(tiny_repo) -> None:
    repo, _ = tiny_repo
    plan = plan_survey(get_preset("tiny"))
    with Butler(repo) as butler:
        visits = {r["id"]: r for r in butler.query_dimension_records("visit")}
        assert sorted(visits) == [v.id for v in plan.visits]
        for spec in plan.visits:
            rec = visits[spec.id]
            assert rec["physical_filter"] == "r_sim"
            assert rec["seeing"] == pytest.approx(spec.seeing_arcsec)
            assert rec["mjd"] == pytest.approx(spec.mjd)
            assert rec["exposure_time"] == 30.0
        regions = butler.query_dimension_records("visit_detector_region")
        assert len(regions) == len(plan.visits) * 2
        # Spatial join: each visit-detector overlaps a few patches of the 3x3 tiny skymap.
        patches = butler.query_dimension_records("patch")
        assert len(patches) == 9
        joined = butler.query_data_ids(["visit", "detector", "patch"])
        per_vd: dict[tuple[int, int], int] = {}
        for d in joined:
            per_vd[(d["visit"], d["detector"])] = per_vd.get((d["visit"], d["detector"]), 0) + 1
        assert len(per_vd) == len(plan.visits) * 2
        assert all(2 <= n <= 9 for n in per_vd.values())


def test_stored_calexp_round_trips_and_matches_the_simulation(tiny_repo) -> None:
    repo, summary = tiny_repo
    plan = plan_survey(get_preset("tiny"))
    visit = plan.visits[-1].id
    sim = simulate_visit_detector(plan, visit, 5)
    with Butler(repo, collections="SimCam/defaults") as butler:
        calexp = butler.get("calexp", instrument="SimCam", visit=visit, detector=5)
        assert isinstance(calexp, Exposure)
        assert np.array_equal(calexp.image, sim.exposure.image)
        assert np.array_equal(calexp.mask, sim.exposure.mask)
        assert np.array_equal(calexp.variance, sim.exposure.variance)
        assert isinstance(calexp.psf, GridPsf)
        assert calexp.psf.fwhm(200, 200) == pytest.approx(sim.exposure.psf.fwhm(200, 200))
        assert calexp.photo_calib == sim.exposure.photo_calib
        assert calexp.visit_info.visit_id == visit and calexp.band == "r"
        assert calexp.metadata["SIM_PRESET"] == "tiny"
        x, y = calexp.sky_to_pixel(*calexp.pixel_to_sky(123.4, 56.7))
        assert (float(x), float(y)) == (pytest.approx(123.4, abs=1e-6), pytest.approx(56.7, abs=1e-6))
        src = butler.get("src", instrument="SimCam", visit=visit, detector=5)
        assert np.array_equal(np.asarray(src["psfFlux"]), np.asarray(sim.src["psfFlux"]))
        truth = butler.get("truth_sources", instrument="SimCam", visit=visit, detector=5)
        transients = butler.get("truth_transients", instrument="SimCam", visit=visit, detector=5)
        for table in (truth, transients):
            assert set(TRUTH_COLUMNS) <= set(table.colnames)
            assert str(table["trueFlux"].unit) == "nJy"
        assert set(transients["sourceType"]) <= {"transient", "variable"}
        sky = butler.get("truth_sky", skymap="simcam_tiny", tract=0)
        assert len(sky) == len(plan.sky)
        assert set(truth["id"]) <= set(sky["id"])


def test_filling_the_same_run_twice_is_a_clear_error(tiny_repo) -> None:
    repo, _ = tiny_repo
    with pytest.raises(DatasetExistsError, match="already holds calexp"):
        write_repository(repo, get_preset("tiny"))


def test_register_instrument_cli(tmp_path) -> None:
    runner = CliRunner()
    repo = str(tmp_path / "repo")
    assert runner.invoke(butler_cli, ["create", repo]).exit_code == 0
    result = runner.invoke(butler_cli, ["register-instrument", repo, "tasks.instruments.simcam.SimCam"])
    assert result.exit_code == 0, result.output
    assert "9 detectors" in result.output
    with Butler(repo) as butler:
        dets = butler.query_dimension_records("detector")
        assert sorted(d["full_name"] for d in dets) == [f"S{r}{c}" for r in range(3) for c in range(3)]
        filters = {f["name"]: f["band"] for f in butler.query_dimension_records("physical_filter")}
        assert filters == {"g_sim": "g", "r_sim": "r", "i_sim": "i"}
        inst = butler.query_dimension_records("instrument")[0]
        assert inst["class_name"] == "tasks.instruments.simcam.SimCam"


@pytest.mark.parametrize("size", [400, 4096])
def test_simcam_focal_plane(size: int) -> None:
    cam = SimCam(size)
    config = cam.to_config()
    assert config["name"] == "SimCam" and len(config["detectors"]) == 9
    boxes = []
    for det in cam.detectors():
        x0, y0 = det.to_focal_plane(-0.5, -0.5)
        boxes.append((x0, y0, x0 + size, y0 + size))
    # No two detectors overlap; the mosaic is centred on the boresight.
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    xs = [b[0] for b in boxes] + [b[2] for b in boxes]
    assert min(xs) == pytest.approx(-max(xs))
    assert max(xs) == pytest.approx(cam.focal_plane_half_size())
    centre = cam.detector(4)
    assert centre.to_focal_plane((size - 1) / 2, (size - 1) / 2) == (pytest.approx(0.0), pytest.approx(0.0))
    with pytest.raises(KeyError, match="0..8"):
        cam.detector(9)


def test_command_line(tmp_path, capsys) -> None:
    from tasks.simulation.__main__ import main

    repo = tmp_path / "cli_repo"
    args = ["--repo", str(repo), "--preset", "tiny", "--seed", "3"]
    assert main(args) == 0
    assert "simulated preset tiny (seed 3)" in capsys.readouterr().out
    with Butler(repo, collections="SimCam/defaults") as butler:
        assert butler.get("calexp", instrument="SimCam", visit=1000, detector=4).metadata["SIM_SEED"] == 3
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already holds calexp" in err and "Traceback" not in err
    bad = subprocess.run(
        [sys.executable, "-m", "tasks.simulation", "--repo", str(repo), "--preset", "huge"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
