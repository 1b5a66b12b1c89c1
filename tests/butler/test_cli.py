"""The ``butler`` command: every verb, output formats, one-line errors and exit codes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from butler.butler import Butler
from butler.cli import main

from .conftest import INSTRUMENT, fill_dimensions


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli_repo(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert run(capsys, "create", repo)[0] == 0
    with Butler(repo, run="setup") as b:
        fill_dimensions(b)
        b.register_dataset_type("info", ["visit", "detector"], "StructuredDataDict")
        for v in range(100, 106):
            for d in range(4):
                b.put({"v": v, "d": d}, "info", instrument=INSTRUMENT, visit=v, detector=d, run="runA")
        b.put({"x": 1}, "info", instrument=INSTRUMENT, visit=100, detector=0, run="runB")
        b.set_collection_chain("chain", ["runB", "runA"])
    return repo


def test_help_is_light_and_fast():
    code = (
        "import sys, butler.cli as c\n"
        "try:\n c.cli.main(args=['--help'], standalone_mode=False)\nexcept SystemExit: pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'zarr', 'astropy', 'tasks', 'numpy', 'sqlalchemy'))\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "query-datasets" in out and out.strip().endswith("[]")


def test_query_datasets_where_and_formats(cli_repo, capsys):
    code, out, _ = run(capsys, "query-datasets", cli_repo, "info", "--collections", "runA", "--where", "visit > 103 AND detector = 1")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["type", "run", "id"] and len(lines) == 2 + 2
    code, out, _ = run(capsys, "query-datasets", cli_repo, "info", "--collections", "chain", "--where", "detector = 0", "--format", "json")
    rows = json.loads(out)
    assert {(r["visit"], r["run"]) for r in rows} == {(100, "runB"), *((v, "runA") for v in range(101, 106))}
    code, out, _ = run(capsys, "query-datasets", cli_repo, "info", "--collections", "runA", "--limit", "3", "--format", "csv")
    assert len(list(csv.DictReader(io.StringIO(out)))) == 3


def test_query_collections_dataset_types_data_ids_records(cli_repo, capsys):
    code, out, _ = run(capsys, "query-collections", cli_repo, "--format", "json")
    rows = {r["Name"]: r for r in json.loads(out)}
    assert rows["chain"]["Type"] == "CHAINED" and rows["chain"]["Children"] == "runB,runA"
    code, out, _ = run(capsys, "query-dataset-types", cli_repo)
    assert "info" in out and "StructuredDataDict" in out
    code, out, _ = run(capsys, "query-data-ids", cli_repo, "patch", "--where", "visit = 103 AND detector = 2", "--format", "json")
    assert code == 0 and all(r["skymap"] == "sky" for r in json.loads(out)) and json.loads(out)
    code, out, _ = run(capsys, "query-dimension-records", cli_repo, "visit", "--where", "seeing < 0.75", "--format", "json")
    recs = json.loads(out)
    assert [r["id"] for r in recs] == [100, 101] and recs[0]["region"].startswith("(")


def test_register_instrument_dataset_type_and_remove_runs(cli_repo, tmp_path, capsys):
    inst = tmp_path / "cam.yaml"
    inst.write_text(
        yaml.safe_dump(
            {"name": "TinyCam", "detectors": [{"id": 0, "full_name": "A"}, {"id": 1}], "physical_filters": [{"name": "z_t", "band": "z"}]}
        )
    )
    assert run(capsys, "register-instrument", cli_repo, inst)[0] == 0
    with Butler(cli_repo) as b:
        assert len(b.query_dimension_records("detector", instrument="TinyCam")) == 2
        assert {r["name"] for r in b.query_dimension_records("band")} == {"g", "r", "z"}
    code, out, _ = run(capsys, "register-dataset-type", cli_repo, "calexp", "Exposure", "instrument", "visit", "detector")
    assert code == 0 and "registered: calexp" in out
    code, out, _ = run(capsys, "remove-runs", cli_repo, "runB", "--no-confirm")
    assert code == 0 and "1 dataset" in out
    with Butler(cli_repo) as b:
        assert "runB" not in [n for n, _ in b.query_collections()]
        assert b.registry.get_collection_chain("chain") == ["runA"]


def test_register_skymap_from_yaml(tmp_path, capsys):
    repo = tmp_path / "r"
    run(capsys, "create", repo)
    config = tmp_path / "skymap.yaml"
    config.write_text(
        yaml.safe_dump(
            {"name": "tiny", "skymap_type": "discrete", "centers": [[150.0, 2.0, 0.1]], "patch_inner_dimensions": [1000, 1000], "patch_border": 50}
        )
    )
    code, out, err = run(capsys, "register-skymap", repo, "-C", config)
    assert code == 0, err
    with Butler(repo, collections="skymaps") as b:
        skymap = b.get("skyMap", skymap="tiny")
        n_patches = len(b.query_dimension_records("patch"))
        assert n_patches == sum(len(t.patches()) for t in skymap) and n_patches > 1
    assert run(capsys, "register-skymap", repo, "-C", config)[0] == 0  # idempotent


def test_ingest_fits(cli_repo, tmp_path, capsys):
    from astropy.wcs import WCS

    from butler import Exposure
    from butler.formats.fits_exposure import write_exposure_fits

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.2, 2.1]
    w.wcs.crpix = [32, 32]
    w.wcs.cd = np.eye(2) * 0.2 / 3600
    path = tmp_path / "img.fits"
    write_exposure_fits(Exposure(np.arange(64 * 64.0).reshape(64, 64), wcs=w), path)
    run(capsys, "register-dataset-type", cli_repo, "ext", "Exposure", "instrument", "visit", "detector")
    code, out, err = run(capsys, "ingest", cli_repo, "ext", "ingested", path, "--data-id", f"instrument={INSTRUMENT},visit=101,detector=1")
    assert code == 0, err
    with Butler(cli_repo, collections="ingested") as b:
        assert float(b.get("ext", instrument=INSTRUMENT, visit=101, detector=1).image[1, 2]) == 66.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["query-datasets", "{repo}", "nope"], "dataset type 'nope' is not registered"),
        (["query-datasets", "{repo}", "info", "--collections", "ghost"], "collection 'ghost' does not exist"),
        (["query-datasets", "{repo}", "info", "--where", "visit >"], "expected"),
        (["query-datasets", "{repo}", "info", "--where", "visit = 1; DROP TABLE dataset"], "where expression"),
        (["query-data-ids", "{repo}", "visit", "--where", "visit.seeingg < 1"], "unknown identifier 'visit.seeingg'"),
        (["query-dimension-records", "{repo}", "exposure"], "unknown dimension element 'exposure'"),
        (["register-dataset-type", "{repo}", "x", "NoClass", "visit"], "unknown storage class 'NoClass'"),
        (["remove-runs", "{repo}", "chain", "--no-confirm"], "is CHAINED, not RUN"),
        (["query-collections", "{tmp}/not_a_repo"], "is not a butler repository"),
    ],
)
def test_errors_are_one_line_exit_1(cli_repo, tmp_path, capsys, args, message):
    args = [a.format(repo=cli_repo, tmp=tmp_path) for a in args]
    code, out, err = run(capsys, *args)
    assert code == 1
    assert err.startswith("butler: error: ") and err.count("\n") == 1, err
    assert message in err
    with Butler(cli_repo, collections="chain") as b:  # nothing changed
        assert len(b.query_datasets("info", collections="runA")) == 24


def test_usage_errors_exit_2(cli_repo, capsys):
    code, _, err = run(capsys, "query-datasets", cli_repo)
    assert code == 2 and "Missing argument" in err
    code, _, err = run(capsys, "query-datasets", cli_repo, "info", "--format", "xml")
    assert code == 2 and "xml" in err
