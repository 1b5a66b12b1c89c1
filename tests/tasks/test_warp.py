"""warp_exposure: flux and astrometry of a warped star field, noise propagation, masks, PSF."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from butler.exposure import Exposure, PhotoCalib, VisitInfo
from butler.geometry import Box
from butler.psf import CoaddPsf, GaussianPsf
from tasks.warp import WARP_METHODS, WarpError, pixel_mapping, warp_exposure, warp_kernel_weights

N = 320


def tan_wcs(crpix: tuple[float, float], scale_arcsec: float = 0.2, rot_deg: float = 0.0,
            crval: tuple[float, float] = (150.0, 2.0)) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = [crpix[0] + 1, crpix[1] + 1]  # FITS is 1-based
    t = np.radians(rot_deg)
    s = scale_arcsec / 3600.0
    wcs.wcs.cd = np.array([[-s * np.cos(t), s * np.sin(t)], [s * np.sin(t), s * np.cos(t)]])
    return wcs


def star_field(n_stars: int = 40, seed: int = 3, sigma: float = 1.5):
    rng = np.random.default_rng(seed)
    psf = GaussianPsf(sigma)
    # Isolated stars on a jittered grid.
    gx, gy = np.meshgrid(np.arange(30, N - 30, 42.0), np.arange(30, N - 30, 42.0))
    xs = gx.ravel() + rng.uniform(-5, 5, gx.size)
    ys = gy.ravel() + rng.uniform(-5, 5, gy.size)
    flux = rng.uniform(1e4, 1e5, xs.size)
    img = np.zeros((N, N))
    for x, y, f in zip(xs, ys, flux, strict=True):
        stamp, x0, y0 = psf.shifted_image(x, y)
        h, w = stamp.shape
        img[y0 : y0 + h, x0 : x0 + w] += f * stamp
    return img, xs, ys, flux, psf


def aperture(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float = 9.0):
    """Flux and first-moment centroid in a circular aperture around each (x, y)."""
    out = []
    iy, ix = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    for a, b in zip(x, y, strict=True):
        r = int(radius) + 2
        sl = (slice(int(b) - r, int(b) + r + 1), slice(int(a) - r, int(a) + r + 1))
        sel = (ix[sl] - a) ** 2 + (iy[sl] - b) ** 2 <= radius**2
        pix = image[sl][sel]
        f = pix.sum()
        out.append((f, (pix * ix[sl][sel]).sum() / f, (pix * iy[sl][sel]).sum() / f))
    return np.array(out)


@pytest.fixture(scope="module")
def field():
    img, xs, ys, flux, psf = star_field()
    wcs_in = tan_wcs((N / 2, N / 2))
    exposure = Exposure(
        img,
        variance=np.full(img.shape, 4.0),
        wcs=wcs_in,
        psf=psf,
        photo_calib=PhotoCalib(0.5),
        visit_info=VisitInfo(exposure_time=30.0, visit_id=7),
        band="r",
        metadata={"KEY": 1},
    )
    # Sub-pixel shift and a small rotation.
    wcs_out = tan_wcs((N / 2 + 0.37, N / 2 - 0.81), rot_deg=0.7)
    return exposure, wcs_out, xs, ys, flux


@pytest.mark.parametrize("method", ["lanczos3", "bicubic"])
def test_star_fluxes_and_positions(field, method: str) -> None:
    exposure, wcs_out, xs, ys, flux = field
    out = warp_exposure(exposure, wcs_out, Box(0, 0, N, N), method=method)
    ra, dec = exposure.wcs.all_pix2world(xs, ys, 0)
    tx, ty = wcs_out.all_world2pix(ra, dec, 0)
    inside = (tx > 20) & (tx < N - 20) & (ty > 20) & (ty < N - 20)
    assert inside.sum() > 20
    m = aperture(out.image, tx[inside], ty[inside])
    assert np.all(np.isfinite(m))
    np.testing.assert_array_less(np.abs(m[:, 0] / flux[inside] - 1.0), 0.005)  # issue: 0.5%
    np.testing.assert_array_less(np.abs(m[:, 1] - tx[inside]), 0.02)  # issue: 0.02 px
    np.testing.assert_array_less(np.abs(m[:, 2] - ty[inside]), 0.02)


def test_lanczos_weights_reproduce_constants_and_ramps() -> None:
    frac = np.linspace(0.0, 0.999, 101)
    for method, ntaps in WARP_METHODS.items():
        w = warp_kernel_weights(method, frac)
        k = np.arange(-(ntaps // 2) + 1, ntaps // 2 + 1)[:, None]
        np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-6)
        np.testing.assert_allclose(((k - frac) * w).sum(axis=0), 0.0, atol=1e-5)
        # integer phase: a pure copy
        np.testing.assert_allclose(w[:, 0], (k[:, 0] == 0).astype(float), atol=1e-7)


def test_flux_conserved_when_pixel_scales_differ() -> None:
    img, xs, ys, flux, psf = star_field(sigma=2.5)
    exposure = Exposure(img, variance=np.ones_like(img), wcs=tan_wcs((N / 2, N / 2), 0.2), psf=psf)
    # Target pixels 1.25x larger: counts per target pixel must rise, totals stay.
    wcs_out = tan_wcs((N / 2 / 1.25, N / 2 / 1.25), 0.25, rot_deg=0.3)
    n_out = int(N / 1.25)
    out = warp_exposure(exposure, wcs_out, Box(0, 0, n_out, n_out))
    ra, dec = exposure.wcs.all_pix2world(xs, ys, 0)
    tx, ty = wcs_out.all_world2pix(ra, dec, 0)
    inside = (tx > 15) & (tx < n_out - 15) & (ty > 15) & (ty < n_out - 15)
    m = aperture(out.image, tx[inside], ty[inside], radius=8.0)
    np.testing.assert_allclose(m[:, 0] / flux[inside], 1.0, atol=0.005)


def test_noise_propagates_and_outside_is_no_data() -> None:
    rng = np.random.default_rng(11)
    n = 256
    sigma = 3.0
    exposure = Exposure(
        rng.normal(0.0, sigma, (n, n)), variance=np.full((n, n), sigma**2), wcs=tan_wcs((n / 2, n / 2))
    )
    # Shifted by ~40 px so that a band of the target is not covered.
    wcs_out = tan_wcs((n / 2 - 40.3, n / 2 + 0.45), rot_deg=1.0)
    out = warp_exposure(exposure, wcs_out, Box(0, 0, n, n))
    no_data = out.get_plane_bitmask("NO_DATA")
    good = (out.mask & no_data) == 0
    assert 0.7 * n * n < good.sum() < 0.9 * n * n
    assert np.all(np.isnan(out.image[~good])) and np.all(np.isnan(out.variance[~good]))
    assert np.all(np.isfinite(out.image[good]))
    # The last ~40 columns map beyond the input (x_in > n - 1): no data there.
    assert not good[:, -35:].any()
    # Per-pixel variance plane predicts the per-pixel scatter (covariance not included).
    chi = out.image[good] / np.sqrt(out.variance[good])
    assert abs(np.std(chi) - 1.0) < 0.02
    # Interpolation smooths: mean variance below the input's, but not absurdly.
    assert 0.5 * sigma**2 < np.mean(out.variance[good]) < sigma**2
    # EDGE is never invented.
    assert not (out.mask & out.get_plane_bitmask("EDGE")).any()


def test_masks_propagate_and_integer_shift_is_exact() -> None:
    rng = np.random.default_rng(2)
    n = 64
    img = rng.normal(100.0, 5.0, (n, n))
    exposure = Exposure(img, variance=np.full((n, n), 25.0), wcs=tan_wcs((n / 2, n / 2)), xy0=(10, 20))
    exposure.set_mask("CR", np.zeros((n, n), bool))
    exposure.mask[30, 30] |= exposure.get_plane_bitmask("CR")
    # Target frame shifted by exactly (3, -2) pixels: target (x, y) sees input parent (x + 3, y - 2).
    wcs_out = tan_wcs((n / 2 - 3, n / 2 + 2))
    target = Box(0, 0, n + 20, n + 30)
    out = warp_exposure(exposure, wcs_out, target)
    # input parent pixel (10 + 30, 20 + 30) -> target (37, 52)
    iy, ix = np.nonzero(out.mask & out.get_plane_bitmask("CR"))
    assert list(zip(ix.tolist(), iy.tolist(), strict=True)) == [(37, 52)]
    # target (x, y) = input array [y - 2 - 20, x + 3 - 10], pixel for pixel
    np.testing.assert_allclose(out.image[22 : 22 + n, 7 : 7 + n], img, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.variance[22 : 22 + n, 7 : 7 + n], 25.0, rtol=1e-6)
    assert np.isnan(out.image[21, 30]) and np.isnan(out.image[30, 6])
    # Half-pixel shift: the CR spreads to the 2 pixels sharing it (bilinear footprint).
    wcs_half = tan_wcs((n / 2 - 3.5, n / 2 + 2))
    out = warp_exposure(exposure, wcs_half, target)
    iy, ix = np.nonzero(out.mask & out.get_plane_bitmask("CR"))
    assert sorted(zip(ix.tolist(), iy.tolist(), strict=True)) == [(36, 52), (37, 52)]


def test_nan_input_becomes_no_data() -> None:
    n = 64
    img = np.ones((n, n))
    img[32, 32] = np.nan
    exposure = Exposure(img, variance=np.ones((n, n)), wcs=tan_wcs((n / 2, n / 2)))
    out = warp_exposure(exposure, tan_wcs((n / 2 + 0.5, n / 2)), Box(0, 0, n, n), method="bilinear")
    bad = ~np.isfinite(out.image)
    assert bad[32, 32] and bad[32, 33]
    assert np.all((out.mask[bad] & out.get_plane_bitmask("NO_DATA")) != 0)
    interior = np.isfinite(out.image)
    np.testing.assert_allclose(out.image[interior], 1.0, atol=1e-6)


def test_metadata_wcs_and_psf(field) -> None:
    exposure, wcs_out, *_ = field
    out = warp_exposure(exposure, wcs_out, Box(5, 7, 200, 180))
    assert out.bbox == Box(5, 7, 200, 180)
    assert out.wcs is wcs_out
    assert out.photo_calib == exposure.photo_calib and out.visit_info == exposure.visit_info
    assert out.band == "r" and out.metadata == {"KEY": 1}
    assert isinstance(out.psf, CoaddPsf)
    # The Gaussian is round: the rotated PSF has the same FWHM; and it is centred.
    kernel = out.psf.image(100.0, 100.0)
    assert abs(out.psf.fwhm(100.0, 100.0) - exposure.psf.fwhm(0, 0)) < 0.01
    cy, cx = (np.asarray(kernel.shape) - 1) / 2
    yy, xx = np.mgrid[0 : kernel.shape[0], 0 : kernel.shape[1]]
    assert abs((kernel * xx).sum() - cx) < 0.01 and abs((kernel * yy).sum() - cy) < 0.01
    # The input is not modified.
    assert exposure.mask.max() == 0


def test_elliptical_psf_rotates_with_the_frame() -> None:
    psf = GaussianPsf(2.0, axis_ratio=0.5, theta_deg=0.0)
    exposure = Exposure(np.zeros((64, 64)), wcs=tan_wcs((32, 32)), psf=psf)
    out = warp_exposure(exposure, tan_wcs((32, 32), rot_deg=90.0), Box(0, 0, 64, 64))
    kernel = out.psf.image(32, 32)
    yy, xx = np.mgrid[0 : kernel.shape[0], 0 : kernel.shape[1]] - (kernel.shape[0] - 1) / 2
    # Major axis was along x in the input; a 90-degree rotation puts it along y.
    assert (kernel * yy**2).sum() > 2.0 * (kernel * xx**2).sum()


def test_mapping_matches_the_wcs() -> None:
    w_in = tan_wcs((100, 100), crval=(150.0, 2.0))
    w_out = tan_wcs((80, 130), 0.21, rot_deg=2.0, crval=(150.01, 2.005))
    box = Box(-20, 10, 300, 250)
    mapping = pixel_mapping(w_in, w_out, box, grid_step=32)
    xi, yi, det = mapping.evaluate(0, box.height)
    gy, gx = np.mgrid[box.y0 : box.y1, box.x0 : box.x1]
    ra, dec = w_out.all_pix2world(gx.ravel(), gy.ravel(), 0)
    ex, ey = w_in.all_world2pix(ra, dec, 0)
    np.testing.assert_allclose(xi.ravel(), ex, atol=1e-6)
    np.testing.assert_allclose(yi.ravel(), ey, atol=1e-6)
    np.testing.assert_allclose(det, (0.21 / 0.2) ** 2, rtol=1e-4)


def test_errors() -> None:
    exposure = Exposure(np.zeros((8, 8)))
    with pytest.raises(WarpError, match="no WCS"):
        warp_exposure(exposure, tan_wcs((4, 4)), Box(0, 0, 8, 8))
    exposure = Exposure(np.zeros((8, 8)), wcs=tan_wcs((4, 4)))
    with pytest.raises(WarpError, match="choose one of: bilinear, bicubic, lanczos3"):
        warp_exposure(exposure, tan_wcs((4, 4)), Box(0, 0, 8, 8), method="nearest")


def test_thread_safe(field) -> None:
    """Eight threads warping the same exposure at once get the serial result (DESIGN section 7)."""
    import threading

    exposure, wcs_out, *_ = field
    box = Box(0, 0, 160, 160)
    serial = warp_exposure(exposure, wcs_out, box)
    barrier = threading.Barrier(8)
    results: list = [None] * 8

    def work(i: int) -> None:
        barrier.wait()
        results[i] = warp_exposure(exposure, wcs_out, box, method="lanczos3")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in results:
        np.testing.assert_array_equal(out.image, serial.image)
        np.testing.assert_array_equal(out.variance, serial.variance)
        np.testing.assert_array_equal(out.mask, serial.mask)


def test_interpolated_variance_is_right_after_smoothing() -> None:
    """variance="interpolated": a warped-then-smoothed noise image has the predicted scatter."""
    from scipy import ndimage

    rng = np.random.default_rng(8)
    n = 300
    exposure = Exposure(rng.normal(0.0, 2.0, (n, n)), variance=np.full((n, n), 4.0), wcs=tan_wcs((n / 2, n / 2)))
    wcs_out = tan_wcs((n / 2 + 0.43, n / 2 - 0.29), rot_deg=0.4)
    k = np.exp(-0.5 * (np.arange(-8, 9) / 2.5) ** 2)
    k /= k.sum()
    results = {}
    for mode in ("squared", "interpolated"):
        out = warp_exposure(exposure, wcs_out, Box(0, 0, n, n), variance=mode)
        good = np.isfinite(out.image)
        img = np.where(good, out.image, 0.0)
        var = np.where(good, out.variance, 0.0)
        sm = ndimage.correlate1d(ndimage.correlate1d(img, k, axis=0), k, axis=1)
        sv = ndimage.correlate1d(ndimage.correlate1d(var, k**2, axis=0), k**2, axis=1)
        inner = ndimage.binary_erosion(good, iterations=10)
        results[mode] = np.std(sm[inner] / np.sqrt(sv[inner]))
    assert abs(results["interpolated"] - 1.0) < 0.04
    assert results["squared"] > 1.08  # per-pixel variances ignore the warp's correlations
