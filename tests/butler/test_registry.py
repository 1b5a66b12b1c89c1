"""Registry: dimension records, data IDs, collections, dataset types and data-ID queries."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from butler.errors import (
    CollectionTypeError,
    DataIdError,
    DatasetExistsError,
    DatasetTypeConflictError,
    DimensionNameError,
    DimensionRecordNotFoundError,
    InvalidQueryError,
    MissingCollectionError,
    MissingDatasetTypeError,
)
from butler.refs import DatasetRef, DatasetType

from .conftest import INSTRUMENT, N_DETECTORS, N_PATCH, N_VISITS, detector_region, patch_region


def test_expand_data_id_fills_implied_dimensions(butler):
    reg = butler.registry
    full = reg.expand_data_id(["visit", "detector"], {"instrument": INSTRUMENT, "visit": 101, "detector": 2})
    assert full == {"instrument": INSTRUMENT, "band": "r", "physical_filter": "r_sim", "visit": 101, "detector": 2}
    with pytest.raises(DimensionRecordNotFoundError, match="no visit record for .*visit: 999"):
        reg.expand_data_id(["visit"], {"instrument": INSTRUMENT, "visit": 999})
    with pytest.raises(DataIdError, match="says band='g' but the records say 'r'"):
        reg.expand_data_id(["visit"], {"instrument": INSTRUMENT, "visit": 101, "band": "g"})
    with pytest.raises(DataIdError, match="must be an integer"):
        reg.expand_data_id(["visit"], {"instrument": INSTRUMENT, "visit": "101"})
    with pytest.raises(DataIdError, match=r"unexpected data ID key\(s\) \['tract'\]"):
        reg.expand_data_id(["visit"], {"instrument": INSTRUMENT, "visit": 101, "tract": 0})


def test_dimension_records_insert_and_query(butler):
    recs = butler.query_dimension_records("visit", where="seeing > 0.95")
    assert [r["id"] for r in recs] == [104, 105]
    assert recs[0]["physical_filter"] == "g_sim"
    ra, dec = recs[0]["region"].vertices_radec()
    assert ra.min() == pytest.approx(150.0 + 0.07 * 4) and dec.max() == pytest.approx(2.0 + 0.03 * 4 + 0.2)
    assert len(butler.query_dimension_records("detector", instrument=INSTRUMENT)) == N_DETECTORS
    with pytest.raises(DatasetExistsError, match="already exist"):
        butler.insert_dimension_records("detector", [{"instrument": INSTRUMENT, "id": 0}])
    assert butler.insert_dimension_records("detector", [{"instrument": INSTRUMENT, "id": 0}], skip_existing=True) == 0
    with pytest.raises(DataIdError, match="unknown field 'seeing_arcsec'"):
        butler.insert_dimension_records("detector", [{"instrument": INSTRUMENT, "id": 9, "seeing_arcsec": 1.0}])
    with pytest.raises(DimensionNameError, match="unknown dimension element 'exposure'"):
        butler.query_dimension_records("exposure")
    with pytest.raises(InvalidQueryError):
        butler.query_dimension_records("visit", where="sky_level > 3")


def test_collections_runs_chains_tags(butler):
    reg = butler.registry
    assert reg.register_collection("run2") is True and reg.register_collection("run2") is False
    butler.set_collection_chain("chain", ["run2", "run1"])
    assert reg.get_collection_chain("chain") == ["run2", "run1"]
    assert [c.name for c in reg.flatten_collections("chain")] == ["run2", "run1"]
    butler.set_collection_chain("outer", ["chain"])
    with pytest.raises(CollectionTypeError, match="cycle"):
        reg.set_collection_chain("chain", ["outer"])
    with pytest.raises(CollectionTypeError, match="already exists as RUN"):
        reg.register_collection("run2", "CHAINED")
    with pytest.raises(MissingCollectionError, match="collection 'nope' does not exist; existing collections: .*run1"):
        reg.get_collection("nope")
    for bad in ["../x", "/abs", "a//b", "", "a\x00b", "."]:
        with pytest.raises(CollectionTypeError, match="collection name"):
            reg.register_collection(bad)
    assert ("chain", "CHAINED") in butler.query_collections("ch*")


def test_dataset_types(butler):
    assert butler.register_dataset_type("calexp", ["visit", "detector"], "Exposure") is True
    assert butler.register_dataset_type("calexp", ["instrument", "visit", "detector"], "Exposure") is False
    assert butler.registry.get_dataset_type("calexp").dimensions == ("instrument", "visit", "detector")
    with pytest.raises(DatasetTypeConflictError, match="already registered"):
        butler.register_dataset_type("calexp", ["visit"], "Exposure")
    with pytest.raises(MissingDatasetTypeError, match="'src' is not registered; registered: calexp"):
        butler.registry.get_dataset_type("src")
    with pytest.raises(KeyError):
        butler.register_dataset_type("x", ["visit"], "NoSuchClass")
    with pytest.raises(DatasetTypeConflictError, match="invalid dataset type name"):
        butler.register_dataset_type("bad name", ["visit"], "Exposure")


def _brute_force_pairs():
    pairs = set()
    for v in range(N_VISITS):
        for d in range(N_DETECTORS):
            for j in range(N_PATCH):
                for i in range(N_PATCH):
                    if detector_region(v, d).overlaps(patch_region(i, j)):
                        pairs.add((100 + v, d, j * N_PATCH + i))
    return pairs


def test_spatial_join_matches_brute_force(butler):
    expected = _brute_force_pairs()
    assert 0 < len(expected) < N_VISITS * N_DETECTORS * N_PATCH**2
    got = butler.query_data_ids(["visit", "detector", "patch"])
    assert {(d["visit"], d["detector"], d["patch"]) for d in got} == expected
    one = butler.query_data_ids(["patch"], where="visit = 103 AND detector = 2")
    assert {d["patch"] for d in one} == {p for v, det, p in expected if (v, det) == (103, 2)}
    reverse = butler.query_data_ids(["visit", "detector"], where="patch = 5 AND tract = 0 AND skymap = 'sky'")
    assert {(d["visit"], d["detector"]) for d in reverse} == {(v, det) for v, det, p in expected if p == 5}
    keys = ["instrument", "visit", "detector", "skymap", "tract", "patch"]
    assert [tuple(d[k] for k in keys) for d in got] == sorted(tuple(d[k] for k in keys) for d in got)
    # Fixed leading keys (integer keys numbered with numpy), and a fixed key that does not lead.
    assert butler.query_data_ids(["visit", "detector", "patch"], instrument=INSTRUMENT, skymap="sky") == got
    fixed = butler.query_data_ids(["visit", "detector", "patch"], instrument=INSTRUMENT, detector=2)
    assert fixed == [d for d in got if d["detector"] == 2]


def test_query_data_ids_with_records_and_implied(butler):
    got = butler.query_data_ids(["visit", "detector"], where="band = 'r' AND visit.seeing < 1.0 AND detector IN (0..1)")
    assert {(d["visit"], d["detector"]) for d in got} == {(101, 0), (101, 1), (103, 0), (103, 1)}
    assert len(butler.query_data_ids(["visit", "detector"])) == N_VISITS * N_DETECTORS
    assert butler.query_data_ids(["visit"], where="visit > :v", bind={"v": 103}) == [
        {"instrument": INSTRUMENT, "visit": v} for v in (104, 105)
    ]
    with pytest.raises(InvalidQueryError, match="seeingg"):
        butler.query_data_ids(["visit"], where="visit.seeingg < 1")


def test_batch_overlaps_agree_with_spherical_geometry():
    from butler.regions import RegionBatch, SkyRegion

    rng = np.random.default_rng(3)
    first, second, expected = [], [], []
    for _ in range(300):
        ra0, dec0 = rng.uniform(0, 360), rng.uniform(-80, 80)
        w1, h1, w2, h2 = rng.uniform(0.05, 0.5, 4)
        dra, ddec = rng.normal(0, 0.4, 2)
        r1 = SkyRegion.from_radec([ra0, ra0 + w1, ra0 + w1, ra0], [dec0, dec0, dec0 + h1, dec0 + h1])
        r2 = SkyRegion.from_radec(
            [ra0 + dra, ra0 + dra + w2, ra0 + dra + w2 / 2], [dec0 + ddec, dec0 + ddec, dec0 + ddec + h2]
        )
        first.append(r1)
        second.append(r2)
        expected.append(bool(r1.polygon.intersects_poly(r2.polygon)))  # the library, independently
    verts = lambda regions: [np.stack(r.vertices_radec(), axis=1) for r in regions]  # noqa: E731
    index = np.arange(len(first))
    got = RegionBatch(verts(first)).overlaps(RegionBatch(verts(second)), index, index)
    assert 30 < sum(expected) < 270  # both outcomes are exercised
    assert list(got) == expected
    assert list(got) == [a.overlaps(b) for a, b in zip(first, second)]


def test_insert_datasets_rejects_duplicates_atomically(butler):
    reg = butler.registry
    butler.register_dataset_type("flag", ["visit", "detector"], "StructuredDataDict")
    dt = reg.get_dataset_type("flag")
    reg.register_collection("run1")
    did = {"instrument": INSTRUMENT, "visit": 100, "detector": 0}
    reg.insert_datasets([DatasetRef(dt, did, "run1", path="a")])
    other = {"instrument": INSTRUMENT, "visit": 100, "detector": 1}
    with pytest.raises(DatasetExistsError, match="already exists in run 'run1'"):
        reg.insert_datasets([DatasetRef(dt, other, "run1", path="b"), DatasetRef(dt, did, "run1", path="c")])
    assert reg.find_dataset("flag", other, ["run1"]) is None  # the batch was rolled back
    assert isinstance(dt, DatasetType)


def test_records_with_different_optional_fields_insert_together(butler):
    from butler.regions import SkyRegion

    region = SkyRegion.from_radec([10, 10.1, 10.1, 10], [0, 0, 0.1, 0.1])
    butler.insert_dimension_records(
        "visit",
        [
            {"instrument": INSTRUMENT, "id": 900, "physical_filter": "g_sim", "seeing": 0.9, "region": region},
            {"instrument": INSTRUMENT, "id": 901, "physical_filter": "g_sim"},
        ],
    )
    recs = {r["id"]: r for r in butler.query_dimension_records("visit", where="visit >= 900")}
    assert recs[900]["seeing"] == 0.9 and recs[901]["seeing"] is None and recs[901]["region"] is None
    assert butler.query_data_ids(["visit"], where="visit >= 900 AND band = 'g'") == [
        {"instrument": INSTRUMENT, "visit": 900},
        {"instrument": INSTRUMENT, "visit": 901},
    ]


def test_data_id_queries_and_finds_see_tagged_collections(butler):
    butler.register_dataset_type("flag", ["visit", "detector"], "StructuredDataDict")
    ref = butler.put({"ok": True}, "flag", instrument=INSTRUMENT, visit=102, detector=3)
    butler.put({"ok": False}, "flag", instrument=INSTRUMENT, visit=103, detector=0)
    butler.register_collection("best", "TAGGED")
    butler.registry.associate("best", [ref])
    got = butler.query_data_ids(["visit", "detector"], datasets="flag", collections="best")
    assert got == [{"instrument": INSTRUMENT, "visit": 102, "detector": 3}]
    assert butler.get("flag", instrument=INSTRUMENT, visit=102, detector=3, collections="best") == {"ok": True}
    assert butler.query_datasets("flag", collections="best") == [ref]
    with pytest.raises(DatasetExistsError, match="already holds"):
        butler.registry.associate("best", [ref])


def test_regions_given_as_dicts_are_validated_together_stored_exactly_and_indexed(tmp_path):
    from butler.butler import Butler
    from butler.htm import htm_cover
    from butler.regions import SkyRegion

    Butler.create(tmp_path / "r")
    with Butler(tmp_path / "r", run="setup") as b:
        b.insert_dimension_records("skymap", [{"name": "sky"}])
        given = [
            SkyRegion.from_radec([10.0, 10.3, 10.3, 10.0], [-5.0, -5.0, -4.7, -4.7]),
            SkyRegion.from_radec([10.2, 10.5, 10.35], [-4.9, -4.9, -4.5]),
            SkyRegion.from_radec([10.0, 11.0, 10.5, 11.0, 10.0], [-6.0, -6.0, -5.5, -5.0, -5.0]),  # non-convex
        ]
        records = [{"skymap": "sky", "id": i, "region": r.to_dict()} for i, r in enumerate(given)]
        assert b.insert_dimension_records("tract", records) == 3
        stored = b.query_dimension_records("tract")
        assert [r["region"] for r in stored] == given  # the exact vertices, back from the bytes
        table = b.registry.tables.htm["tract"]
        with b.registry.engine.connect() as conn:
            rows = sorted(conn.execute(sa.select(table.c.tract, table.c.pix)).all())
        owner, pixels = htm_cover(given, b.registry.universe.htm_level)
        assert rows == sorted(zip(owner.tolist(), pixels.tolist(), strict=True))
        # Existing records are skipped with their index rows; a bad region is refused.
        assert b.insert_dimension_records("tract", records, skip_existing=True) == 0
        with b.registry.engine.connect() as conn:
            assert len(conn.execute(sa.select(table.c.pix)).all()) == len(rows)
        with pytest.raises(Exception, match="coincide"):
            b.insert_dimension_records("tract", [{"skymap": "sky", "id": 9, "region": {"vertices": [[1, 1], [1, 1], [2, 2]]}}])
        assert b.query_data_ids(["tract"], where="tract = 9") == []


def test_a_registry_of_another_schema_version_is_refused_clearly(tmp_path):
    import sqlite3

    from butler.butler import Butler

    Butler.create(tmp_path / "old")
    con = sqlite3.connect(tmp_path / "old" / "registry.sqlite3")
    con.execute("UPDATE butler_attributes SET value = '1' WHERE name = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(DataIdError, match="schema version 1; this diapipe reads 2"):
        Butler(tmp_path / "old")


def test_registry_region_bytes_round_trip_exactly():
    from butler.errors import DataModelError
    from butler.regions import SkyRegion
    from butler.registry.spatial import region_bytes, region_from_bytes, vertices_from_bytes

    region = SkyRegion([359.999999999, 0.1 / 3, 0.1], [-1e-9, 0.0, 2.0 / 3])
    back = region_from_bytes(region_bytes(region))
    assert back == region and len(region_bytes(region)) == 6 * 8
    with pytest.raises(DataModelError, match="3 or more"):
        vertices_from_bytes(region_bytes(region)[:32])
