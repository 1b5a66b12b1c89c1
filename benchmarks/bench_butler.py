"""Our butler against lsst-daf-butler: the same operations, in one run, side by side.

Rows (issue 3): repo create; put and get-by-data-ID latency of a small StructuredDataDict
(median of 1000 each); put throughput over 4000 puts; ``query_datasets`` with
``visit > 100 AND detector = 5`` at 4k and at 40k datasets; the visit x detector x patch
spatial-overlap query (~12k rows); ``butler --help`` and library-import cold starts
(subprocess, best of 5); peak RSS.

Each side runs in its own subprocess (so imports, caches and peak RSS do not mix) against
temporary repositories under ``tempfile.mkdtemp()``, removed at the end.  The LSST side is
skipped, with a note, when ``lsst.daf.butler`` cannot be imported (it comes with the ``bench``
extra: ``make bench``).

Both sides see the same data:

- dataset repository: instrument ``SimCam``, 20 detectors, 2000 visits (one physical filter);
  dataset type ``latency`` (1000 real puts, visits 1..50) and ``bench_dict`` (4000 real puts,
  visits 1..200, then 36000 registry-only rows for visits 201..2000, inserted in bulk through each
  side's public registry API: ours ``registry.insert_datasets``, LSST ``registry.insertDatasets``;
  their files do not exist, which a query does not look at);
- overlap repository: 15 dithered visits of a 13x13-detector focal plane (0.22 deg detectors),
  visit and visit-detector regions, and one tract of 22x22 overlapping patches (0.2 deg step,
  0.22 deg wide) around (150, +2); the regions are the same great-circle polygons on both sides
  (ours :class:`butler.regions.SkyRegion`, LSST ``lsst.sphgeom.ConvexPolygon``).

Durability differs by default, so put is also measured (ours only) in a repository created with
``durability="power"``: LSST's registry commits are fsync'ed (SQLite defaults) but its files are not;
ours syncs nothing by default and both files and commits with ``"power"``.  For the where query at
40k datasets, plain sqlite3 running the statement ours sends (nothing decoded or built from its
result) shows SQLite's share.

Usage: ``python benchmarks/bench_butler.py [--quick] [--only create,putget,query,overlap,cold]``.
Prints; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INSTRUMENT = "SimCam"
FILTER, BAND, DAY_OBS = "r_sim", "r", 20250101
N_DETECTORS = 20  # dataset repository
WHERE = "visit > 100 AND detector = 5"
RUN = "bench"
SKYMAP = "sky"


# ---------------------------------------------------------------------------------------- sizes
def sizes(quick: bool) -> dict[str, int]:
    """Operation counts; ``--quick`` shrinks them for a smoke run (numbers not comparable)."""
    if quick:
        return {"latency": 40, "throughput": 200, "big": 2000, "query_repeat": 3, "overlap_repeat": 2,
                "create_repeat": 2, "cold_repeat": 2, "overlap_visits": 3}
    return {"latency": 1000, "throughput": 4000, "big": 40000, "query_repeat": 7, "overlap_repeat": 3,
            "create_repeat": 5, "cold_repeat": 5, "overlap_visits": 15}


# ------------------------------------------------------------------------------------- geometry
Corners = list[tuple[float, float]]


def _box(ra0: float, dec0: float, width: float, height: float) -> Corners:
    return [(ra0, dec0), (ra0 + width, dec0), (ra0 + width, dec0 + height), (ra0, dec0 + height)]


def overlap_geometry(n_visits: int) -> dict[str, Any]:
    """Sky polygons (corner lists in degrees) shared by both sides.

    A 13x13 grid of 0.22 deg detectors (0.01 deg gaps) per visit, visits dithered by up to
    +-0.5 deg with a fixed seed (so no edge coincides with a patch edge), and a tract of 22x22
    patches on a 0.2 deg grid, each 0.22 deg wide (patches overlap their neighbours, as a skymap's
    do).  About 4.8 patches per detector: ~12k visit-detector-patch rows for 15 visits.
    """
    import random

    rng = random.Random(20250101)
    det_size, det_step, grid = 0.22, 0.23, 13
    half = grid * det_step / 2
    visits, vdr = [], []
    for k in range(n_visits):
        visit = 1 + k
        ra_c, dec_c = 150.0 + rng.uniform(-0.5, 0.5), 2.0 + rng.uniform(-0.5, 0.5)
        for det in range(grid * grid):
            i, j = det % grid, det // grid
            vdr.append((visit, det, _box(ra_c - half + i * det_step, dec_c - half + j * det_step, det_size, det_size)))
        visits.append((visit, _box(ra_c - half, dec_c - half, grid * det_step, grid * det_step)))
    n_patch, step, width = 22, 0.2, 0.22
    ra0, dec0 = 150.0 - n_patch * step / 2, 2.0 - n_patch * step / 2
    patches = [
        (j * n_patch + i, i, j, _box(ra0 + i * step - 0.01, dec0 + j * step - 0.01, width, width))
        for j in range(n_patch)
        for i in range(n_patch)
    ]
    tract = _box(ra0 - 0.02, dec0 - 0.02, n_patch * step + 0.04, n_patch * step + 0.04)
    return {"visits": visits, "vdr": vdr, "patches": patches, "tract": tract, "n_detectors": grid * grid}


# ---------------------------------------------------------------------------------- the two sides
class OursSide:
    """diapipe's butler."""

    label = "ours"

    def __init__(self) -> None:
        from butler.butler import Butler
        from butler.refs import DatasetRef
        from butler.regions import SkyRegion

        self.Butler, self.DatasetRef, self.SkyRegion = Butler, DatasetRef, SkyRegion

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"diapipe {version('diapipe')}"
        except PackageNotFoundError:
            return "diapipe (source tree)"

    def create(self, path: str) -> None:
        self.Butler.create(path)

    def create_power(self, path: str) -> None:
        self.Butler.create(path, durability="power")

    durability_note = (
        "default durability 'process': files written aside and renamed into place, registry in WAL mode "
        "with synchronous=NORMAL (a put survives a killed process; nothing is fsync'ed); 'power': files, "
        "their directories and every registry commit fsync'ed (synchronous=FULL)"
    )
    registry_file = "registry.sqlite3"

    def open(self, path: str) -> Any:
        return self.Butler(path, run=RUN, collections=[RUN])

    def close(self, butler: Any) -> None:
        butler.close()

    def regions(self, corner_lists: list[Corners]) -> list[Any]:
        # All at once: SkyRegion.from_radec_many validates same-sized polygons together.
        return self.SkyRegion.from_radec_many(
            [[c[0] for c in corners] for corners in corner_lists], [[c[1] for c in corners] for corners in corner_lists]
        )

    def insert_base(self, b: Any, n_detectors: int, visits: list[tuple[int, Corners | None]]) -> None:
        b.insert_dimension_records("instrument", [{"name": INSTRUMENT, "detector_max": 1000, "visit_max": 100000}])
        b.insert_dimension_records("band", [{"name": BAND}])
        b.insert_dimension_records("physical_filter", [{"instrument": INSTRUMENT, "name": FILTER, "band": BAND}])
        b.insert_dimension_records(
            "detector", [{"instrument": INSTRUMENT, "id": d, "full_name": f"S{d:03d}"} for d in range(n_detectors)]
        )
        with_region = [(v, c) for v, c in visits if c]
        regions = dict(zip([v for v, _ in with_region], self.regions([c for _, c in with_region]), strict=True))
        b.insert_dimension_records(
            "visit",
            [
                {"instrument": INSTRUMENT, "id": v, "name": f"v{v}", "physical_filter": FILTER,
                 **({"region": regions[v]} if v in regions else {})}
                for v, _ in visits
            ],
        )

    def insert_spatial(self, b: Any, geom: dict[str, Any]) -> None:
        vdr_regions = self.regions([c for _, _, c in geom["vdr"]])
        b.insert_dimension_records(
            "visit_detector_region",
            [{"instrument": INSTRUMENT, "visit": v, "detector": d, "region": r}
             for (v, d, _), r in zip(geom["vdr"], vdr_regions, strict=True)],
        )
        b.insert_dimension_records("skymap", [{"name": SKYMAP, "tract_max": 1}])
        b.insert_dimension_records("tract", [{"skymap": SKYMAP, "id": 0, "region": self.regions([geom["tract"]])[0]}])
        patch_regions = self.regions([c for _, _, _, c in geom["patches"]])
        b.insert_dimension_records(
            "patch",
            [
                {"skymap": SKYMAP, "tract": 0, "id": p, "cell_x": i, "cell_y": j, "region": r}
                for (p, i, j, _), r in zip(geom["patches"], patch_regions, strict=True)
            ],
        )

    def register(self, b: Any, name: str) -> None:
        b.register_dataset_type(name, ["visit", "detector"], "StructuredDataDict")

    def put(self, b: Any, obj: Any, name: str, visit: int, detector: int) -> None:
        b.put(obj, name, instrument=INSTRUMENT, visit=visit, detector=detector)

    def get(self, b: Any, name: str, visit: int, detector: int) -> Any:
        return b.get(name, instrument=INSTRUMENT, visit=visit, detector=detector)

    def bulk_insert(self, b: Any, name: str, ids: list[tuple[int, int]]) -> None:
        # Registry rows without files, one transaction; data IDs expanded as a put would.
        registry = b.registry
        dt = registry.get_dataset_type(name)
        refs = [
            self.DatasetRef(dt, registry.expand_data_id(dt.dimensions, {"instrument": INSTRUMENT, "visit": v, "detector": d}), RUN)
            for v, d in ids
        ]
        registry.insert_datasets(refs)

    bulk_note = (
        "registry.insert_datasets([DatasetRef...]) (rows without files, one transaction; "
        "each data ID validated and expanded first with registry.expand_data_id, as a put does)"
    )

    def query(self, b: Any, name: str) -> int:
        return len(b.query_datasets(name, where=WHERE, instrument=INSTRUMENT))

    def overlap(self, b: Any) -> int:
        return len(b.query_data_ids(["visit", "detector", "patch"], instrument=INSTRUMENT, skymap=SKYMAP))

    help_label = "`butler --help` (diapipe's butler.cli:main)"
    help_code = "import sys; sys.argv = ['butler', '--help']; from butler.cli import main; sys.exit(main())"
    import_label = "from butler.butler import Butler"
    import_code = "from butler.butler import Butler"


class LsstSide:
    """lsst-daf-butler with its default dimension universe and an SQLite registry."""

    label = "LSST"

    def __init__(self) -> None:
        import lsst.sphgeom as sphgeom
        from lsst.daf.butler import Butler, DatasetType

        self.Butler, self.DatasetType, self.sphgeom = Butler, DatasetType, sphgeom

    def version(self) -> str:
        from importlib.metadata import version

        return f"lsst-daf-butler {version('lsst-daf-butler')}"

    def create(self, path: str) -> None:
        self.Butler.makeRepo(path)

    create_power = None  # one durability level only
    durability_note = (
        "files written in place without fsync; SQLite registry with SQLite's defaults (LSST sets neither): "
        "rollback journal, synchronous=FULL, so every registry commit is fsync'ed"
    )
    registry_file = "gen3.sqlite3"

    def open(self, path: str) -> Any:
        return self.Butler.from_config(path, writeable=True, run=RUN, collections=[RUN])

    def close(self, butler: Any) -> None:
        butler.close()

    def region(self, corners: Corners) -> Any:
        sg = self.sphgeom
        return sg.ConvexPolygon.convexHull([sg.UnitVector3d(sg.LonLat.fromDegrees(ra, dec)) for ra, dec in corners])

    def insert_base(self, b: Any, n_detectors: int, visits: list[tuple[int, Corners | None]]) -> None:
        r = b.registry
        r.insertDimensionData(
            "instrument",
            {"name": INSTRUMENT, "visit_max": 100000, "detector_max": 1000, "exposure_max": 100000,
             "class_name": "bench.SimCam"},
        )
        r.insertDimensionData("physical_filter", {"instrument": INSTRUMENT, "name": FILTER, "band": BAND})
        r.insertDimensionData(
            "detector", *[{"instrument": INSTRUMENT, "id": d, "full_name": f"S{d:03d}"} for d in range(n_detectors)]
        )
        r.insertDimensionData("day_obs", {"instrument": INSTRUMENT, "id": DAY_OBS})
        r.insertDimensionData(
            "visit",
            *[
                {"instrument": INSTRUMENT, "id": v, "name": f"v{v}", "physical_filter": FILTER, "day_obs": DAY_OBS,
                 **({"region": self.region(c)} if c else {})}
                for v, c in visits
            ],
        )

    def insert_spatial(self, b: Any, geom: dict[str, Any]) -> None:
        import hashlib

        r = b.registry
        r.insertDimensionData(
            "visit_detector_region",
            *[{"instrument": INSTRUMENT, "visit": v, "detector": d, "region": self.region(c)} for v, d, c in geom["vdr"]],
        )
        r.insertDimensionData(
            "skymap",
            {"name": SKYMAP, "hash": hashlib.sha1(SKYMAP.encode()).digest(), "tract_max": 1,
             "patch_nx_max": 22, "patch_ny_max": 22},
        )
        r.insertDimensionData("tract", {"skymap": SKYMAP, "id": 0, "region": self.region(geom["tract"])})
        r.insertDimensionData(
            "patch",
            *[
                {"skymap": SKYMAP, "tract": 0, "id": p, "cell_x": i, "cell_y": j, "region": self.region(c)}
                for p, i, j, c in geom["patches"]
            ],
        )

    def register(self, b: Any, name: str) -> None:
        dt = self.DatasetType(name, ["instrument", "visit", "detector"], "StructuredDataDict", universe=b.dimensions)
        b.registry.registerDatasetType(dt)

    def put(self, b: Any, obj: Any, name: str, visit: int, detector: int) -> None:
        b.put(obj, name, instrument=INSTRUMENT, visit=visit, detector=detector)

    def get(self, b: Any, name: str, visit: int, detector: int) -> Any:
        return b.get(name, instrument=INSTRUMENT, visit=visit, detector=detector)

    def bulk_insert(self, b: Any, name: str, ids: list[tuple[int, int]]) -> None:
        b.registry.insertDatasets(
            name, [{"instrument": INSTRUMENT, "visit": v, "detector": d} for v, d in ids], run=RUN
        )

    bulk_note = "registry.insertDatasets(name, data_ids, run) (rows without files; it expands the data IDs itself)"

    def query(self, b: Any, name: str) -> int:
        return len(b.query_datasets(name, collections=RUN, where=WHERE, instrument=INSTRUMENT, limit=None, explain=False))

    def overlap(self, b: Any) -> int:
        return len(
            b.query_data_ids(["visit", "detector", "patch"], instrument=INSTRUMENT, skymap=SKYMAP, limit=None, explain=False)
        )

    help_label = "`butler --help` (lsst.daf.butler.cli.butler:main, the `butler` console script)"
    help_code = (
        "import sys; sys.argv = ['butler', '--help']; from lsst.daf.butler.cli.butler import main; sys.exit(main())"
    )
    import_label = "from lsst.daf.butler import Butler"
    import_code = "from lsst.daf.butler import Butler"


# ------------------------------------------------------------------------------------ measuring
def _progress(side: str, text: str) -> None:
    print(f"  [{side}] {text}", file=sys.stderr, flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def _cold_start(code: str, repeat: int) -> float:
    """Best wall time of ``python -c code`` (from a neutral folder), seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    best = float("inf")
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(repeat):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"`{code}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
            best = min(best, elapsed)
    return best


SECTIONS = ("create", "putget", "query", "overlap", "cold")


def _sqlite_settings(db: str) -> str:
    """``journal_mode`` of a registry file, as a new connection sees it."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return f"journal_mode={con.execute('PRAGMA journal_mode').fetchone()[0]}"
    finally:
        con.close()


def _raw_query_floor(db: str, repeat: int) -> tuple[float, int]:
    """Median time for plain sqlite3 to run our where query's statement: SQLite's share, the floor.

    The statement our registry sends on SQLite (``Registry._refs_from_columns``), written out:
    one JSON array holding how many datasets' band and physical_filter differ from one
    dataset's (and those values), then every dataset's visit, id and path; fetched as that one
    value, nothing decoded or built from it.  Returns the median and the number of datasets.
    """
    import sqlite3

    con = sqlite3.connect(db)
    try:
        type_id = con.execute("SELECT id FROM dataset_type WHERE name = 'bench_dict'").fetchone()[0]
        run_id = con.execute("SELECT id FROM collection WHERE name = ?", (RUN,)).fetchone()[0]
        where = "dataset_type_id = ? AND instrument = ? AND visit > ? AND detector = ? AND run_id = ?"
        params = (type_id, INSTRUMENT, 100, 5, run_id)
        band, physical_filter = (
            f"(SELECT {c} FROM dataset WHERE {where} LIMIT 1)"
            for c in ("band", "physical_filter")
        )
        sql = (
            f"SELECT json_array(json_array(count(CASE WHEN band IS NOT {band} OR physical_filter IS NOT "
            f"{physical_filter} THEN 1 END), {band}, {physical_filter}), json_group_array(visit), "
            f"json_group_array(id), json_group_array(path)) FROM dataset WHERE {where}"
        )
        times, value = [], "[[], [], [], []]"
        for _ in range(repeat):
            t0 = time.perf_counter()
            (value,) = con.execute(sql, params * 5).fetchone()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), len(json.loads(value)[2])
    finally:
        con.close()


def run_side(side: Any, n: dict[str, int], tmp: str, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every measurement for one side (or the given sections of them); times in seconds."""
    out: dict[str, Any] = {"version": side.version(), "durability_note": side.durability_note}
    tag = side.label
    if "create" in sections:
        _measure_create(side, n, tmp, out)
    if "putget" in sections or "query" in sections:
        _measure_datasets(side, n, tmp, out, sections)
    if "putget" in sections and side.create_power is not None:
        _measure_power_puts(side, n, tmp, out)
    if "overlap" in sections:
        _measure_overlap(side, n, tmp, out)
    if "cold" in sections:
        out["help"] = _cold_start(side.help_code, n["cold_repeat"])
        out["import"] = _cold_start(side.import_code, n["cold_repeat"])
        out["help_label"], out["import_label"] = side.help_label, side.import_label
        _progress(tag, f"--help {out['help'] * 1e3:.0f} ms, import {out['import'] * 1e3:.0f} ms")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _measure_create(side: Any, n: dict[str, int], tmp: str, out: dict[str, Any]) -> None:
    """Repo create, median over fresh folders."""
    creates = []
    for k in range(n["create_repeat"]):
        elapsed, _ = _timed(lambda k=k: side.create(os.path.join(tmp, f"create{k}")))
        creates.append(elapsed)
    out["create"] = statistics.median(creates)
    _progress(side.label, f"repo create {out['create'] * 1e3:.1f} ms")


def _measure_datasets(side: Any, n: dict[str, int], tmp: str, out: dict[str, Any], sections: tuple[str, ...]) -> None:
    """Put/get latency, put throughput and the where query at two sizes, in one repository."""
    tag = side.label
    repo = os.path.join(tmp, "datasets")
    side.create(repo)
    b = side.open(repo)
    n_visits = n["big"] // N_DETECTORS
    setup_s, _ = _timed(lambda: side.insert_base(b, N_DETECTORS, [(v, None) for v in range(1, n_visits + 1)]))
    out["setup_records"] = setup_s
    side.register(b, "latency")
    side.register(b, "bench_dict")

    out["registry_settings"] = _sqlite_settings(os.path.join(repo, side.registry_file))
    if "putget" in sections:
        _put_get_latency(side, b, n, out)
    # Put throughput: also the setup of the query rows.
    thr_ids = [(1 + i // N_DETECTORS, i % N_DETECTORS) for i in range(n["throughput"])]

    def put_all() -> None:
        for k, (v, d) in enumerate(thr_ids):
            side.put(b, {"a": k}, "bench_dict", v, d)

    elapsed, _ = _timed(put_all)
    out["put_rate"] = len(thr_ids) / elapsed
    _progress(tag, f"{out['put_rate']:.0f} puts/s over {len(thr_ids)} puts")
    if "query" in sections:
        _where_queries(side, b, n, out, thr_ids, os.path.join(repo, side.registry_file))
    side.close(b)


def _put_get_latency(side: Any, b: Any, n: dict[str, int], out: dict[str, Any]) -> None:
    tag = side.label
    lat_ids = [(1 + i // N_DETECTORS, i % N_DETECTORS) for i in range(n["latency"])]
    puts, gets = [], []
    for k, (v, d) in enumerate(lat_ids):
        t0 = time.perf_counter()
        side.put(b, {"a": 1, "k": k}, "latency", v, d)
        puts.append(time.perf_counter() - t0)
    for k, (v, d) in enumerate(lat_ids):
        t0 = time.perf_counter()
        value = side.get(b, "latency", v, d)
        gets.append(time.perf_counter() - t0)
        if value != {"a": 1, "k": k}:
            raise RuntimeError(f"{tag}: get returned {value!r}, expected {{'a': 1, 'k': {k}}}")
    out["put"], out["get"] = statistics.median(puts), statistics.median(gets)
    _progress(tag, f"put {out['put'] * 1e3:.2f} ms, get {out['get'] * 1e3:.2f} ms (medians of {len(puts)})")


def _measure_power_puts(side: Any, n: dict[str, int], tmp: str, out: dict[str, Any]) -> None:
    """Put latency and throughput in a repository whose puts are durable across power loss."""
    repo = os.path.join(tmp, "power")
    side.create_power(repo)
    b = side.open(repo)
    side.insert_base(b, N_DETECTORS, [(v, None) for v in range(1, n["latency"] // N_DETECTORS + 2)])
    side.register(b, "latency")
    times = []
    t_all = time.perf_counter()
    for k in range(n["latency"]):
        t0 = time.perf_counter()
        side.put(b, {"a": 1, "k": k}, "latency", 1 + k // N_DETECTORS, k % N_DETECTORS)
        times.append(time.perf_counter() - t0)
    out["put_power_rate"] = len(times) / (time.perf_counter() - t_all)
    out["put_power"] = statistics.median(times)
    side.close(b)
    _progress(side.label, f"durable put {out['put_power'] * 1e3:.2f} ms, {out['put_power_rate']:.0f} puts/s")


def _where_queries(
    side: Any, b: Any, n: dict[str, int], out: dict[str, Any], thr_ids: list[tuple[int, int]], db: str
) -> None:
    tag = side.label

    def query_median() -> tuple[float, int]:
        times, count = [], -1
        for _ in range(n["query_repeat"]):
            elapsed, count = _timed(lambda: side.query(b, "bench_dict"))
            times.append(elapsed)
        return statistics.median(times), count

    out["query_small"], out["query_small_rows"] = query_median()
    out["query_small_n"] = len(thr_ids)
    big_ids = [(1 + i // N_DETECTORS, i % N_DETECTORS) for i in range(len(thr_ids), n["big"])]
    out["bulk_fill"], _ = _timed(lambda: side.bulk_insert(b, "bench_dict", big_ids))
    out["bulk_n"] = len(big_ids)
    out["bulk_note"] = side.bulk_note
    out["query_big"], out["query_big_rows"] = query_median()
    out["query_big_n"] = len(thr_ids) + len(big_ids)
    if side.label == "ours":
        out["query_floor"], out["query_floor_rows"] = _raw_query_floor(db, n["query_repeat"])
    _progress(
        tag,
        f"where query {out['query_small'] * 1e3:.1f} ms at {out['query_small_n']}, "
        f"{out['query_big'] * 1e3:.1f} ms at {out['query_big_n']} (bulk fill {out['bulk_fill']:.1f} s)",
    )


def _measure_overlap(side: Any, n: dict[str, int], tmp: str, out: dict[str, Any]) -> None:
    """Fill the overlap repository, then time the visit x detector x patch query."""
    tag = side.label
    geom = overlap_geometry(n["overlap_visits"])
    repo = os.path.join(tmp, "overlap")
    side.create(repo)
    b = side.open(repo)

    def fill_spatial() -> None:
        side.insert_base(b, geom["n_detectors"], geom["visits"])
        side.insert_spatial(b, geom)

    out["overlap_fill"], _ = _timed(fill_spatial)
    times, rows = [], -1
    for _ in range(n["overlap_repeat"]):
        elapsed, rows = _timed(lambda: side.overlap(b))
        times.append(elapsed)
    out["overlap"], out["overlap_rows"] = statistics.median(times), rows
    out["overlap_inputs"] = (len(geom["vdr"]), len(geom["patches"]))
    side.close(b)
    _progress(tag, f"overlap query {out['overlap'] * 1e3:.0f} ms, {rows} rows")


def side_main(which: str, quick: bool, out_path: str, sections: tuple[str, ...] = SECTIONS) -> int:
    """Child process: measure one side and write its results as JSON."""
    result: dict[str, Any]
    try:
        side = OursSide() if which == "ours" else LsstSide()
    except ImportError as exc:
        result = {"skipped": f"{exc.name or exc} is not importable ({exc})"}
    else:
        tmp = tempfile.mkdtemp(prefix=f"bench_butler_{which}_")
        try:
            result = run_side(side, sizes(quick), tmp, sections)
        except Exception:  # report, do not hide: the parent prints it
            result = {"error": traceback.format_exc()}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------- reporting
def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def print_table(ours: dict[str, Any], lsst: dict[str, Any] | None, n: dict[str, int]) -> None:
    """The comparison table; ratio = LSST time / our time (> 1: ours is faster)."""
    have = lsst is not None

    def get(side: dict[str, Any] | None, key: str) -> Any:
        return None if side is None else side.get(key)

    rows: list[tuple[str, str, str, str]] = []

    def time_row(label: str, key: str) -> None:
        a, b = get(ours, key), get(lsst, key)
        ratio = f"{b / a:.1f}x" if a and b else "-"
        rows.append((label, _fmt_time(a), _fmt_time(b) if have else "skipped", ratio))

    def rate_row(label: str, our_key: str, lsst_key: str) -> None:
        a, b = get(ours, our_key), get(lsst, lsst_key)
        rows.append((
            label,
            f"{a:.0f}/s" if a else "-",
            (f"{b:.0f}/s" if b else "-") if have else "skipped",
            f"{a / b:.1f}x" if a and b else "-",
        ))

    time_row("repo create (median of %d)" % n["create_repeat"], "create")
    time_row(f"put small dict, latency (median of {n['latency']})", "put")
    a, b = get(ours, "put_power"), get(lsst, "put")
    rows.append((
        "  same, ours durability='power' (vs LSST's only level)",
        _fmt_time(a),
        _fmt_time(b) if have else "skipped",
        f"{b / a:.1f}x" if a and b else "-",
    ))
    time_row(f"get by data ID, latency (median of {n['latency']})", "get")
    rate_row(f"put throughput, {n['throughput']} puts (datasets/s)", "put_rate", "put_rate")
    rate_row(f"  same, ours durability='power' ({n['latency']} puts)", "put_power_rate", "put_rate")
    time_row(f"query_datasets '{WHERE}' @ {get(ours, 'query_small_n')} (median of {n['query_repeat']})", "query_small")
    time_row(f"query_datasets '{WHERE}' @ {get(ours, 'query_big_n')} (median of {n['query_repeat']})", "query_big")
    a, b = get(ours, "query_floor"), get(lsst, "query_big")
    rows.append((
        f"  floor: plain sqlite3 running ours' SQL ({get(ours, 'query_floor_rows')} datasets), nothing built",
        _fmt_time(a),
        _fmt_time(b) if have else "skipped",
        f"{b / a:.1f}x" if a and b else "-",
    ))
    time_row(f"visit x detector x patch overlap query (median of {n['overlap_repeat']})", "overlap")
    time_row(f"`butler --help` cold start (best of {n['cold_repeat']})", "help")
    time_row(f"import the Butler class, cold (best of {n['cold_repeat']})", "import")
    a, b = get(ours, "peak_rss_mb"), get(lsst, "peak_rss_mb")
    rows.append((
        "peak RSS of the benchmark process",
        f"{a:.0f} MB",
        (f"{b:.0f} MB" if b else "-") if have else "skipped",
        f"{b / a:.1f}x" if a and b else "-",
    ))
    time_row(f"(fill) {get(ours, 'bulk_n')} registry-only dataset rows, bulk", "bulk_fill")
    time_row("(fill) overlap repo dimension records + regions", "overlap_fill")

    header = ("operation", "ours", "LSST", "LSST/ours")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join([header[0].ljust(widths[0]), *(h.rjust(w) for h, w in zip(header[1:], widths[1:], strict=True))]))
    print(line)
    for r in rows:
        print("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]))
    print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run (numbers not comparable)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all); 'query' also "
        "runs the put-throughput puts it queries, 'putget' adds the durable-put rows",
    )
    parser.add_argument("--side", choices=["ours", "lsst"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sections = tuple(part.strip() for part in args.only.split(",") if part.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.side:
        return side_main(args.side, args.quick, args.out, sections)

    n = sizes(args.quick)
    print("bench_butler: our butler vs lsst-daf-butler, same operations, one run" + (" (--quick)" if args.quick else ""))
    print(f"python {sys.version.split()[0]} ({sys.executable}); each side runs in its own subprocess")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_butler_") as tmp:
        for which in ("ours", "lsst"):
            out = os.path.join(tmp, f"{which}.json")
            print(f"running {which} ...", flush=True)
            t0 = time.perf_counter()
            command = [sys.executable, __file__, "--side", which, "--out", out, "--only", ",".join(sections)]
            proc = subprocess.run(command + (["--quick"] if args.quick else []))
            if proc.returncode != 0 or not os.path.exists(out):
                results[which] = {"error": f"side process exited {proc.returncode}"}
            else:
                results[which] = json.loads(Path(out).read_text(encoding="utf-8"))
            print(f"  ({which} took {time.perf_counter() - t0:.0f} s)", flush=True)

    ours, lsst = results["ours"], results["lsst"]
    if "error" in ours:
        print("our side failed:\n" + ours["error"])
        return 1
    notes = []
    if "skipped" in lsst:
        notes.append(f"LSST rows skipped: {lsst['skipped']}; install the bench extra (make bench) to compare.")
        lsst_res = None
    elif "error" in lsst:
        notes.append("LSST side failed, its rows are empty:\n" + lsst["error"])
        lsst_res = None
    else:
        lsst_res = lsst
    print()
    print(f"versions: {ours['version']}" + (f"; {lsst_res['version']} (SQLite registry, default universe)" if lsst_res else ""))
    print_table(ours, lsst_res, n)
    print("ratio = LSST time / our time (for puts/s: our rate / LSST rate): > 1 means ours is faster.")
    print()
    print("how the datasets were made:")
    sides = [("ours", ours)] + ([("LSST", lsst_res)] if lsst_res else [])
    for label, side in sides:
        if "bulk_n" in side:
            print(
                f"  {label}: {n['latency']} + {n['throughput']} real puts (files + registry rows); then "
                f"{side['bulk_n']} rows for visits beyond {n['throughput'] // N_DETECTORS} via {side['bulk_note']} "
                f"in {_fmt_time(side['bulk_fill'])}"
            )
    for label, side in sides:
        if "registry_settings" in side:
            print(f"  durability, {label}: {side['durability_note']} (registry file: {side['registry_settings']})")
    if "query_big_rows" in ours:
        print(
            f"  where-query result rows: ours {ours['query_small_rows']} / {ours['query_big_rows']}"
            + (f", LSST {lsst_res['query_small_rows']} / {lsst_res['query_big_rows']}" if lsst_res else "")
            + f" (at {ours['query_small_n']} / {ours['query_big_n']} datasets of the queried type; "
            f"the repo also holds {n['latency']} 'latency' datasets when putget runs)"
        )
    if "overlap_inputs" in ours:
        vdr, patches = ours["overlap_inputs"]
        print(
            f"  overlap query: {vdr} visit-detector regions x {patches} patch regions; rows: ours {ours['overlap_rows']}"
            + (f", LSST {lsst_res['overlap_rows']}" if lsst_res else "")
        )
    if "help_label" in ours:
        print(f"  cold starts: ours {ours['help_label']}, `{ours['import_label']}`" + (
            f"; LSST {lsst_res['help_label']}, `{lsst_res['import_label']}` (python -c, same interpreter)"
            if lsst_res else ""))
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
