"""A small repository shared by the registry and butler tests."""

from __future__ import annotations

import numpy as np
import pytest

from butler.butler import Butler
from butler.regions import SkyRegion

INSTRUMENT = "SimCam"
N_VISITS, N_DETECTORS, N_PATCH = 6, 4, 4


def detector_region(visit: int, detector: int) -> SkyRegion:
    """Detectors in a row along RA; each visit shifts by 0.07 deg in RA and 0.03 deg in Dec."""
    ra0 = 150.0 + 0.07 * visit + 0.12 * detector
    dec0 = 2.0 + 0.03 * visit
    return SkyRegion.from_radec([ra0, ra0 + 0.11, ra0 + 0.11, ra0], [dec0, dec0, dec0 + 0.2, dec0 + 0.2])


def patch_region(i: int, j: int) -> SkyRegion:
    ra0, dec0, step = 149.9, 1.9, 0.2
    return SkyRegion.from_radec(
        [ra0 + i * step, ra0 + (i + 1) * step, ra0 + (i + 1) * step, ra0 + i * step],
        [dec0 + j * step, dec0 + j * step, dec0 + (j + 1) * step, dec0 + (j + 1) * step],
    )


def fill_dimensions(butler: Butler) -> None:
    butler.insert_dimension_records("instrument", [{"name": INSTRUMENT, "detector_max": 8}])
    butler.insert_dimension_records("band", [{"name": "g"}, {"name": "r"}])
    butler.insert_dimension_records(
        "physical_filter",
        [{"instrument": INSTRUMENT, "name": "g_sim", "band": "g"}, {"instrument": INSTRUMENT, "name": "r_sim", "band": "r"}],
    )
    butler.insert_dimension_records(
        "detector", [{"instrument": INSTRUMENT, "id": d, "full_name": f"S{d:02d}"} for d in range(N_DETECTORS)]
    )
    visits, vdr = [], []
    for v in range(N_VISITS):
        regions = [detector_region(v, d) for d in range(N_DETECTORS)]
        ra = np.concatenate([r.vertices_radec()[0] for r in regions])
        dec = np.concatenate([r.vertices_radec()[1] for r in regions])
        visits.append(
            {
                "instrument": INSTRUMENT,
                "id": 100 + v,
                "physical_filter": "r_sim" if v % 2 else "g_sim",
                "seeing": 0.6 + 0.1 * v,
                "exposure_time": 30.0,
                "mjd": 60000.0 + v,
                "region": SkyRegion.from_radec(
                    [ra.min(), ra.max(), ra.max(), ra.min()], [dec.min(), dec.min(), dec.max(), dec.max()]
                ),
            }
        )
        vdr += [
            {"instrument": INSTRUMENT, "visit": 100 + v, "detector": d, "region": regions[d]}
            for d in range(N_DETECTORS)
        ]
    butler.insert_dimension_records("visit", visits)
    butler.insert_dimension_records("visit_detector_region", vdr)
    butler.insert_dimension_records("skymap", [{"name": "sky"}])
    butler.insert_dimension_records(
        "tract", [{"skymap": "sky", "id": 0, "region": SkyRegion.from_radec([149.9, 150.7, 150.7, 149.9], [1.9, 1.9, 2.7, 2.7])}]
    )
    butler.insert_dimension_records(
        "patch",
        [
            {"skymap": "sky", "tract": 0, "id": j * N_PATCH + i, "cell_x": i, "cell_y": j, "region": patch_region(i, j)}
            for j in range(N_PATCH)
            for i in range(N_PATCH)
        ],
    )


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    Butler.create(path)
    with Butler(path, run="setup") as butler:
        fill_dimensions(butler)
    return path


@pytest.fixture
def butler(repo):
    with Butler(repo, run="run1", collections=["run1"]) as b:
        yield b
