"""``make demo``: create a demo repository, store a simulated exposure, read it back, summarize.

Until the survey simulator and the DIA pipeline land, the demo exercises the data model and the
butler: it simulates one exposure (sky, noise, Gaussian stars, a bad column, a saturated star),
puts it into a new repository, reads the whole exposure and a sub-box back, and checks that every
pixel and the metadata survived.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

from butler import Box, Exposure, GaussianPsf, PhotoCalib, VisitInfo
from butler.butler import Butler
from butler.regions import SkyRegion

_log = logging.getLogger("tasks.demo")

INSTRUMENT = "SimCam"


def simulate_exposure(size: int = 1024, seed: int = 7, n_stars: int = 300) -> Exposure:
    """A simple simulated calibrated exposure (counts) with a TAN WCS and a Gaussian PSF."""
    rng = np.random.default_rng(seed)
    psf = GaussianPsf.from_fwhm(4.0)
    sky, gain_noise = 200.0, 5.0
    image = np.full((size, size), sky, dtype=np.float64)
    xs = rng.uniform(10, size - 10, n_stars)
    ys = rng.uniform(10, size - 10, n_stars)
    fluxes = 500.0 * rng.pareto(1.5, n_stars) + 500.0
    for x, y, flux in zip(xs, ys, fluxes, strict=True):
        stamp, x0, y0 = psf.shifted_image(x, y)
        box = Box(x0, y0, stamp.shape[1], stamp.shape[0]).intersection(Box(0, 0, size, size))
        rows, cols = box.slices()
        srows, scols = box.shift(-x0, -y0).slices()
        image[rows, cols] += flux * stamp[srows, scols]
    variance = image + gain_noise**2
    image = rng.normal(image, np.sqrt(variance)) - sky
    exposure = Exposure(
        image,
        variance=variance,
        wcs=_tan_wcs(size),
        psf=psf,
        photo_calib=PhotoCalib.from_zero_point(27.0),
        visit_info=VisitInfo(exposure_time=30.0, mjd=60310.2, airmass=1.1, seeing=0.8, visit_id=1),
        band="r",
        metadata={"SIMULATED": True, "SEED": seed},
    )
    bad_column = np.zeros(exposure.shape, dtype=bool)
    bad_column[:, size // 3] = True
    exposure.set_mask("BAD", bad_column)
    exposure.set_mask("SAT", exposure.image > 0.9 * exposure.image.max())
    return exposure


def _tan_wcs(size: int) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.2]
    wcs.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    wcs.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600.0
    return wcs


def _setup_repository(repo: Path, exposure: Exposure) -> Butler:
    Butler.create(repo)
    butler = Butler(repo, run="demo/raw")
    butler.insert_dimension_records("instrument", [{"name": INSTRUMENT, "detector_max": 1, "visit_max": 1000}])
    butler.insert_dimension_records("band", [{"name": "r"}])
    butler.insert_dimension_records("physical_filter", [{"instrument": INSTRUMENT, "name": "r_sim", "band": "r"}])
    butler.insert_dimension_records("detector", [{"instrument": INSTRUMENT, "id": 0, "full_name": "S00"}])
    region = SkyRegion.from_wcs_box(exposure.wcs, exposure.bbox)
    butler.insert_dimension_records(
        "visit",
        [{"instrument": INSTRUMENT, "id": 1, "physical_filter": "r_sim", "seeing": 0.8, "exposure_time": 30.0,
          "mjd": 60310.2, "region": region}],
    )
    butler.insert_dimension_records(
        "visit_detector_region", [{"instrument": INSTRUMENT, "visit": 1, "detector": 0, "region": region}]
    )
    butler.register_dataset_type("calexp", ["instrument", "visit", "detector"], "Exposure")
    return butler


def run_demo(repo: Path, *, overwrite: bool = True) -> dict[str, float | int | str]:
    """Run the demo in ``repo`` and return its summary numbers."""
    if repo.exists():
        if not overwrite:
            raise FileExistsError(f"{repo} exists")
        shutil.rmtree(repo)
    exposure = simulate_exposure()
    butler = _setup_repository(repo, exposure)
    data_id = {"instrument": INSTRUMENT, "visit": 1, "detector": 0}
    t0 = time.perf_counter()
    ref = butler.put(exposure, "calexp", data_id)
    t_put = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = butler.get("calexp", data_id)
    t_get = time.perf_counter() - t0
    sub_box = Box(100, 200, 256, 128)
    sub = butler.get("calexp", data_id, parameters={"bbox": sub_box})
    identical = (
        np.array_equal(back.image, exposure.image)
        and np.array_equal(back.mask, exposure.mask)
        and np.array_equal(back.variance, exposure.variance)
        and np.array_equal(sub.image, exposure.subexposure(sub_box).image)
        and back.psf.fwhm(0, 0) == exposure.psf.fwhm(0, 0)
        and back.band == exposure.band
    )
    ra, dec = back.pixel_to_sky(*exposure.bbox.center)
    bad = int(np.count_nonzero(back.mask & back.get_plane_bitmask("BAD")))
    size_mb = sum(p.stat().st_size for p in (repo / ref.path).rglob("*") if p.is_file()) / 1e6
    butler.close()
    return {
        "repository": str(repo),
        "dataset": f"calexp {data_id} in run {ref.run!r}",
        "shape": f"{back.width}x{back.height}",
        "centre_radec_deg": f"({float(ra):.5f}, {float(dec):.5f})",
        "psf_fwhm_px": round(back.psf.fwhm(0, 0), 3),
        "bad_pixels": bad,
        "stored_mb": round(size_mb, 2),
        "put_ms": round(1e3 * t_put, 1),
        "get_ms": round(1e3 * t_get, 1),
        "round_trip_identical": str(identical),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m tasks.demo``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default="demo_repo", help="repository folder to (re)create")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    summary = run_demo(Path(args.repo))
    width = max(len(k) for k in summary)
    sys.stdout.write("diapipe demo\n")
    for key, value in summary.items():
        sys.stdout.write(f"  {key:<{width}}  {value}\n")
    return 0 if summary["round_trip_identical"] == "True" else 1


if __name__ == "__main__":
    sys.exit(main())
