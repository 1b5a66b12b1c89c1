"""FITS exposure format: LSST multi-extension layout, LSST-stack and plain files, corruption."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning, Sip

from butler import (
    Box,
    CoaddPsf,
    CoaddPsfInput,
    Exposure,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    PhotoCalib,
    PolynomialPsf,
    VisitInfo,
)
from butler.errors import CorruptFileError, FormatError
from butler.formats import read_exposure_fits, read_exposure_zarr, write_exposure_fits, write_exposure_zarr
from butler.masks import DEFAULT_MASK_PLANES

X0, Y0 = 1200, 3400
H, W = 64, 96
# the shared real-data folder beside the repository (see ../shared/realdata/README.md); skipped when absent
REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
DECAM = REALDATA / "sfft_decam_i" / "DEC-OBS04a.mini.fits"
JWST = REALDATA / "sfft_jwst_nircam_f200w" / "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits"


def make_wcs(sip: bool, x0: int = X0, y0: int = Y0) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.1234567890123, 2.345678901234567]
    wcs.wcs.crpix = [x0 + 40.3, y0 + 30.7]
    wcs.wcs.cd = np.array([[-5.5e-5, 1.1e-6], [1.3e-6, 5.5e-5]])
    if sip:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[1, 1] = 1.2e-6, -3.3e-6, 5e-7
        b[1, 1], b[3, 0], b[0, 2] = 2.1e-6, 4.5e-9, 1e-6
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def stamp(sigma: float) -> np.ndarray:
    return GaussianPsf(sigma, size=15).image(0, 0).copy()


PSFS = {
    "gaussian": lambda: GaussianPsf(1.7, axis_ratio=0.8, theta_deg=20.0),
    "image": lambda: ImagePsf(stamp(2.2)),
    "grid": lambda: GridPsf(np.array([[stamp(1.5), stamp(2.0)], [stamp(2.5), stamp(1.8)]]), [X0, X0 + W - 1], [Y0, Y0 + H - 1]),
    "polynomial": lambda: PolynomialPsf(
        np.array([stamp(1.5), stamp(2.5)]), np.array([[1.0, 0.2, -0.1], [0.5, -0.1, 0.2]]), Box(X0, Y0, W, H), 1
    ),
    "coadd": lambda: CoaddPsf(
        [
            CoaddPsfInput(GaussianPsf(1.5), 1.0, Box(X0, Y0, W, H)),
            CoaddPsfInput(GaussianPsf(2.0), 2.0, Box(X0 + 20, Y0 + 10, W - 20, H - 10), ((1.0, 0.02, 3.0), (-0.02, 1.0, -2.0))),
        ]
    ),
}
PSF_POSITIONS = [(X0 + 1, Y0 + 1), (X0 + 50.5, Y0 + 30.2), (X0 + W - 2, Y0 + H - 2), (X0 + 30.0, Y0 + 50.0)]


def make_exposure(psf: str = "gaussian", sip: bool = True, seed: int = 0) -> Exposure:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, size=(H, W)).astype(np.float32)
    image[5, 7] = np.nan
    mask = np.zeros((H, W), np.int32)
    mask[:, 17] |= 1
    mask[rng.random((H, W)) < 0.02] |= 1 << 3
    exposure = Exposure(
        image,
        mask,
        (np.abs(image) + 3.0).astype(np.float32),
        xy0=(X0, Y0),
        wcs=make_wcs(sip),
        psf=PSFS[psf](),
        photo_calib=PhotoCalib(0.25, 0.002),
        visit_info=VisitInfo(30.0, 60123.25, 1.15, 0.71, 150.12, 2.34, 12.5, 4242),
        band="r",
        metadata={"OBSERVER": "pytest", "gain": 1.5, "flags": [1, 2, 3], "a long key": {"x": None}},
    )
    exposure.add_mask_plane("STREAK")
    return exposure


def assert_same_exposure(a: Exposure, b: Exposure, *, psf: bool = True) -> None:
    assert b.bbox == a.bbox
    for plane in ("image", "mask", "variance"):
        got, want = getattr(b, plane), getattr(a, plane)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert b.mask_planes == a.mask_planes
    assert b.band == a.band
    assert b.photo_calib == a.photo_calib
    assert b.visit_info == a.visit_info
    assert b.metadata == a.metadata
    if psf:
        assert b.psf.to_dict() == a.psf.to_dict()
        for x, y in PSF_POSITIONS:
            np.testing.assert_array_equal(b.psf.image(x, y), a.psf.image(x, y))
    assert_same_wcs(a, b)


def assert_same_wcs(a: Exposure, b: Exposure) -> None:
    """The four outer corners: same sky, and the sky maps back to the same pixels to < 1e-6 px."""
    xs, ys = (np.array(v) for v in zip(*a.bbox.corners(), strict=True))
    ra, dec = a.pixel_to_sky(xs, ys)
    bx, by = b.wcs.all_world2pix(ra, dec, 0, tolerance=1e-12, maxiter=100)
    assert np.max(np.hypot(bx - xs, by - ys)) < 1e-6
    rb, db = b.pixel_to_sky(xs, ys)
    assert np.max(np.abs(rb - ra)) < 1e-10 and np.max(np.abs(db - dec)) < 1e-10


@pytest.mark.parametrize("psf", sorted(PSFS))
def test_round_trip_every_psf(tmp_path: Path, psf: str) -> None:
    exposure = make_exposure(psf)
    path = write_exposure_fits(exposure, tmp_path / "calexp.fits")
    assert_same_exposure(exposure, read_exposure_fits(path))


@pytest.mark.parametrize("sip", [False, True], ids=["TAN", "TAN-SIP"])
def test_round_trip_wcs(tmp_path: Path, sip: bool) -> None:
    exposure = make_exposure(sip=sip)
    back = read_exposure_fits(write_exposure_fits(exposure, tmp_path / "e.fits"))
    assert_same_exposure(exposure, back)
    assert ("-SIP" in back.wcs.wcs.ctype[0]) == sip


def test_lsst_layout_and_keywords(tmp_path: Path) -> None:
    exposure = make_exposure()
    path = write_exposure_fits(exposure, tmp_path / "e.fits")
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "DIAPIPE_META"]
        assert hdul[0].data is None
        assert hdul[0].header["FILTER"] == "r" and hdul[0].header["EXPTIME"] == 30.0
        assert hdul[0].header["FLUXMAG0"] == pytest.approx(3631e9 / 0.25)
        assert hdul[0].header["OBSERVER"] == "pytest"  # simple metadata is visible in the header
        assert isinstance(hdul["DIAPIPE_META"], fits.BinTableHDU)
        for name, dtype in (("IMAGE", ">f4"), ("MASK", ">i4"), ("VARIANCE", ">f4")):
            header = hdul[name].header
            assert hdul[name].data.dtype == np.dtype(dtype)
            assert header["EXTTYPE"] == name
            # Local-array WCS, parent frame in the "A" WCS and in LTV (LSST/afw conventions).
            assert header["CRPIX1"] == pytest.approx(40.3 + 0.0) and header["CRPIX2"] == pytest.approx(30.7)
            assert header["CTYPE1"] == "RA---TAN-SIP" and "A_ORDER" in header
            assert header["CRVAL1A"] == X0 and header["CRVAL2A"] == Y0
            assert header["CRPIX1A"] == 1.0 and header["CTYPE1A"] == "LINEAR" and header["CUNIT1A"] == "PIXEL"
            assert header["WCSNAMEA"] == "PARENT"
            assert header["LTV1"] == -X0 and header["LTV2"] == -Y0
        planes = {k[3:]: v for k, v in hdul["MASK"].header.items() if k.startswith("MP_")}
        assert planes == exposure.mask_planes
        # astropy's own reading of the IMAGE HDU agrees on the sky of a local pixel.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            local = WCS(hdul["IMAGE"].header)
    np.testing.assert_allclose(
        local.all_pix2world(3.0, 4.0, 0), exposure.pixel_to_sky(X0 + 3.0, Y0 + 4.0), rtol=0, atol=1e-11
    )


def test_fits_and_zarr_agree(tmp_path: Path) -> None:
    exposure = make_exposure("coadd")
    from_fits = read_exposure_fits(write_exposure_fits(exposure, tmp_path / "e.fits"))
    from_zarr = read_exposure_zarr(write_exposure_zarr(exposure, tmp_path / "e.zarr"))
    assert_same_exposure(from_fits, from_zarr)


def test_sub_box_read(tmp_path: Path) -> None:
    exposure = make_exposure()
    path = write_exposure_fits(exposure, tmp_path / "e.fits")
    bbox = Box(X0 + 10, Y0 + 20, 30, 15)
    sub = read_exposure_fits(path, bbox=bbox)
    assert sub.xy0 == (bbox.x0, bbox.y0)
    np.testing.assert_array_equal(sub.image, exposure.subexposure(bbox).image)
    np.testing.assert_array_equal(sub.mask, exposure.subexposure(bbox).mask)
    assert_same_wcs(exposure.subexposure(bbox), sub)
    with pytest.raises(FormatError, match="not inside"):
        read_exposure_fits(path, bbox=Box(X0 - 1, Y0, 5, 5))


def test_writer_leaves_input_untouched_and_writeable(tmp_path: Path) -> None:
    exposure = make_exposure()
    before = exposure.image.copy()
    write_exposure_fits(exposure, tmp_path / "e.fits")
    np.testing.assert_array_equal(exposure.image, before)
    assert exposure.image.flags.writeable and exposure.image.dtype == np.float32


def test_no_overwrite_without_permission(tmp_path: Path) -> None:
    path = write_exposure_fits(make_exposure(seed=1), tmp_path / "e.fits")
    with pytest.raises(FormatError, match="overwrite=True"):
        write_exposure_fits(make_exposure(seed=2), path)
    write_exposure_fits(make_exposure(seed=2), path, overwrite=True)
    np.testing.assert_array_equal(read_exposure_fits(path).image, make_exposure(seed=2).image)
    assert os.listdir(tmp_path) == ["e.fits"]


# ----------------------------------------------------------------------------- foreign files
def write_lsst_style(path: Path) -> tuple[np.ndarray, WCS]:
    """A file laid out as the LSST stack writes it (no DIAPIPE_META; HIERARCH MP_ keywords)."""
    x0, y0 = 500, -20
    parent_wcs = make_wcs(True, x0, y0)
    image = np.arange(H * W, dtype=np.float32).reshape(H, W)
    header = parent_wcs.to_header(relax=True)
    header["CRPIX1"] -= x0
    header["CRPIX2"] -= y0
    for key, value in (("CRPIX1A", 1.0), ("CRPIX2A", 1.0), ("CRVAL1A", float(x0)), ("CRVAL2A", float(y0)),
                       ("CTYPE1A", "LINEAR"), ("CTYPE2A", "LINEAR"), ("CUNIT1A", "PIXEL"), ("CUNIT2A", "PIXEL"),
                       ("LTV1", -x0), ("LTV2", -y0)):
        header[key] = value
    mask_header = fits.Header()
    for name, bit in {"BAD": 0, "SAT": 1, "DETECTED": 5, "NO_DATA": 8, "MYPLANE": 20}.items():
        mask_header[f"HIERARCH MP_{name}"] = bit
    primary = fits.Header()
    primary["FILTER"] = "i"
    primary["EXPTIME"] = 15.0
    primary["DATE-AVG"] = "2023-02-25T12:00:00.000"
    primary["TIMESYS"] = "TAI"
    primary["FLUXMAG0"] = 3631e9 / 0.5
    primary["HIERARCH BORE-RA"] = 150.0
    primary["AR_HDU"] = 5
    primary["HIERARCH PSF_ID"] = 3
    primary["OBSID"] = "lsst-123"
    fits.HDUList(
        [
            fits.PrimaryHDU(header=primary),
            fits.ImageHDU(image, header=header, name="IMAGE"),
            fits.ImageHDU(np.full((H, W), 1 << 20, np.int32), header=mask_header, name="MASK"),
            fits.ImageHDU(np.ones((H, W), np.float32), name="VARIANCE"),
            fits.BinTableHDU.from_columns([fits.Column(name="dummy", format="J", array=[1])], name="ARCHIVE_INDEX"),
        ]
    ).writeto(path)
    return image, parent_wcs


def test_reads_lsst_stack_files(tmp_path: Path) -> None:
    image, parent_wcs = write_lsst_style(tmp_path / "lsst.fits")
    exposure = read_exposure_fits(tmp_path / "lsst.fits")
    assert exposure.xy0 == (500, -20)
    np.testing.assert_array_equal(exposure.image, image)
    assert exposure.mask_planes == {"BAD": 0, "SAT": 1, "DETECTED": 5, "NO_DATA": 8, "MYPLANE": 20}
    assert exposure.get_plane_bitmask("MYPLANE") == 1 << 20 and (exposure.mask == 1 << 20).all()
    assert exposure.band == "i"
    assert exposure.photo_calib.calibration == pytest.approx(0.5)
    assert exposure.visit_info.exposure_time == 15.0
    assert exposure.visit_info.mjd == pytest.approx(60000.5)
    assert exposure.visit_info.boresight_ra == 150.0
    assert exposure.metadata["OBSID"] == "lsst-123"
    assert "AR_HDU" not in exposure.metadata and "PSF_ID" not in exposure.metadata
    assert exposure.psf is None
    xs = np.array([500 - 0.5, 500 + W - 0.5, 500 + 10.25])
    ys = np.array([-20 - 0.5, -20 + H - 0.5, -20 + 3.5])
    np.testing.assert_allclose(exposure.pixel_to_sky(xs, ys), parent_wcs.all_pix2world(xs, ys, 0), rtol=0, atol=1e-10)


def test_plain_image_with_nan_pixels(tmp_path: Path) -> None:
    wcs = make_wcs(False, 0, 0)
    header = wcs.to_header()
    header["EXPTIME"] = 60.0
    header["MJD-OBS"] = 59000.0
    header["FILTER"] = "g DECam SDSS c0001"
    header["OBJECT"] = "field"
    image = np.arange(W * H, dtype=np.uint16).reshape(H, W).astype(np.float64)
    image[3, 4] = np.nan
    fits.PrimaryHDU(image, header=header).writeto(tmp_path / "plain.fits")
    exposure = read_exposure_fits(tmp_path / "plain.fits")
    assert exposure.xy0 == (0, 0) and exposure.band == "g"
    no_data = exposure.get_plane_bitmask("NO_DATA")
    assert exposure.mask[3, 4] == no_data and (exposure.mask != 0).sum() == 1
    assert np.isnan(exposure.variance[3, 4]) and exposure.variance[0, 0] == 0
    assert exposure.metadata["OBJECT"] == "field" and "CRPIX1" not in exposure.metadata
    assert exposure.visit_info.exposure_time == 60.0
    # MJD-OBS is the UTC start: VisitInfo.mjd is the TAI midpoint (TAI - UTC = 37 s in 2020).
    assert exposure.visit_info.mjd == pytest.approx(59000.0 + (30.0 + 37.0) / 86400, abs=1e-9)
    direct = WCS(header)  # the header holds ~14 significant digits, so compare with what it says
    np.testing.assert_allclose(exposure.pixel_to_sky(7, 9), direct.all_pix2world(7, 9, 0), rtol=0, atol=1e-12)


def test_plain_sci_err_extensions_and_hdu_choice(tmp_path: Path) -> None:
    wcs_header = make_wcs(False, 0, 0).to_header()
    sci = np.full((H, W), 2.0, np.float32)
    err = np.full((H, W), 3.0, np.float32)
    fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(sci, wcs_header, name="SCI"), fits.ImageHDU(err, wcs_header, name="ERR")]
    ).writeto(tmp_path / "i2d.fits")
    exposure = read_exposure_fits(tmp_path / "i2d.fits")
    assert (exposure.image == 2.0).all() and (exposure.variance == 9.0).all()
    chosen = read_exposure_fits(tmp_path / "i2d.fits", hdu="ERR")
    assert (chosen.image == 3.0).all()
    with pytest.raises(FormatError, match=r"no HDU named 'NOPE'; HDUs: PRIMARY, SCI, ERR"):
        read_exposure_fits(tmp_path / "i2d.fits", hdu="NOPE")
    with pytest.raises(FormatError, match=r"no HDU 7"):
        read_exposure_fits(tmp_path / "i2d.fits", hdu=7)


def test_fits_without_wcs(tmp_path: Path) -> None:
    path = tmp_path / "nowcs.fits"
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(path)
    with pytest.raises(FormatError, match=r"no celestial WCS") as info:
        read_exposure_fits(path)
    assert str(path) in str(info.value) and not isinstance(info.value, CorruptFileError)
    exposure = read_exposure_fits(path, require_wcs=False)
    assert exposure.wcs is None and exposure.shape == (8, 8)


def test_exposure_without_wcs_round_trips_with_require_wcs_false(tmp_path: Path) -> None:
    exposure = Exposure(np.ones((4, 6), np.float32), xy0=(3, 4))
    path = write_exposure_fits(exposure, tmp_path / "e.fits")
    with pytest.raises(FormatError, match="require_wcs=False"):
        read_exposure_fits(path)
    back = read_exposure_fits(path, require_wcs=False)
    assert back.xy0 == (3, 4) and back.wcs is None and back.mask_planes == dict(DEFAULT_MASK_PLANES)


# ----------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.02], ids=["in-last-data", "in-middle", "in-a-header"])
def test_truncated_fits(tmp_path: Path, keep: float) -> None:
    path = write_exposure_fits(make_exposure(), tmp_path / "e.fits")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptFileError, match=r"truncated|damaged|not a readable") as info:
        read_exposure_fits(path)
    assert str(path) in str(info.value)


def test_truncated_inside_an_extension_header_or_at_an_hdu_boundary(tmp_path: Path) -> None:
    path = write_exposure_fits(make_exposure(), tmp_path / "e.fits")
    data = path.read_bytes()
    path.write_bytes(data[: 2880 + 1000])  # primary HDU complete, IMAGE header cut
    with pytest.raises(CorruptFileError, match="damaged or truncated header"):
        read_exposure_fits(path)
    full = tmp_path / "full.fits"
    write_exposure_fits(make_exposure(), full)
    with fits.open(full) as hdul:
        boundary = hdul["VARIANCE"].fileinfo()["datLoc"] + hdul["VARIANCE"].fileinfo()["datSpan"]
    full.write_bytes(full.read_bytes()[:boundary])  # a valid-looking FITS file without DIAPIPE_META
    with pytest.raises(CorruptFileError, match="truncated at an HDU boundary"):
        read_exposure_fits(full)


def test_truncated_plain_fits(tmp_path: Path) -> None:
    path = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.zeros((50, 50), np.float32), header=make_wcs(False, 0, 0).to_header()).writeto(path)
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_exposure_fits(path)


def test_non_fits_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.fits"
    path.write_bytes(b"this is not a FITS file\n" * 200)
    with pytest.raises(CorruptFileError, match=r"garbage\.fits: not a readable FITS file"):
        read_exposure_fits(path)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty.fits"):
        read_exposure_fits(empty)
    with pytest.raises(FileNotFoundError):
        read_exposure_fits(tmp_path / "missing.fits")


def test_inconsistent_diapipe_metadata(tmp_path: Path) -> None:
    path = write_exposure_fits(make_exposure(), tmp_path / "e.fits")
    with fits.open(path, mode="update") as hdul:
        hdul["IMAGE"].header["CRVAL1A"] = 0.0  # moved xy0 without updating the metadata
    with pytest.raises(CorruptFileError, match="records bbox"):
        read_exposure_fits(path)


# ----------------------------------------------------------------------------- real pixels
@pytest.mark.skipif(not DECAM.exists(), reason="real DECam data not available")
def test_real_decam_tpv_file(tmp_path: Path) -> None:
    exposure = read_exposure_fits(DECAM)
    with fits.open(DECAM) as hdul:
        pixels = hdul[0].data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            direct = WCS(hdul[0].header)
    assert exposure.xy0 == (0, 0)  # LTV is ignored, as LSST does: xy0 comes from the "A" WCS only
    np.testing.assert_array_equal(exposure.image, pixels.astype(np.float32))
    # astropy turns TPV into TAN + a wcslib distortion internally, and writes TPV back out.
    assert exposure.wcs.to_header(relax=True)["CTYPE1"] == "RA---TPV"
    assert exposure.band == "i"
    xs, ys = (np.array(v) for v in zip(*exposure.bbox.corners(), strict=True))
    np.testing.assert_allclose(exposure.pixel_to_sky(xs, ys), direct.all_pix2world(xs, ys, 0), rtol=0, atol=1e-11)
    # TPV distortion survives our FITS and Zarr writers.
    for back in (
        read_exposure_fits(write_exposure_fits(exposure, tmp_path / "d.fits")),
        read_exposure_zarr(write_exposure_zarr(exposure, tmp_path / "d.zarr")),
    ):
        assert back.wcs.to_header(relax=True)["CTYPE1"] == "RA---TPV"
        np.testing.assert_array_equal(back.image, exposure.image)
        assert_same_wcs(exposure, back)
    shifted = exposure.subexposure(Box(100, 50, 60, 40))
    assert_same_wcs(shifted, read_exposure_fits(write_exposure_fits(shifted, tmp_path / "s.fits")))


@pytest.mark.skipif(not JWST.exists(), reason="real JWST data not available")
def test_real_jwst_i2d_stamp() -> None:
    exposure = read_exposure_fits(JWST)
    with fits.open(JWST) as hdul:
        np.testing.assert_array_equal(exposure.image, hdul[0].data.astype(np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            direct = WCS(hdul[0].header)
    np.testing.assert_allclose(exposure.pixel_to_sky(10.0, 20.0), direct.all_pix2world(10.0, 20.0, 0), rtol=0, atol=1e-11)
    assert exposure.band == "F200W"
