"""Zarr v3 exposure format: round trips, sub-box reads that touch only their chunks, corruption."""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.wcs import WCS, Sip

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
from butler.errors import CorruptFileError, DataModelError, FormatError
from butler.formats import read_exposure_zarr, write_exposure_zarr
from butler.formats.zarr_exposure import CODEC_PRESETS

X0, Y0 = 1200, 3400  # a patch-like origin in a tract frame
H, W = 96, 160
CHUNK = 32  # 3 x 5 chunks: sub-box and corruption tests
BIG_CHUNK = 64  # 2 x 3 chunks, partial ones at the edges: round trips (fewer files, faster)


def make_wcs(sip: bool, x0: int = X0, y0: int = Y0) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.1234567890123, 2.345678901234567]
    wcs.wcs.crpix = [x0 + 70.3, y0 + 40.7]
    wcs.wcs.cd = np.array([[-5.5e-5, 1.1e-6], [1.3e-6, 5.5e-5]])
    if sip:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[1, 1] = 1.2e-6, -3.3e-6, 5e-7
        b[1, 1], b[3, 0], b[0, 2] = 2.1e-6, 4.5e-9, 1e-6
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def gaussian_stamp(sigma: float, size: int = 15) -> np.ndarray:
    return GaussianPsf(sigma, size=size).image(0, 0).copy()


PSFS = {
    "gaussian": lambda: GaussianPsf(1.7, axis_ratio=0.8, theta_deg=20.0),
    "image": lambda: ImagePsf(gaussian_stamp(2.2)),
    "grid": lambda: GridPsf(
        np.array([[gaussian_stamp(1.5), gaussian_stamp(2.0)], [gaussian_stamp(2.5), gaussian_stamp(1.8)]]),
        [X0, X0 + W - 1],
        [Y0, Y0 + H - 1],
    ),
    "polynomial": lambda: PolynomialPsf(
        np.array([gaussian_stamp(1.5), gaussian_stamp(2.5)]),
        np.array([[1.0, 0.2, -0.1], [0.5, -0.1, 0.2]]),
        Box(X0, Y0, W, H),
        1,
    ),
    "coadd": lambda: CoaddPsf(
        [
            CoaddPsfInput(GaussianPsf(1.5), 1.0, Box(X0, Y0, W, H)),
            CoaddPsfInput(GaussianPsf(2.0), 2.0, Box(X0 + 20, Y0 + 10, W - 20, H - 10), ((1.0, 0.02, 3.0), (-0.02, 1.0, -2.0))),
        ]
    ),
}
PSF_POSITIONS = [(X0 + 1, Y0 + 1), (X0 + 80.5, Y0 + 50.2), (X0 + W - 2, Y0 + H - 2), (X0 + 30.0, Y0 + 70.0)]


def make_exposure(psf: str = "gaussian", sip: bool = True, seed: int = 0) -> Exposure:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, size=(H, W)).astype(np.float32)
    image[5, 7] = np.nan
    mask = np.zeros((H, W), np.int32)
    mask[:, 17] |= 1
    mask[rng.random((H, W)) < 0.02] |= 1 << 3
    variance = (np.abs(image) + 3.0).astype(np.float32)
    exposure = Exposure(
        image,
        mask,
        variance,
        xy0=(X0, Y0),
        wcs=make_wcs(sip),
        psf=PSFS[psf](),
        photo_calib=PhotoCalib(0.25, 0.002),
        visit_info=VisitInfo(30.0, 60123.25, 1.15, 0.71, 150.12, 2.34, 12.5, 4242),
        band="r",
        metadata={"OBSERVER": "pytest", "gain": 1.5, "flags": [1, 2, 3], "nested": {"a": None}},
    )
    exposure.add_mask_plane("STREAK")
    return exposure


def corners(exposure: Exposure) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*exposure.bbox.corners(), strict=True)
    return np.array(xs), np.array(ys)


def assert_same_exposure(a: Exposure, b: Exposure) -> None:
    assert b.bbox == a.bbox
    for plane in ("image", "mask", "variance"):
        got, want = getattr(b, plane), getattr(a, plane)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)  # NaN == NaN here
    assert b.mask_planes == a.mask_planes
    assert b.band == a.band
    assert b.photo_calib == a.photo_calib
    assert b.visit_info == a.visit_info or (
        b.visit_info.to_dict() == a.visit_info.to_dict()  # NaN-safe comparison
    )
    assert b.metadata == a.metadata
    assert type(b.psf) is type(a.psf)
    assert b.psf.to_dict() == a.psf.to_dict()
    for x, y in PSF_POSITIONS:
        if a.bbox.contains_point(x, y):
            np.testing.assert_array_equal(b.psf.image(x, y), a.psf.image(x, y))
    # WCS: the sky of the four outer corners maps back to the same pixels to < 1e-6 px.
    xs, ys = corners(a)
    ra, dec = a.pixel_to_sky(xs, ys)
    bx, by = b.wcs.all_world2pix(ra, dec, 0, tolerance=1e-12, maxiter=100)
    assert np.max(np.hypot(bx - xs, by - ys)) < 1e-6
    rb, db = b.pixel_to_sky(xs, ys)
    assert np.max(np.abs(rb - ra)) < 1e-10 and np.max(np.abs(db - dec)) < 1e-10


@pytest.mark.parametrize("psf", sorted(PSFS))
def test_round_trip_every_psf(tmp_path: Path, psf: str) -> None:
    exposure = make_exposure(psf)
    path = write_exposure_zarr(exposure, tmp_path / "calexp.zarr", chunk_size=BIG_CHUNK)
    assert_same_exposure(exposure, read_exposure_zarr(path))


@pytest.mark.parametrize("sip", [False, True], ids=["TAN", "TAN-SIP"])
@pytest.mark.parametrize("codec", sorted(CODEC_PRESETS))
def test_round_trip_wcs_and_codecs(tmp_path: Path, sip: bool, codec: str) -> None:
    exposure = make_exposure(sip=sip)
    write_exposure_zarr(exposure, tmp_path / "e.zarr", chunk_size=BIG_CHUNK, codec=codec)
    back = read_exposure_zarr(tmp_path / "e.zarr")
    assert_same_exposure(exposure, back)
    assert ("-SIP" in back.wcs.wcs.ctype[0]) == sip


def test_layout_and_attributes(tmp_path: Path) -> None:
    exposure = make_exposure()
    path = write_exposure_zarr(exposure, tmp_path / "e.zarr", chunk_size=CHUNK, fsync=False)
    group = zarr.open_group(path, mode="r")
    attrs = group.attrs.asdict()
    assert attrs["format"] == "diapipe.exposure" and attrs["format_version"] == 1
    assert attrs["bbox"] == [X0, Y0, W, H]
    # WCS kept in the parent frame: CRPIX (1-based) = parent 0-based crpix + 1.
    assert attrs["wcs"]["CRPIX1"] == X0 + 70.3 and attrs["wcs"]["CRPIX2"] == Y0 + 40.7
    assert attrs["wcs"]["A_ORDER"] == 3
    assert attrs["mask_planes"]["STREAK"] == exposure.mask_planes["STREAK"]
    json.dumps(attrs, allow_nan=False)  # plain JSON
    for plane, dtype in (("image", "float32"), ("mask", "int32"), ("variance", "float32")):
        array = group[plane]
        assert array.dtype == np.dtype(dtype)
        assert array.chunks == (CHUNK, CHUNK)
        assert array.compressors  # compressed
        grid = attrs["chunk_manifest"][plane]["grid"]
        assert grid == [H // CHUNK, W // CHUNK]
        assert len(attrs["chunk_manifest"][plane]["chunk_bytes"]) == grid[0] * grid[1]


def test_mask_compresses_hugely(tmp_path: Path) -> None:
    exposure = Exposure(np.zeros((512, 512), np.float32))
    exposure.mask[100:110, :] = 1
    path = write_exposure_zarr(exposure, tmp_path / "e.zarr", chunk_size=256)
    mask_bytes = sum(f.stat().st_size for f in (path / "mask").rglob("*") if f.is_file())
    assert mask_bytes < exposure.mask.nbytes / 50


def test_chunks_are_clipped_and_tiny_exposures_work(tmp_path: Path) -> None:
    exposure = Exposure(np.arange(15, dtype=np.float32).reshape(3, 5), xy0=(-4, 7))
    write_exposure_zarr(exposure, tmp_path / "e.zarr")  # chunk_size 1024 > shape
    back = read_exposure_zarr(tmp_path / "e.zarr")
    assert zarr.open_array(tmp_path / "e.zarr" / "image", mode="r").chunks == (3, 5)
    np.testing.assert_array_equal(back.image, exposure.image)
    assert back.xy0 == (-4, 7) and back.wcs is None and back.psf is None


def record_chunk_gets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    keys: list[str] = []
    original = zarr.storage.LocalStore.get

    async def get(self, key, prototype=None, byte_range=None):  # type: ignore[no-untyped-def]
        keys.append(key)
        return await original(self, key, prototype, byte_range)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    return keys


def test_sub_box_read_returns_the_slice_and_touches_only_its_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exposure = make_exposure("grid")
    path = write_exposure_zarr(exposure, tmp_path / "e.zarr", chunk_size=CHUNK, fsync=False)
    # Parent-frame box spanning chunk columns 1-2 and chunk row 1 only (local x 40..79, y 33..60).
    bbox = Box(X0 + 40, Y0 + 33, 40, 28)
    keys = record_chunk_gets(monkeypatch)
    sub = read_exposure_zarr(path, bbox=bbox)
    chunk_keys = sorted(k for k in keys if "/c/" in k)
    assert chunk_keys == sorted(f"{p}/c/1/{ix}" for p in ("image", "mask", "variance") for ix in (1, 2))
    assert sub.bbox == bbox and sub.xy0 == (bbox.x0, bbox.y0)
    expected = exposure.subexposure(bbox)
    for plane in ("image", "mask", "variance"):
        np.testing.assert_array_equal(getattr(sub, plane), getattr(expected, plane))
    # Same parent frame: a pixel has the same sky position in both.
    np.testing.assert_allclose(
        sub.pixel_to_sky(bbox.x0 + 3, bbox.y0 + 5), exposure.pixel_to_sky(bbox.x0 + 3, bbox.y0 + 5), rtol=0, atol=1e-12
    )
    assert sub.psf.to_dict() == exposure.psf.to_dict()


def test_sub_box_read_survives_deleting_the_chunks_it_does_not_need(tmp_path: Path) -> None:
    exposure = make_exposure()
    path = write_exposure_zarr(exposure, tmp_path / "e.zarr", chunk_size=CHUNK, fsync=False)
    for plane in ("image", "mask", "variance"):
        for chunk in (path / plane / "c").rglob("*"):
            if chunk.is_file() and chunk.relative_to(path / plane / "c").parts != ("0", "0"):
                chunk.unlink()
    bbox = Box(X0 + 2, Y0 + 3, CHUNK - 2, CHUNK - 3)  # inside chunk (0, 0)
    sub = read_exposure_zarr(path, bbox=bbox)
    np.testing.assert_array_equal(sub.image, exposure.subexposure(bbox).image)
    with pytest.raises(CorruptFileError, match=r"missing chunk file image/c/0/1"):
        read_exposure_zarr(path, bbox=Box(X0, Y0, CHUNK + 1, 4))
    with pytest.raises(CorruptFileError, match=str(path)):
        read_exposure_zarr(path)


def test_bbox_outside_the_exposure_is_a_clear_error(tmp_path: Path) -> None:
    path = write_exposure_zarr(make_exposure(), tmp_path / "e.zarr", chunk_size=BIG_CHUNK, fsync=False)
    with pytest.raises(FormatError, match=r"not inside the exposure"):
        read_exposure_zarr(path, bbox=Box(X0 - 1, Y0, 10, 10))
    with pytest.raises(FormatError, match=r"not inside"):
        read_exposure_zarr(path, bbox=Box(X0, Y0, W + 1, H))
    with pytest.raises(FormatError, match="Box"):
        read_exposure_zarr(path, bbox=(X0, Y0, 3, 3))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- corruption
def assert_corrupt(path: Path, pattern: str) -> None:
    """Reading ``path`` raises CorruptFileError matching ``pattern`` and naming the path."""
    with pytest.raises(CorruptFileError, match=pattern) as info:
        read_exposure_zarr(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, OSError) and isinstance(info.value, FormatError)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # fsync=False: 45 small chunk files; durability is not what these tests are about (and the
    # default, durable path is covered by the round trips and tests/butler/test_atomic.py).
    root = tmp_path_factory.mktemp("pristine")
    return write_exposure_zarr(make_exposure(), root / "e.zarr", chunk_size=CHUNK, fsync=False)


@pytest.fixture
def written(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid group, for a test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "e.zarr"))


def test_truncated_chunk(written: Path) -> None:
    chunk = written / "variance" / "c" / "1" / "2"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    assert_corrupt(written, r"variance/c/1/2 has \d+ bytes")


def test_flipped_bit_in_a_chunk_fails_the_checksum(written: Path) -> None:
    chunk = written / "image" / "c" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the CRC can tell
    chunk.write_bytes(bytes(data))
    assert_corrupt(written, r"cannot decode array 'image'.*[Cc]hecksum")


def test_missing_chunk(written: Path) -> None:
    (written / "mask" / "c" / "2" / "4").unlink()
    assert_corrupt(written, r"missing chunk file mask/c/2/4")


def test_garbage_and_missing_zarr_json(written: Path) -> None:
    (written / "zarr.json").write_text("{ this is not json")
    assert_corrupt(written, r"unreadable group metadata \(zarr\.json\)")
    (written / "zarr.json").unlink()
    assert_corrupt(written, r"no zarr\.json")


def test_missing_array(written: Path) -> None:
    shutil.rmtree(written / "variance")
    assert_corrupt(written, r"missing array 'variance'")


def edit_json(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_wrong_dtype_in_array_metadata(written: Path) -> None:
    edit_json(written / "mask" / "zarr.json", lambda d: d.update(data_type="float32"))
    assert_corrupt(written, r"array 'mask' has dtype float32, expected int32")


def test_wrong_shape_in_array_metadata(written: Path) -> None:
    edit_json(written / "image" / "zarr.json", lambda d: d.update(shape=[H, W - 1]))
    assert_corrupt(written, r"array 'image' has shape")


@pytest.mark.parametrize("key", ["bbox", "wcs", "mask_planes", "chunk_manifest", "format_version"])
def test_attributes_missing_keys(written: Path, key: str) -> None:
    edit_json(written / "zarr.json", lambda d: d["attributes"].pop(key))
    assert_corrupt(written, rf"lack {key}")


def test_malformed_component_attribute(written: Path) -> None:
    edit_json(written / "zarr.json", lambda d: d["attributes"].update(psf={"type": "NoSuchPsf"}))
    assert_corrupt(written, r"invalid psf")


def test_not_an_exposure_and_too_new(written: Path) -> None:
    edit_json(written / "zarr.json", lambda d: d["attributes"].update(format_version=99))
    with pytest.raises(FormatError, match=r"newer"):
        read_exposure_zarr(written)
    edit_json(written / "zarr.json", lambda d: d["attributes"].update(format="something.else"))
    with pytest.raises(FormatError, match=r"not a diapipe exposure"):
        read_exposure_zarr(written)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_exposure_zarr(tmp_path / "nothere.zarr")


# ----------------------------------------------------------------------------- writing rules
def test_no_overwrite_without_permission(tmp_path: Path) -> None:
    first = make_exposure(seed=1)
    path = write_exposure_zarr(first, tmp_path / "e.zarr", chunk_size=BIG_CHUNK)
    with pytest.raises(FormatError, match="overwrite=True"):
        write_exposure_zarr(make_exposure(seed=2), path, chunk_size=BIG_CHUNK)
    np.testing.assert_array_equal(read_exposure_zarr(path).image, first.image)
    second = make_exposure(seed=2)
    write_exposure_zarr(second, path, chunk_size=BIG_CHUNK, overwrite=True)
    np.testing.assert_array_equal(read_exposure_zarr(path).image, second.image)
    assert sorted(os.listdir(tmp_path)) == ["e.zarr"]


def test_bad_arguments(tmp_path: Path) -> None:
    exposure = make_exposure()
    with pytest.raises(FormatError, match="blosc-lz4"):
        write_exposure_zarr(exposure, tmp_path / "a.zarr", codec="gzip-9")
    with pytest.raises(FormatError, match="chunk_size"):
        write_exposure_zarr(exposure, tmp_path / "b.zarr", chunk_size=0)
    exposure.metadata["bad"] = float("nan")
    with pytest.raises(DataModelError, match=r"metadata\['bad'\]"):
        write_exposure_zarr(exposure, tmp_path / "c.zarr")
    assert os.listdir(tmp_path) == []


def test_writer_does_not_modify_the_exposure(tmp_path: Path) -> None:
    exposure = make_exposure()
    before = [getattr(exposure, p).copy() for p in ("image", "mask", "variance")]
    write_exposure_zarr(exposure, tmp_path / "e.zarr", chunk_size=BIG_CHUNK)
    for plane, old in zip(("image", "mask", "variance"), before, strict=True):
        np.testing.assert_array_equal(getattr(exposure, plane), old)


def test_zarr_concurrency_is_bounded() -> None:
    if "ZARR_THREADING__MAX_WORKERS" not in os.environ:
        assert zarr.config.get("threading.max_workers") is not None
        assert zarr.config.get("threading.max_workers") <= max(1, os.cpu_count() or 1)
    if "ZARR_ASYNC__CONCURRENCY" not in os.environ:
        assert zarr.config.get("async.concurrency") <= 8


def test_concurrent_writes_and_reads_from_threads(tmp_path: Path) -> None:
    """Dask runs quanta in threads: several threads writing and reading at once stay correct."""
    exposures = [make_exposure(seed=seed) for seed in range(4)]
    barrier = threading.Barrier(4)

    def work(index: int) -> Exposure:
        barrier.wait()
        path = write_exposure_zarr(exposures[index], tmp_path / f"e{index}.zarr", chunk_size=CHUNK, fsync=False)
        return read_exposure_zarr(path)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4)))
    for exposure, back in zip(exposures, results, strict=True):
        np.testing.assert_array_equal(back.image, exposure.image)
        np.testing.assert_array_equal(back.mask, exposure.mask)
