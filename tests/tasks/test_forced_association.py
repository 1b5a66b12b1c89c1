"""associateDiaSources: DIA sources of many visits -> DIA objects, one patch each, against truth.

Synthetic DIA sources scattered over a 3x3-patch skymap (objects seen in several visits with
centroid noise, some across patch boundaries) check the friends-of-friends grouping, the
inner-region rule that puts each object in exactly one patch, the object columns and the ids.
The simulated ``tiny`` survey through ``pipelines/DIA.yaml`` checks the pipeline's ``diaObject``
and ``goodSeeingDiff_assocDiaSrc``: every transient detected in two or more visits is exactly one
DIA object.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

from butler.butler import Butler
from butler.skymap import SkyMap
from pipeline.errors import NoWorkFound
from pipeline.testing import assert_valid_connections
from tasks.forced import AssociateDiaSourcesTask
from tasks.forced.association import AssociateDiaSourcesConfig, add_visit_columns, friends_of_friends, unit_vectors
from tasks.forced.schemas import DIA_OBJECT_COLUMNS
from tests.integration.dia_survey import dia_repository, patch_table, visit_table

SURVEY = {"variable_fraction": 0.25}
MJD0 = 60300.0


@pytest.fixture(scope="module")
def skymap() -> SkyMap:
    return SkyMap.discrete("assoc_test", [(150.1, 2.2, 0.02)], patch_inner_dimensions=(260, 260), patch_border=20,
                           tract_overlap=0.0, pixel_scale=0.2)


def _sources(skymap: SkyMap, n_objects: int = 300, n_visits: int = 6, seed: int = 1) -> tuple[list[Table], np.ndarray]:
    """diaSrc tables (one per visit) of objects seen in random subsets of visits, and each object's
    true (tract-pixel) position; ``truth_id`` names the object of each source."""
    rng = np.random.default_rng(seed)
    tract = skymap[0]
    box = tract.bbox
    # Objects 25 px (5 arcsec) apart or more, some right on patch boundaries.
    xy: list[tuple[float, float]] = []
    boundaries = [tract.get_patch_info(p).inner_bbox.x0 for p in range(1, 3)]
    while len(xy) < n_objects:
        if rng.uniform() < 0.2:
            cand = (boundaries[int(rng.integers(2))] + rng.normal(0, 3), rng.uniform(40, box.height - 40))
        else:
            cand = tuple(rng.uniform(40, box.width - 40, 2))
        if all(math.hypot(cand[0] - a, cand[1] - b) > 25 for a, b in xy):
            xy.append(cand)
    true_xy = np.array(xy)
    tables = []
    next_id = 1
    for visit in range(n_visits):
        seen = rng.uniform(size=n_objects) < 0.6
        k = np.flatnonzero(seen)
        x = true_xy[k, 0] + rng.normal(0, 0.4, k.size)  # 0.08 arcsec centroid noise
        y = true_xy[k, 1] + rng.normal(0, 0.4, k.size)
        ra, dec = tract.wcs.all_pix2world(x, y, 0)
        table = Table({
            "id": np.arange(next_id, next_id + k.size, dtype=np.int64), "coord_ra": ra, "coord_dec": dec, "x": x, "y": y,
            "xErr": np.full(k.size, 0.4), "yErr": np.full(k.size, 0.4),
            "psfFlux": rng.normal(1000, 100, k.size), "isNegative": rng.uniform(size=k.size) < 0.2,
            "isDipole": rng.uniform(size=k.size) < 0.1, "truth_id": k,
        })
        next_id += k.size
        tables.append(add_visit_columns(table, 100 + visit, 0, MJD0 + 3.0 * visit))
    return tables, true_xy


def test_connections_match_the_run_signature_where_lsst_does() -> None:
    with pytest.raises(AssertionError, match="exposures"):
        assert_valid_connections(AssociateDiaSourcesTask)  # the epochs are read in runQuantum, as LSST does


def test_friends_of_friends_links_chains_within_the_radius() -> None:
    ra = 150.0 + np.array([0.0, 0.8, 1.6, 10.0, 10.5, 30.0]) / 3600.0
    dec = np.full(6, 2.0)
    labels = friends_of_friends(unit_vectors(ra, dec), 1.0)
    assert labels[0] == labels[1] == labels[2]  # a chain of 0.8" links
    assert labels[3] == labels[4] != labels[0]
    assert len(set(labels)) == 3
    assert friends_of_friends(np.zeros((0, 3)), 1.0).size == 0


def test_each_object_is_found_once_in_exactly_one_patch(skymap) -> None:
    tables, true_xy = _sources(skymap)
    task = AssociateDiaSourcesTask()
    objects, members = [], []
    for patch in range(9):
        out = task.run(tables, skymap, 0, patch)
        assert set(out.diaObjects.colnames) == set(DIA_OBJECT_COLUMNS)
        assert np.all(out.diaObjects["diaObjectId"] // 10_000_000 == patch)
        objects.append(out.diaObjects)
        members.append(out.assocDiaSources)
    all_ids = np.concatenate([np.asarray(o["diaObjectId"]) for o in objects])
    assert np.unique(all_ids).size == all_ids.size
    assoc = np.concatenate([np.asarray(m["id"]) for m in members])
    n_sources = sum(len(t) for t in tables)
    assert np.unique(assoc).size == assoc.size == n_sources  # every source in one object of one patch
    # Objects are the true objects: one per true object seen, with all its sources and nothing else.
    by_object: dict[int, set[int]] = defaultdict(set)
    for m in members:
        for oid, tid in zip(m["diaObjectId"], m["truth_id"], strict=True):
            by_object[int(oid)].add(int(tid))
    assert all(len(t) == 1 for t in by_object.values())
    seen = {int(t) for table in tables for t in table["truth_id"]}
    assert len(by_object) == len(seen) == all_ids.size
    # Object columns.
    obj = next(o for o in objects if len(o))
    member = next(m for m in members if len(m))
    row = obj[obj["diaObjectId"] == member["diaObjectId"][0]][0]
    src = member[member["diaObjectId"] == row["diaObjectId"]]
    assert row["nDiaSources"] == len(src) and row["nVisits"] == len(set(src["visit"]))
    assert row["nNegativeDiaSources"] == src["isNegative"].sum() and row["nDipoleDiaSources"] == src["isDipole"].sum()
    assert row["firstDiaSourceMjd"] == src["midpointMjdTai"].min() and row["lastDiaSourceMjd"] == src["midpointMjdTai"].max()
    true_ra, true_dec = skymap[0].wcs.all_pix2world(*true_xy[int(src["truth_id"][0])], 0)
    assert math.hypot((row["coord_ra"] - true_ra) * math.cos(math.radians(2.2)), row["coord_dec"] - true_dec) * 3600 < 0.1


def test_object_positions_weight_by_centroid_errors_and_ignore_dipoles(skymap) -> None:
    ra0, dec0 = skymap[0].wcs.all_pix2world(410.0, 410.0, 0)
    arcsec = 1.0 / 3600.0
    # Two precise detections 0.1" apart, a noisy one 0.4" off, and a dipole midpoint 0.8" off.
    offsets = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.4], [0.8, 0.0]]) * arcsec
    table = Table({
        "id": np.arange(1, 5, dtype=np.int64), "coord_ra": ra0 + offsets[:, 0] / math.cos(math.radians(dec0)),
        "coord_dec": dec0 + offsets[:, 1], "xErr": np.array([0.05, 0.05, 1.0, 0.01]), "yErr": np.array([0.05, 0.05, 1.0, 0.01]),
        "isNegative": np.zeros(4, bool), "isDipole": np.array([False, False, False, True]),
    })
    tables = [add_visit_columns(table[k : k + 1], 100 + k, 0, MJD0 + k) for k in range(4)]
    out = AssociateDiaSourcesTask().run(tables, skymap, 0, 4).diaObjects
    assert len(out) == 1 and out["nDiaSources"][0] == 4 and out["nDipoleDiaSources"][0] == 1
    d_ra = (out["coord_ra"][0] - ra0) * math.cos(math.radians(dec0)) / arcsec
    d_dec = (out["coord_dec"][0] - dec0) / arcsec
    assert d_ra == pytest.approx(0.05, abs=0.002) and abs(d_dec) < 0.002
    # An object of dipoles alone sits at their mean position.
    alone = AssociateDiaSourcesTask().run([tables[3]], skymap, 0, 4).diaObjects
    assert (alone["coord_ra"][0] - ra0) * math.cos(math.radians(dec0)) / arcsec == pytest.approx(0.8, abs=1e-6)


def test_result_does_not_depend_on_the_order_of_the_inputs(skymap) -> None:
    tables, _ = _sources(skymap, n_objects=120, seed=3)
    task = AssociateDiaSourcesTask()
    forward = task.run(tables, skymap, 0, 4)
    backward = task.run(list(reversed(tables)), skymap, 0, 4)
    for name in forward.diaObjects.colnames:
        np.testing.assert_array_equal(forward.diaObjects[name], backward.diaObjects[name])
    np.testing.assert_array_equal(forward.assocDiaSources["id"], backward.assocDiaSources["id"])


def test_exclude_flags_and_no_work(skymap) -> None:
    tables, _ = _sources(skymap, n_objects=60, seed=5)
    config = AssociateDiaSourcesConfig()
    config.excludeFlags = ["isDipole"]
    out = AssociateDiaSourcesTask(config=config).run(tables, skymap, 0, 4)
    assert len(out.assocDiaSources) and not out.assocDiaSources["isDipole"].any()
    with pytest.raises(NoWorkFound):
        AssociateDiaSourcesTask().run([t[:0] for t in tables], skymap, 0, 4)
    with pytest.raises(ValueError, match="midpointMjdTai"):
        AssociateDiaSourcesTask().run([t[["id", "coord_ra", "coord_dec"]] for t in tables], skymap, 0, 4)
    with pytest.raises(ValueError, match="matchRadius"):
        AssociateDiaSourcesConfig(matchRadius=0.0).validate()


# ---------------------------------------------------------------------------------- simulated survey
@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    butler = Butler(dia_repository(tmp_path_factory, **SURVEY), collections=["u/dia"])
    return (
        butler,
        visit_table(butler, "goodSeeingDiff_diaSrc"),
        patch_table(butler, "diaObject"),
        patch_table(butler, "goodSeeingDiff_assocDiaSrc"),
        visit_table(butler, "truth_transients"),
    )


def _detections(dia: Table, truth: Table, kind: str) -> dict[int, list[tuple[int, int]]]:
    """``{truth id: [(visit, diaSrc id), ...]}``: diaSrc within 2 px of an active truth source of ``kind``."""
    found: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for visit, detector in set(zip(dia["visit"].tolist(), dia["detector"].tolist(), strict=True)):
        src = dia[(dia["visit"] == visit) & (dia["detector"] == detector)]
        t = truth[(truth["visit"] == visit) & (truth["detector"] == detector) & truth["isActive"] & (truth["sourceType"] == kind)]
        if not len(t):
            continue
        dist, index = cKDTree(np.column_stack([t["x"], t["y"]])).query(np.column_stack([src["x"], src["y"]]))
        for k in np.flatnonzero(dist < 2.0):
            found[int(t["id"][index[k]])].append((visit, int(src["id"][k])))
    return found


def test_survey_transients_seen_twice_are_one_dia_object(survey) -> None:
    butler, dia, objects, assoc, truth = survey
    assert np.unique(objects["diaObjectId"]).size == len(objects)  # unique across patches
    assert np.unique(assoc["id"]).size == len(assoc)  # each DIA source in one object
    assert np.isin(dia["id"], assoc["id"]).mean() > 0.98
    object_of = dict(zip(assoc["id"].tolist(), assoc["diaObjectId"].tolist(), strict=True))
    patch_of = dict(zip(objects["diaObjectId"].tolist(), objects["patch"].tolist(), strict=True))
    detections = {kind: _detections(dia, truth, kind) for kind in ("transient", "variable")}
    # Two detected sources closer than the linking length (e.g. two transients 0.23" apart on one
    # host) are one object by design: they are left out of the one-to-one checks.
    sky = butler.get("truth_sky", skymap="simcam_tiny", tract=0)
    detected = sky[np.isin(sky["id"], [t for found in detections.values() for t in found])]
    xyz = unit_vectors(detected["coord_ra"], detected["coord_dec"])
    pairs = cKDTree(xyz).query_pairs(2 * math.sin(math.radians(1.0 / 3600) / 2), output_type="ndarray")
    unresolved = set(np.asarray(detected["id"])[pairs.ravel()].tolist())
    multi = 0
    owners: dict[int, int] = {}
    for kind, found in detections.items():
        for truth_id, hits in found.items():
            if truth_id in unresolved:
                continue
            ids = {object_of.get(src_id) for _, src_id in hits}
            if len({visit for visit, _ in hits}) >= 2:
                multi += kind == "transient"
                assert len(ids) == 1 and None not in ids, f"{kind} {truth_id}: detections {hits} in objects {ids}"
                assert next(iter(ids)) in patch_of
            for oid in ids - {None}:
                assert owners.setdefault(oid, truth_id) == truth_id, f"object {oid} holds two truth sources"
    assert multi >= 5
    # Object epochs are the visits' epochs.
    mjd = {r["id"]: r["mjd"] for r in butler.query_dimension_records("visit")}
    np.testing.assert_allclose(assoc["midpointMjdTai"], [mjd[v] for v in assoc["visit"]])
    first = {oid: assoc["midpointMjdTai"][assoc["diaObjectId"] == oid].min() for oid in objects["diaObjectId"][:50]}
    np.testing.assert_allclose([first[o] for o in objects["diaObjectId"][:50]], objects["firstDiaSourceMjd"][:50])
