"""Parquet catalogs and JSON documents: round trips, corruption, overwrite rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import MaskedColumn, Table

from butler import GaussianPsf, GridPsf, make_source_catalog
from butler.errors import CorruptFileError, DataModelError, FormatError
from butler.formats import (
    read_catalog_parquet,
    read_config_json,
    read_document,
    read_json,
    read_psf_json,
    read_skymap_json,
    write_catalog_parquet,
    write_config_json,
    write_document,
    write_json,
    write_psf_json,
    write_skymap_json,
)


def make_catalog(n: int = 50) -> Table:
    columns = ("xErr", "psfFlux", "psfFluxErr", "ixx", "snr", "isNegative", "parent", "pixelFlags_edge")
    table = make_source_catalog(n, columns=columns, meta={"apRadius": 5.0, "band": "r", "nested": {"k": [1, 2]}})
    rng = np.random.default_rng(7)
    # Fill in place ([:]) so the columns keep their conventional units and descriptions.
    table["id"][:] = np.arange(n, dtype=np.int64) + 2**40
    table["coord_ra"][:] = rng.uniform(0, 360, n)
    table["x"][:] = rng.normal(size=n)
    table["xErr"][:] = rng.random(n)
    table["psfFlux"][:] = rng.normal(1e4, 100, n)
    table["isNegative"][:] = rng.random(n) < 0.3
    table["pixelFlags_edge"][:] = rng.random(n) < 0.1
    table["parent"][:] = rng.integers(-5, 5, n)
    table["name"] = np.array([f"src{i}" for i in range(n)])
    table["name"].description = "a string column"
    table["small"] = np.arange(n, dtype=np.int16)
    table["cov"] = rng.normal(size=(n, 2, 2)).astype(np.float32)
    table["cov"].unit = u.pix**2
    table["from_fits"] = np.arange(n).astype(">i4")  # FITS binary tables are big-endian
    table["from_fits_2d"] = np.arange(2 * n).reshape(n, 2).astype(">f8")
    table["maybe"] = MaskedColumn(rng.normal(size=n), mask=rng.random(n) < 0.2, unit="mag", description="sometimes")
    return table


def assert_same_table(a: Table, b: Table) -> None:
    assert b.colnames == a.colnames
    assert dict(b.meta) == dict(a.meta)
    for name in a.colnames:
        ca, cb = a[name], b[name]
        assert cb.dtype == ca.dtype, name
        assert cb.shape == ca.shape, name
        assert cb.unit == ca.unit, name
        assert cb.description == ca.description, name
        assert isinstance(cb, MaskedColumn) == isinstance(ca, MaskedColumn), name
        if isinstance(ca, MaskedColumn):
            np.testing.assert_array_equal(np.ma.getmaskarray(cb), np.ma.getmaskarray(ca))
            np.testing.assert_array_equal(cb.data[~cb.mask], ca.data[~ca.mask])
        else:
            np.testing.assert_array_equal(np.asarray(cb), np.asarray(ca))


def test_catalog_round_trip(tmp_path: Path) -> None:
    table = make_catalog()
    path = write_catalog_parquet(table, tmp_path / "src.parquet")
    back = read_catalog_parquet(path)
    assert_same_table(table, back)
    assert back["isNegative"].dtype == np.bool_ and back["id"].dtype == np.int64
    assert back["coord_ra"].unit == u.deg and back["psfFlux"].unit == u.nJy
    assert back["id"].description == "Unique source id within the catalog"


def test_empty_catalog_round_trip(tmp_path: Path) -> None:
    table = make_source_catalog(0, columns=("isDipole", "snr"))
    assert_same_table(table, read_catalog_parquet(write_catalog_parquet(table, tmp_path / "empty.parquet")))


def test_column_subset(tmp_path: Path) -> None:
    table = make_catalog()
    path = write_catalog_parquet(table, tmp_path / "src.parquet")
    back = read_catalog_parquet(path, columns=["psfFlux", "id", "isNegative"])
    assert back.colnames == ["psfFlux", "id", "isNegative"]
    np.testing.assert_array_equal(back["id"], table["id"])
    assert back["psfFlux"].unit == u.nJy and back.meta["apRadius"] == 5.0
    with pytest.raises(FormatError, match=r"no column\(s\) \['nope'\]; columns: id, coord_ra"):
        read_catalog_parquet(path, columns=["nope"])


def test_plain_pyarrow_readers_see_units(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    path = write_catalog_parquet(make_catalog(), tmp_path / "src.parquet")
    field = pq.read_schema(path).field("psfFlux")
    assert field.metadata[b"unit"] == b"nJy"


def test_catalog_overwrite_rules(tmp_path: Path) -> None:
    path = write_catalog_parquet(make_catalog(5), tmp_path / "src.parquet")
    with pytest.raises(FormatError, match="overwrite=True"):
        write_catalog_parquet(make_catalog(9), path)
    assert len(read_catalog_parquet(path)) == 5
    write_catalog_parquet(make_catalog(9), path, overwrite=True)
    assert len(read_catalog_parquet(path)) == 9
    assert os.listdir(tmp_path) == ["src.parquet"]


def test_catalog_rejects_what_it_cannot_store(tmp_path: Path) -> None:
    table = make_catalog(3)
    table.meta["when"] = object()
    with pytest.raises(DataModelError, match=r"table\.meta\['when'\]"):
        write_catalog_parquet(table, tmp_path / "a.parquet")
    table = Table({"c": SkyCoord([1, 2] * u.deg, [3, 4] * u.deg)})
    with pytest.raises(DataModelError, match="SkyCoord"):
        write_catalog_parquet(table, tmp_path / "b.parquet")
    assert os.listdir(tmp_path) == []


def test_garbage_and_truncated_parquet(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really" * 50)
    with pytest.raises(CorruptFileError, match=r"garbage\.parquet"):
        read_catalog_parquet(garbage)
    path = write_catalog_parquet(make_catalog(200), tmp_path / "src.parquet")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=r"src\.parquet"):
        read_catalog_parquet(path)
    with pytest.raises(FileNotFoundError):
        read_catalog_parquet(tmp_path / "missing.parquet")


# ----------------------------------------------------------------------------- JSON
def test_json_round_trip_and_numpy_values(tmp_path: Path) -> None:
    data = {"a": 1, "b": [1.5, None, "x"], "c": {"d": True}, "n": np.int64(3), "f": np.float32(0.5), "t": (1, 2)}
    path = write_json(data, tmp_path / "x.json")
    assert read_json(path) == {"a": 1, "b": [1.5, None, "x"], "c": {"d": True}, "n": 3, "f": 0.5, "t": [1, 2]}


def test_json_refuses_nan_with_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataModelError, match=r"\['inner'\]\['seeing'\]"):
        write_json({"inner": {"seeing": float("nan")}}, tmp_path / "x.json")
    assert os.listdir(tmp_path) == []


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": 1,\n  "b": ,\n}\n')
    with pytest.raises(CorruptFileError, match=r"bad\.json: invalid JSON at line 3, column 8"):
        read_json(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptFileError, match="not UTF-8"):
        read_json(path)
    path.write_text("")
    with pytest.raises(CorruptFileError, match="empty"):
        read_json(path)


def test_json_overwrite_rules(tmp_path: Path) -> None:
    path = write_json({"v": 1}, tmp_path / "x.json")
    with pytest.raises(FormatError, match="overwrite=True"):
        write_json({"v": 2}, path)
    assert read_json(path) == {"v": 1}
    write_json({"v": 2}, path, overwrite=True)
    assert read_json(path) == {"v": 2}


class FakeSkyMap:
    """Stands in for butler.skymap.SkyMap: anything with to_dict()."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def to_dict(self) -> dict:
        return dict(self.config)


def test_documents(tmp_path: Path) -> None:
    config = {"name": "discrete", "tracts": [{"ra": 150.0, "dec": 2.2}], "patch_inner": 4000, "border": 100}
    path = write_skymap_json(FakeSkyMap(config), tmp_path / "skyMap.json")
    assert read_skymap_json(path) == config
    assert json.loads(path.read_text())["format"] == "diapipe.skymap"
    with pytest.raises(FormatError, match=r"holds a 'diapipe.skymap' document, expected 'diapipe.config'"):
        read_config_json(path)
    write_config_json({"doWarp": True, "kernelOrder": 2}, tmp_path / "config.json")
    assert read_config_json(tmp_path / "config.json") == {"doWarp": True, "kernelOrder": 2}
    write_document("diapipe.thing", {"x": 1}, tmp_path / "v2.json", version=2)
    with pytest.raises(FormatError, match="newer"):
        read_document(tmp_path / "v2.json", "diapipe.thing", max_version=1)
    write_json([1, 2], tmp_path / "list.json")
    with pytest.raises(CorruptFileError, match="not a diapipe document"):
        read_document(tmp_path / "list.json", "diapipe.thing")
    with pytest.raises(DataModelError, match="to_dict"):
        write_skymap_json(object(), tmp_path / "nope.json")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "psf",
    [
        GaussianPsf(2.0, axis_ratio=0.7, theta_deg=30),
        GridPsf(np.array([[GaussianPsf(1.5, size=11).image(0, 0), GaussianPsf(2.5, size=11).image(0, 0)]]), [0.0, 100.0], [0.0]),
    ],
    ids=["gaussian", "grid"],
)
def test_psf_documents(tmp_path: Path, psf) -> None:  # type: ignore[no-untyped-def]
    back = read_psf_json(write_psf_json(psf, tmp_path / "psf.json"))
    assert back.to_dict() == psf.to_dict()
    for x, y in ((0.0, 0.0), (42.5, 3.0), (100.0, 0.0)):
        np.testing.assert_array_equal(back.image(x, y), psf.image(x, y))
    doc = json.loads((tmp_path / "psf.json").read_text())
    doc["data"]["type"] = "Nonsense"
    (tmp_path / "psf.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptFileError, match="invalid PSF"):
        read_psf_json(tmp_path / "psf.json")
