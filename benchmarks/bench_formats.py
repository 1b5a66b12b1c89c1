"""Exposure and catalog file formats: write/read speed, size on disk, sub-box reads, peak memory.

Prints a table for a 4096x4096 exposure (image + mask + variance = 201 MB in memory; sky + noise +
a few thousand Gaussian stars + bad columns + cosmic rays; variance = sky + star counts):

- Zarr (``write_exposure_zarr``/``read_exposure_zarr``) with several codec presets,
- FITS through our writer/reader (LSST MEF layout, ``write_exposure_fits``/``read_exposure_fits``),
- plain astropy MEF (``HDUList.writeto`` / ``fits.open(...)[i].data``) as the reference point.

Writes are timed twice: ``fsync=False`` (data left in the page cache, like a plain ``writeto``)
and durable (``fsync=True``, the datastore default).  Reads are warm-cache medians, plus a "cold"
read after evicting the files from the page cache (``posix_fadvise(DONTNEED)``; on this VM the
virtual disk is itself fast, so cold is not much slower).  The astropy reference read returns the
raw big-endian arrays (no conversion); our readers return an ``Exposure`` (native float32/int32,
WCS, PSF, ...).  A 512x512 sub-box read (not aligned to chunks: it touches 2x2 chunks per plane).
A "zarr-direct" what-if row reads the library's Zarr files with a custom chunk decoder instead of
zarr-python (not used by the library; it shows the cost of zarr-python's read pipeline).  Each
case runs in a fresh subprocess so its peak RSS can be reported (the 201 MB input exposure is part
of every process's peak).  Finally a 10^6-row catalog through pyarrow directly vs astropy's own
Parquet writer.

Usage: ``python benchmarks/bench_formats.py [--size 4096] [--repeat 5]``.  Prints; asserts nothing.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_exposure(size: int, seed: int = 1):
    """A realistic exposure: sky + noise + stars, masked columns, cosmic rays, TAN-SIP WCS."""
    from astropy.wcs import WCS, Sip

    from butler import Exposure, GaussianPsf, PhotoCalib, VisitInfo

    rng = np.random.default_rng(seed)
    sky = 1000.0
    model = np.full((size, size), sky, np.float32)
    half = 12
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    n_stars = int(3000 * (size / 4096) ** 2) + 10
    sigma = 1.8
    for x, y, flux in zip(
        rng.uniform(half, size - half - 1, n_stars),
        rng.uniform(half, size - half - 1, n_stars),
        10 ** rng.uniform(2.5, 6.0, n_stars),
        strict=True,
    ):
        ix, iy = int(x), int(y)
        stamp = np.exp(-0.5 * ((xx - (x - ix)) ** 2 + (yy - (y - iy)) ** 2) / sigma**2)
        model[iy - half : iy + half + 1, ix - half : ix + half + 1] += (stamp * (flux / stamp.sum())).astype(np.float32)
    image = (model + rng.standard_normal((size, size), dtype=np.float32) * np.sqrt(model) - sky).astype(np.float32)
    mask = np.zeros((size, size), np.int32)
    for column in rng.integers(0, size, 5):
        mask[:, column] |= 1  # BAD
        image[:, column] = 0.0
    for _ in range(int(300 * (size / 4096) ** 2) + 3):
        x, y = rng.integers(0, size - 20, 2)
        length = int(rng.integers(3, 20))
        mask[y, x : x + length] |= 8  # CR
        image[y, x : x + length] += 5000.0
    mask[image > 40000] |= 2  # SAT
    mask[model > sky + 5 * np.sqrt(sky)] |= 32  # DETECTED
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [150.1, 2.2]
    wcs.wcs.crpix = [size / 2, size / 2]
    wcs.wcs.cd = np.array([[-5.5e-5, 0.0], [0.0, 5.5e-5]])
    a = np.zeros((3, 3))
    b = np.zeros((3, 3))
    a[2, 0], b[0, 2] = 2e-8, -1e-8
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return Exposure(
        image, mask, model, wcs=wcs, psf=GaussianPsf(sigma), photo_calib=PhotoCalib(0.2),
        visit_info=VisitInfo(30.0, 60000.1, 1.2, 0.8, 150.1, 2.2), band="r",
    )


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


#: Statistic over repeated runs: "median" (default) or "min" (robust on a machine shared with
#: other jobs: contention only ever adds time).  Set by --stat.
STAT = "median"


def median_time(func, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times) if STAT == "min" else statistics.median(times)


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's (or a tree's) pages from the page cache: the next read comes from disk."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def direct_zarr_read(path: Path) -> dict[str, np.ndarray]:
    """What-if, NOT the library: decode our Zarr chunk files without zarr-python's read pipeline.

    zarr-python copies every decoded chunk into the output on its single event-loop thread; here
    each pool thread reads a chunk file, checks its CRC-32C trailer, Blosc-decompresses it and
    copies it into place.  Only for the "blosc-*" presets (the codec chain written by the library).
    Printed to show what a custom reader would buy; the library reads through zarr.
    """
    from concurrent.futures import ThreadPoolExecutor

    import google_crc32c
    import numcodecs.blosc

    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    manifest = attrs["chunk_manifest"]
    _, _, width, height = attrs["bbox"]
    outs: dict[str, np.ndarray] = {}
    jobs = []
    for plane, dtype in (("image", np.float32), ("mask", np.int32), ("variance", np.float32)):
        out = outs[plane] = np.empty((height, width), dtype)
        (cy, cx), (gy, gx) = manifest[plane]["chunks"], manifest[plane]["grid"]
        jobs += [(plane, out, iy, ix, cy, cx) for iy in range(gy) for ix in range(gx)]

    def one(job: tuple) -> None:
        plane, out, iy, ix, cy, cx = job
        raw = (path / plane / "c" / str(iy) / str(ix)).read_bytes()
        payload = np.frombuffer(raw, np.uint8)[:-4]
        if google_crc32c.value(payload) != int.from_bytes(raw[-4:], "little"):
            raise ValueError(f"checksum mismatch in {plane}/c/{iy}/{ix}")
        tile = np.empty((cy, cx), out.dtype)
        numcodecs.blosc.decompress(payload, tile)
        rows, cols = slice(iy * cy, min((iy + 1) * cy, height)), slice(ix * cx, min((ix + 1) * cx, width))
        out[rows, cols] = tile[: rows.stop - rows.start, : cols.stop - cols.start]

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, jobs))
    return outs


# --------------------------------------------------------------------------- one case (subprocess)
def run_case(case: str, workdir: Path, size: int, repeat: int) -> dict:
    from astropy.io import fits

    from butler import Box
    from butler.formats import read_exposure_fits, read_exposure_zarr, write_exposure_fits, write_exposure_zarr

    exposure = make_exposure(size)
    baseline = peak_rss_mb()
    out = workdir / f"{case}.out"
    sub = Box(size // 2 - 256, size // 2 - 256, 512, 512)

    def clean() -> None:
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()

    result: dict = {"case": case}
    if case.startswith(("zarr:", "zarr-direct:")):
        codec = case.split(":", 1)[1]

        def write(fsync: bool) -> None:
            clean()
            write_exposure_zarr(exposure, out, codec=codec, fsync=fsync)

        read = lambda: read_exposure_zarr(out)  # noqa: E731
        read_sub = lambda: read_exposure_zarr(out, bbox=sub)  # noqa: E731
        if case.startswith("zarr-direct:"):
            read = lambda: direct_zarr_read(out)  # noqa: E731
    elif case == "fits":

        def write(fsync: bool) -> None:
            clean()
            write_exposure_fits(exposure, out, fsync=fsync)

        read = lambda: read_exposure_fits(out)  # noqa: E731
        read_sub = lambda: read_exposure_fits(out, bbox=sub)  # noqa: E731
    elif case == "astropy-mef":

        def write(fsync: bool) -> None:
            clean()
            hdus = fits.HDUList(
                [fits.PrimaryHDU(), fits.ImageHDU(exposure.image, name="IMAGE"),
                 fits.ImageHDU(exposure.mask, name="MASK"), fits.ImageHDU(exposure.variance, name="VARIANCE")]
            )
            hdus.writeto(out)
            if fsync:
                fd = os.open(out, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)

        def read() -> list:
            with fits.open(out, memmap=False) as hdul:
                return [hdul[i].data for i in (1, 2, 3)]

        def read_sub() -> list:
            with fits.open(out, memmap=True) as hdul:
                rows, cols = sub.slices()
                return [np.array(hdul[i].section[rows, cols]) for i in (1, 2, 3)]
    else:
        raise SystemExit(f"unknown case {case}")

    result["write_s"] = median_time(lambda: write(False), repeat)
    result["write_durable_s"] = median_time(lambda: write(True), max(2, repeat // 2))
    result["bytes"] = du(out)
    read()  # warm the page cache
    result["read_s"] = median_time(read, repeat)
    result["read_sub_s"] = median_time(read_sub, repeat * 4)

    def cold_read() -> None:
        drop_from_page_cache(out)
        start = time.perf_counter()
        read()
        cold.append(time.perf_counter() - start)

    cold: list[float] = []
    for _ in range(max(3, repeat // 2)):
        cold_read()
    result["read_cold_s"] = min(cold) if STAT == "min" else statistics.median(cold)
    if not case.startswith("astropy"):
        back = read()
        if isinstance(back, dict):
            from butler import Exposure

            back = Exposure(back["image"], back["mask"], back["variance"])
        assert np.array_equal(back.image, exposure.image) and np.array_equal(back.mask, exposure.mask)
        assert np.array_equal(back.variance, exposure.variance)
    result["peak_rss_mb"] = peak_rss_mb()
    result["baseline_rss_mb"] = baseline
    clean()
    return result


# --------------------------------------------------------------------------- catalogs
def bench_catalogs(workdir: Path, n_rows: int, repeat: int) -> list[dict]:
    from astropy.table import Table

    from butler import make_source_catalog
    from butler.formats import read_catalog_parquet, write_catalog_parquet

    columns = ("xErr", "yErr", "psfFlux", "psfFluxErr", "apFlux", "apFluxErr", "ixx", "iyy", "ixy", "snr",
               "isNegative", "isDipole", "parent", "pixelFlags_edge", "pixelFlags_saturated", "psfFlux_flag")
    table = make_source_catalog(n_rows, columns=columns, meta={"apRadius": 5.0})
    rng = np.random.default_rng(3)
    for name in table.colnames:
        kind = table[name].dtype.kind
        if kind == "f":
            table[name] = rng.normal(size=n_rows).astype(table[name].dtype)
        elif kind == "b":
            table[name] = rng.random(n_rows) < 0.05
    table["id"] = np.arange(n_rows, dtype=np.int64)
    rows = []
    ours = workdir / "cat.parquet"
    theirs = workdir / "cat_astropy.parquet"

    def w_ours() -> None:
        if ours.exists():
            ours.unlink()
        write_catalog_parquet(table, ours, fsync=False)

    def w_theirs() -> None:
        table.write(theirs, format="parquet", overwrite=True)

    rows.append({"case": "pyarrow direct (ours)", "write_s": median_time(w_ours, repeat),
                 "read_s": median_time(lambda: read_catalog_parquet(ours), repeat), "bytes": ours.stat().st_size})
    try:
        theirs_read = median_time(lambda: Table.read(theirs, format="parquet"), repeat)
    except ImportError:  # astropy's Parquet reader needs pandas
        theirs_read = float("nan")
    rows.append({"case": "astropy Table.write", "write_s": median_time(w_theirs, repeat),
                 "read_s": theirs_read, "bytes": theirs.stat().st_size})
    return rows


# --------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cases", default="astropy-mef,fits,zarr:blosc-lz4,zarr:blosc-zstd,zarr:zstd,zarr:none,"
                        "zarr-direct:blosc-lz4",
                        help="comma-separated exposure cases")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="statistic over the repeats (min is robust on a busy machine)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    global STAT
    STAT = args.stat
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.workdir), args.size, args.repeat)))
        return

    import zarr

    cases = [case for case in args.cases.split(",") if case]
    mbytes = args.size * args.size * 12 / 1e6
    print(f"# Exposure formats: {args.size}x{args.size} image+mask+variance = {mbytes:.0f} MB in memory; "
          f"{os.cpu_count()} CPUs; zarr {zarr.__version__}; {args.stat} of {args.repeat} runs; "
          f"load average {os.getloadavg()[0]:.2f}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_formats_") as tmp:
        for case in cases:
            proc = subprocess.run(
                [sys.executable, __file__, "--case", case, "--workdir", tmp, "--size", str(args.size),
                 "--repeat", str(args.repeat), "--stat", args.stat],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                print(f"{case}: FAILED\n{proc.stderr}")
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        header = (f"{'format':22s} {'write s':>8s} {'MB/s':>6s} {'durable s':>9s} {'read s':>7s} {'MB/s':>6s} "
                  f"{'cold read s':>11s} {'disk MB':>8s} {'ratio':>6s} {'512² read ms':>12s} {'peak RSS MB':>11s}")
        print(header)
        print("-" * len(header))
        for r in results:
            print(f"{r['case']:22s} {r['write_s']:8.3f} {mbytes / r['write_s']:6.0f} {r['write_durable_s']:9.3f} "
                  f"{r['read_s']:7.3f} {mbytes / r['read_s']:6.0f} {r['read_cold_s']:11.3f} {r['bytes'] / 1e6:8.1f} "
                  f"{mbytes * 1e6 / r['bytes']:6.2f} {r['read_sub_s'] * 1e3:12.2f} {r['peak_rss_mb']:11.0f}")
        if any(r["case"].startswith("zarr-direct") for r in results):
            print("(zarr-direct: what-if row, the library's files read by a custom chunk decoder instead of "
                  "zarr-python; its 512² column still uses the library)")
        if results:
            print(f"(peak RSS includes the in-memory input exposure; the process holding just it peaked at "
                  f"~{results[0]['baseline_rss_mb']:.0f} MB)")
        by_case = {r["case"]: r for r in results}
        for ref_name in ("astropy-mef", "fits"):
            ref = by_case.get(ref_name)
            if not ref:
                continue
            print(f"\nZarr relative to {ref_name} (target: <= 1.5x time, < 1x disk):")
            for r in results:
                if r["case"].startswith("zarr"):
                    print(f"  {r['case']:22s} write {r['write_s'] / ref['write_s']:.2f}x "
                          f"(durable {r['write_durable_s'] / ref['write_durable_s']:.2f}x), "
                          f"read {r['read_s'] / ref['read_s']:.2f}x (cold {r['read_cold_s'] / ref['read_cold_s']:.2f}x), "
                          f"disk {r['bytes'] / ref['bytes']:.2f}x, 512² read {r['read_sub_s'] / ref['read_sub_s']:.2f}x")

        if args.rows <= 0:
            return
        print(f"\n# Catalogs: {args.rows:,} rows x 21 columns (float32/64, int64, bool), {args.stat} of {args.repeat}")
        for r in bench_catalogs(Path(tmp), args.rows, args.repeat):
            read = "n/a (needs pandas)" if r["read_s"] != r["read_s"] else f"{r['read_s']:.3f} s"
            print(f"{r['case']:24s} write {r['write_s']:.3f} s  read {read:>18s}  {r['bytes'] / 1e6:6.1f} MB")
    print(f"driver peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
