"""Exposure construction, sub-exposures, world<->pixel, calibration, catalogs."""

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from butler import Box, Exposure, GaussianPsf, PhotoCalib, VisitInfo
from butler.catalog import make_source_catalog, validate_source_catalog
from butler.errors import DataModelError, MaskPlaneError


def make_wcs(x0=0, y0=0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [1025.0 - x0, 1025.0 - y0]
    w.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600.0
    return w


def make_exposure(shape=(40, 60), xy0=(100, 200)):
    rng = np.random.default_rng(1)
    return Exposure(
        rng.normal(size=shape),
        np.zeros(shape, np.int16),
        np.ones(shape),
        xy0=xy0,
        wcs=make_wcs(),
        psf=GaussianPsf(1.5),
        photo_calib=PhotoCalib(0.5),
        visit_info=VisitInfo(exposure_time=30.0, mjd=60000.5, airmass=1.2, seeing=0.8, visit_id=7),
        band="r",
        metadata={"OBSERVER": "sim"},
    )


def test_arrays_are_converted_and_checked():
    exp = make_exposure()
    assert exp.image.dtype == np.float32 and exp.variance.dtype == np.float32 and exp.mask.dtype == np.int32
    assert exp.bbox == Box(100, 200, 60, 40)
    with pytest.raises(DataModelError, match=r"variance has shape \(3, 3\), but the image has shape \(4, 4\)"):
        Exposure(np.zeros((4, 4)), variance=np.zeros((3, 3)))
    with pytest.raises(DataModelError, match="mask must hold integer bit planes, got dtype float64"):
        Exposure(np.zeros((4, 4)), mask=np.zeros((4, 4)))
    with pytest.raises(DataModelError, match="image must be real numbers, got dtype complex128"):
        Exposure(np.zeros((4, 4), complex))
    with pytest.raises(DataModelError, match="must be 2-D"):
        Exposure(np.zeros(4))
    with pytest.raises(DataModelError, match="psf must be"):
        Exposure(np.zeros((4, 4)), psf="gaussian")


def test_subexposure_is_a_view_in_the_parent_frame():
    exp = make_exposure()
    sub = exp.subexposure(Box(110, 205, 10, 5))
    assert sub.xy0 == (110, 205)
    assert sub.image[0, 0] == exp.image[5, 10]
    sub.image[0, 0] = 42.0
    assert exp.image[5, 10] == 42.0  # a view by default
    deep = exp.subexposure(Box(110, 205, 10, 5), deep=True)
    deep.image[0, 0] = -1.0
    assert exp.image[5, 10] == 42.0
    # The same parent pixel maps to the same sky position from both.
    assert np.allclose(sub.pixel_to_sky(115, 207), exp.pixel_to_sky(115, 207))
    with pytest.raises(DataModelError, match="not contained"):
        exp.subexposure(Box(0, 0, 10, 10))


def test_world_pixel_round_trip_and_scale():
    exp = make_exposure()
    ra, dec = exp.pixel_to_sky([100.0, 159.0], [200.0, 239.0])
    x, y = exp.sky_to_pixel(ra, dec)
    assert np.allclose(x, [100, 159], atol=1e-8) and np.allclose(y, [200, 239], atol=1e-8)
    assert exp.pixel_scale() == pytest.approx(0.2, rel=1e-4)
    ra_c, dec_c = exp.sky_corners()
    assert ra_c.shape == (4,)
    with pytest.raises(DataModelError, match="no WCS"):
        Exposure(np.zeros((2, 2))).pixel_to_sky(0, 0)


def test_mask_planes_travel_with_the_exposure():
    exp = make_exposure()
    exp.set_mask("SAT", exp.image > 1.0)
    assert np.array_equal((exp.mask & exp.get_plane_bitmask("SAT")) != 0, exp.image > 1.0)
    bit = exp.add_mask_plane("STREAK")
    assert exp.mask_planes["STREAK"] == bit
    assert exp.subexposure(Box(100, 200, 5, 5)).mask_planes["STREAK"] == bit
    with pytest.raises(MaskPlaneError, match="unknown mask plane 'GHOST'"):
        exp.get_plane_bitmask("GHOST")


def test_copy_is_independent():
    exp = make_exposure()
    cp = exp.copy()
    cp.image[:] = 0
    cp.metadata["OBSERVER"] = "x"
    assert exp.image.any() and exp.metadata["OBSERVER"] == "sim"


def test_photo_calib_and_visit_info():
    calib = PhotoCalib.from_zero_point(27.0)
    assert calib.zero_point == pytest.approx(27.0)
    assert calib.njy_to_counts(calib.counts_to_njy(123.0)) == pytest.approx(123.0)
    assert PhotoCalib.njy_to_mag(3631e9) == pytest.approx(0.0, abs=1e-3)  # AB zero point is 3631 Jy
    with pytest.raises(DataModelError, match="positive"):
        PhotoCalib(0.0)
    info = VisitInfo(exposure_time=30.0, mjd=60000.5, visit_id=3)
    back = VisitInfo.from_dict(info.to_dict())
    assert back.exposure_time == 30.0 and back.visit_id == 3 and np.isnan(back.airmass)
    with pytest.raises(DataModelError, match="unknown fields"):
        VisitInfo.from_dict({"exptime": 3})


def test_source_catalog_conventions():
    cat = make_source_catalog(3, columns=["psfFlux", "psfFluxErr", "pixelFlags_saturated"], meta={"apRadius": 5})
    assert str(cat["coord_ra"].unit) == "deg" and str(cat["psfFlux"].unit) == "nJy"
    assert cat["pixelFlags_saturated"].dtype == bool
    cat["id"] = [1, 2, 3]
    assert validate_source_catalog(cat) is cat
    dup = cat.copy()
    dup["id"] = [1, 1, 2]
    with pytest.raises(DataModelError, match="duplicate"):
        validate_source_catalog(dup, where="src")
    with pytest.raises(DataModelError, match=r"src: missing required column\(s\) \['coord_dec', 'x', 'y'\]"):
        validate_source_catalog(Table({"id": [1], "coord_ra": [1.0]}), where="src")
    bad_unit = cat.copy()
    bad_unit["psfFlux"].unit = "deg"
    with pytest.raises(DataModelError, match="unit deg, expected nJy"):
        validate_source_catalog(bad_unit)
    with pytest.raises(DataModelError, match="not a conventional source column"):
        make_source_catalog(1, columns=["mystery"])
