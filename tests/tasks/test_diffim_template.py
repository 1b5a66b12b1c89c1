"""GetCoaddAsTemplateTask on synthetic coadd patches: assembly, preference, coverage, tract choice, warp."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from astropy.wcs import WCS

from butler.exposure import Exposure, PhotoCalib
from butler.geometry import Box
from butler.psf import GaussianPsf
from butler.skymap import SkyMap
from pipeline.errors import NoWorkFound
from tasks.diffim.errors import BandMismatchError
from tasks.diffim.get_template import GetCoaddAsTemplateConfig, GetCoaddAsTemplateTask, select_tract

RA0, DEC0 = 150.0, 2.0
BLOBS = [(150.0 + dx / 3600, 2.0 + dy / 3600, amp) for dx, dy, amp in
         [(-20, -15, 500.0), (5, 12, 800.0), (18, -4, 300.0), (-8, 25, 650.0), (30, 30, 400.0), (-33, 2, 700.0)]]
BLOB_SIGMA_ARCSEC = 1.2


def sky(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """A smooth test sky (counts per 0.2 arcsec pixel): Gaussian blobs on a gentle gradient."""
    out = 10.0 + 20.0 * (ra - RA0) * 3600 / 60 + 10.0 * (dec - DEC0) * 3600 / 60
    for bra, bdec, amp in BLOBS:
        dx = (ra - bra) * math.cos(math.radians(DEC0)) * 3600
        dy = (dec - bdec) * 3600
        out = out + amp * np.exp(-0.5 * (dx * dx + dy * dy) / BLOB_SIGMA_ARCSEC**2)
    return out


@pytest.fixture(scope="module")
def skymap() -> SkyMap:
    return SkyMap.discrete(
        "test", [(RA0, DEC0, 0.02)], patch_inner_dimensions=(150, 150), patch_border=20, tract_overlap=0.0, pixel_scale=0.2
    )


def make_coadd(tract: Any, patch: Any, offset: float | None = None, band: str = "r", calib: float = 1.0) -> Exposure:
    box = patch.outer_bbox
    ys, xs = np.mgrid[box.y0 : box.y1, box.x0 : box.x1]
    ra, dec = tract.pixel_to_sky(xs.ravel(), ys.ravel())
    image = sky(ra, dec).reshape(box.shape) if offset is None else np.full(box.shape, offset)
    return Exposure(
        image / calib, None, np.full(box.shape, 4.0), xy0=(box.x0, box.y0), wcs=tract.wcs, psf=GaussianPsf(1.5),
        photo_calib=PhotoCalib(calib), band=band,
    )


def science_frame(rotation_deg: float = 12.0, size: int = 260, offset_arcsec: tuple[float, float] = (4.0, -3.0)) -> tuple[WCS, Box]:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0 + offset_arcsec[0] / 3600, DEC0 + offset_arcsec[1] / 3600]
    w.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    scale = 0.2 / 3600
    w.wcs.cd = [[-scale * c, scale * s], [scale * s, scale * c]]
    return w, Box(0, 0, size, size)


class Handle:
    """A deferred-handle stand-in: ``dataId`` and ``get(parameters={"bbox": ...})``, counting reads."""

    def __init__(self, exposure: Exposure, tract: int, patch: int) -> None:
        self.exposure = exposure
        self.dataId = {"skymap": "test", "tract": tract, "patch": patch, "band": exposure.band}
        self.boxes: list[Box] = []

    def get(self, *, parameters: dict | None = None) -> Exposure:
        box = (parameters or {}).get("bbox")
        if box is None:
            return self.exposure
        self.boxes.append(box)
        return self.exposure.subexposure(box)


def test_template_matches_the_sky_in_the_science_frame(skymap: SkyMap) -> None:
    tract = skymap[0]
    wcs, bbox = science_frame()
    handles = [Handle(make_coadd(tract, p), 0, p.sequential_index) for p in tract]
    calexp = Exposure(np.zeros(bbox.shape), wcs=wcs, band="r")
    task = GetCoaddAsTemplateTask()
    result = task.getTemplate(calexp, skymap, handles)
    template = result.exposure
    assert template.bbox == bbox and template.wcs is wcs
    assert len(result.patches) >= 2  # the science image straddles patches
    used = [h for h in handles if h.boxes]
    assert any(h.boxes[0] != h.exposure.bbox for h in used)  # only the overlapping part is read
    ys, xs = np.mgrid[0 : bbox.height, 0 : bbox.width]
    ra, dec = wcs.all_pix2world(xs.ravel(), ys.ravel(), 0)
    truth = sky(ra, dec).reshape(bbox.shape)
    good = np.isfinite(template.image)
    assert good.mean() > 0.99
    err = np.abs(template.image - truth)[good]
    assert err.max() < 0.01 * truth.max()
    assert task.metadata["tract"] == 0 and task.metadata["coveredFraction"] > 0.99
    assert template.psf is not None and template.psf.fwhm(130, 130) == pytest.approx(1.5 * 2.3548, rel=0.05)
    assert template.band == "r"


def test_inner_regions_win_and_gaps_are_no_data(skymap: SkyMap) -> None:
    tract = skymap[0]
    patches = list(tract)
    region = tract.bbox.grow(-60)
    # every patch holds a constant equal to its index: the assembled value names the owner
    coadds = {p.sequential_index: make_coadd(tract, p, offset=float(p.sequential_index)) for p in patches}
    task = GetCoaddAsTemplateTask()
    from tasks.diffim.get_template import assemble_tract_template

    full, _ = assemble_tract_template(region, patches, coadds)
    for p in patches:
        inner = p.inner_bbox.intersection(region)
        if inner.is_empty:
            continue
        assert np.all(full.image[inner.slices(region)] == p.sequential_index)
    # drop the middle patch: its inner box is filled from the neighbours' borders, NO_DATA beyond
    middle = tract.get_patch_info((1, 1))
    partial = {k: v for k, v in coadds.items() if k != middle.sequential_index}
    holed, info = assemble_tract_template(region, patches, partial)
    sub = holed.image[middle.inner_bbox.slices(region)]
    nod = (holed.mask[middle.inner_bbox.slices(region)] & holed.get_plane_bitmask("NO_DATA")) != 0
    border = tract.patch_border
    assert np.isfinite(sub[:, : border]).all() and np.isfinite(sub[:border, :]).all()  # neighbours' outer borders
    assert np.isnan(sub[border:-border, border:-border]).all() and nod[border:-border, border:-border].all()
    assert info["covered_fraction"] < 1.0
    del task


def test_calibrations_are_unified(skymap: SkyMap) -> None:
    tract = skymap[0]
    wcs, bbox = science_frame()
    handles = [Handle(make_coadd(tract, p, calib=1.0 if p.sequential_index % 2 else 2.0), 0, p.sequential_index) for p in tract]
    calexp = Exposure(np.zeros(bbox.shape), wcs=wcs, band="r")
    result = GetCoaddAsTemplateTask().getTemplate(calexp, skymap, handles)
    coadd = result.coaddExposure
    factor = coadd.photo_calib.calibration
    ys, xs = np.mgrid[coadd.bbox.y0 : coadd.bbox.y1, coadd.bbox.x0 : coadd.bbox.x1]
    ra, dec = tract.pixel_to_sky(xs.ravel(), ys.ravel())
    truth = sky(ra, dec).reshape(coadd.shape) / factor
    good = np.isfinite(coadd.image)
    assert np.allclose(coadd.image[good], truth[good], rtol=1e-5)


def test_coverage_and_overlap(skymap: SkyMap) -> None:
    tract = skymap[0]
    wcs, bbox = science_frame()
    calexp = Exposure(np.zeros(bbox.shape), wcs=wcs, band="r")
    handles = {p.sequential_index: Handle(make_coadd(tract, p), 0, p.sequential_index) for p in tract}
    ra, dec = calexp.pixel_to_sky(130.0, 130.0)
    centre_patch = tract.find_patch(float(ra), float(dec)).sequential_index
    cfg = GetCoaddAsTemplateConfig()
    cfg.requiredTemplateFraction = 0.9
    with pytest.raises(NoWorkFound, match="requiredTemplateFraction"):
        GetCoaddAsTemplateTask(config=cfg).getTemplate(calexp, skymap, [handles[centre_patch]])
    with pytest.raises(NoWorkFound, match="no coadd patch overlaps"):
        GetCoaddAsTemplateTask().getTemplate(calexp, skymap, [])
    far_wcs, far_box = science_frame(offset_arcsec=(3600.0, 0.0))
    far = Exposure(np.zeros(far_box.shape), wcs=far_wcs, band="r")
    with pytest.raises(NoWorkFound):
        GetCoaddAsTemplateTask().getTemplate(far, skymap, list(handles.values()))


def test_band_mismatch_is_an_error(skymap: SkyMap) -> None:
    tract = skymap[0]
    wcs, bbox = science_frame()
    calexp = Exposure(np.zeros(bbox.shape), wcs=wcs, band="g")
    handles = [Handle(make_coadd(tract, p), 0, p.sequential_index) for p in tract]
    with pytest.raises(BandMismatchError, match="band 'r' but the science exposure is in band 'g'"):
        GetCoaddAsTemplateTask().getTemplate(calexp, skymap, handles)


def test_closest_tract_is_chosen() -> None:
    two = SkyMap.discrete(
        "two", [(RA0, DEC0, 0.02), (RA0 + 0.03, DEC0, 0.02)], patch_inner_dimensions=(150, 150), patch_border=20,
        tract_overlap=0.01, pixel_scale=0.2,
    )
    tract, why = select_tract(two, [0, 1], RA0 + 0.025, DEC0)
    assert tract.tract_id == 1 and "inner region" in why
    tract, why = select_tract(two, [0], RA0 + 0.025, DEC0)
    assert tract.tract_id == 0 and "closest centre" in why
    with pytest.raises(NoWorkFound):
        select_tract(two, [], RA0, DEC0)
