"""Benchmark: image subtraction (subtractImages + detectAndMeasure) on simulated and real pixels, with sfft.

**Simulated pairs** (:func:`tasks.diffim.testing.make_simulated_pair`: a science visit and a template
rendered on the same pixel grid, with truth):

- ``4096``: the ``large`` preset's geometry (detector 4, 4096x4096, science FWHM ~5.2 px, template
  ~3.1 px);
- ``2048``: the same preset on 2048x2048 detectors (same densities);
- ``2048-sci-sharper``: template seeing 0.85-0.95", science 0.60-0.65" (the science image is
  convolved);
- ``2048-varying-psf``, ``4096-varying-psf``: corner detector 0 with ``psf_variation=0.35``
  (science FWHM 4.8-6.3 px and template 2.9-4.2 px across the detector);
- ``4096-transients``: the 4096 pair with four times the transients, peak magnitudes 21.5-23.5,
  for completeness statistics at S/N 5-10 (the others hold 8-40 such transients each; the
  pooled numbers of all cases are printed too).

For each pair three subtractions are scored with the same tools
(:func:`~tasks.diffim.testing.residual_statistics`, :func:`~tasks.diffim.testing.transient_recovery`):

- **ours**: ``ImageDifferenceTask.run`` + ``DetectAndMeasureTask.run`` with default configs, each
  run in a fresh subprocess set up as a pipeline worker (one BLAS thread) that reads the inputs from
  FITS/Parquet files first; wall and CPU time of the two calls, the process's peak RSS
  (``ru_maxrss``, inputs included) and its RSS after reading the inputs.  On the 4096 and 2048 pairs
  ``--repeat`` runs each with ``fftWorkers`` 1 (the default) and 2 (``--fft-workers``), interleaved;
  the results do not depend on it;
- **true kernel**: the same tasks with the kernel fitted by ``makeKernel`` replaced by the
  simulator's true kernel and differential background
  (:func:`~tasks.diffim.testing.subtract_with_true_kernel`): what a perfect kernel gives on the
  same noise;
- **sfft** 1.7.3 (PyPI, CPU backend ``Numpy``: ``GeneralSFFTSubtract`` with a polynomial kernel
  of order 2, background order 1, constant photometric ratio, kernel half-width ``2 x FWHM`` as in
  sfft's automatic setup; the masked images zero the SAT/BAD/NO_DATA/CR pixels of either image,
  grown by the kernel half-width, as sfft's crowded-field preprocessing does with saturated
  stars), then sfft's own noise decorrelation (``DeCorrelation_Calculator`` with the kernel at the
  centre and the sky sigmas from ``SkyLevel_Estimator``).  It runs in a subprocess with an address
  space limit (``--sfft-memory-gib``, 20 GiB) and a time limit (``--sfft-timeout``); a crash or an
  out-of-memory is reported, not fatal.  Its difference gets a variance plane propagated exactly as
  ours (``V_u (x) phi^2 + V_c (x) (phi (x) K)^2`` with sfft's central kernel ``K`` and
  decorrelation kernel ``phi``), a mask grown by its kernel, the decorrelated PSF, and is measured
  by our ``DetectAndMeasureTask``: the same yardstick for both.

Quality numbers: ``difference / sqrt(variance)`` std on blank sky (target [0.98, 1.02]) and within
2 FWHM of bright isolated non-variable stars (<= 1.03); kernel sum against the true photometric
scale (within 1%); transient completeness at S/N >= 10 (>= 95%) and at S/N 5-10 (within 2 points
of the true-kernel subtraction); false positives on blank sky (0) and overall (<= 2 per 4096^2),
beside the number detectAndMeasure finds in white Gaussian noise alone with the difference's
variance, mask and PSF ("FP noise", mean of 4 realizations: the floor any subtraction has);
median PSF-flux bias of recovered S/N >= 10 transients (within 2%).  Time and memory targets:
<= 10 s wall and <= 2 GiB peak for subtraction plus detection of one 4096x4096 pair.

**Real pixels** (``--realdata``, on by default; ``../shared/realdata``, see its README.md): the
DECam i-band 256x256 cutouts (pairs OBS18x template / OBS04x science) and the JWST NIRCam F200W
900x900 pair are ingested into a temporary repository with ``Butler.ingest``, read back, prepared
with :func:`tasks.diffim.external.prepare_external_exposure` (DECam: variance from the sky and the
gain, SAT from ``SATURATE``, a PSF from the stars or the ``FWHM`` keyword; NIRCam: variance from the
noise maps, PSF = the WebbPSF model cropped to 51x51 px), subtracted and measured through the
tasks' ``run`` methods.  Reported, on the pixels usable in every method's difference: the std of
``difference / sqrt(variance)`` on source-free pixels (no 5-sigma source footprint of either input
within 2 FWHM; the variance is the one propagated from the inputs) and its robust (IQR) version;
the same std within 2 FWHM of the science image's unsaturated S/N > 30 sources (where a wrong
kernel shows: 1 for a perfect one); the kernel sum; the DIA source counts; and the blank-sky std
of the detection S/N image (1 for white noise; resampled real images have correlated noise).
sfft runs on the same prepared pairs (NIRCam: its example's setup -- cross-convolution
with the other image's WebbPSF, kernel half-width 11, background order 0; B-spline kernels need a
GPU, so a polynomial order-2 kernel; DECam: kernel and background order 0 on 256x256 cutouts) and
is scored the same way.  A PNG of science / template / difference(s) per pair goes to ``--outdir``.

Usage::

    python benchmarks/bench_diffim.py [--cases 4096 2048 ...] [--repeat 3] [--no-sfft] [--no-realdata]
        [--sfft-cases 2048 ...] [--outdir DIR] [--fft-workers 1 2]

Run it with an interpreter that has sfft (``make bench`` installs the ``bench`` extra); without
sfft its columns say so.  Timings on a shared machine are noisy: compare numbers of one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from astropy.utils import iers  # noqa: E402

iers.conf.auto_download = False

from astropy.io import fits  # noqa: E402
from astropy.table import Table  # noqa: E402
from scipy import ndimage  # noqa: E402

from butler.exposure import Exposure  # noqa: E402
from butler.formats.fits_exposure import read_exposure_fits, write_exposure_fits  # noqa: E402
from butler.formats.parquet_catalog import read_catalog_parquet, write_catalog_parquet  # noqa: E402
from butler.masks import add_plane  # noqa: E402
from butler.psf import ImagePsf  # noqa: E402
from tasks.diffim import (  # noqa: E402
    DetectAndMeasureConfig,
    DetectAndMeasureTask,
    ImageDifferenceConfig,
    ImageDifferenceTask,
)
from tasks.diffim.decorrelate import convolve_kernels, trim_kernel  # noqa: E402
from tasks.diffim.difference_psf import convolved_psf  # noqa: E402
from tasks.diffim.detect_measure import significance_image  # noqa: E402
from tasks.diffim.make_kernel import psf_fwhm_over_box  # noqa: E402
from tasks.diffim.testing import (  # noqa: E402
    SimulatedPair,
    make_simulated_pair,
    residual_statistics,
    subtract_with_true_kernel,
    transient_recovery,
)
from tasks.diffim.utils import convolve_constant, robust_std  # noqa: E402
from tasks.psfmatch import grow_mask  # noqa: E402
from tasks.simulation import get_preset  # noqa: E402

# ------------------------------------------------------------------------------------ targets
WALL_TARGET_S = 10.0
PEAK_TARGET_GIB = 2.0
BLANK_RANGE = (0.98, 1.02)
NEAR_STAR_MAX = 1.03
KERNEL_SUM_TOLERANCE = 0.01
COMPLETENESS_BRIGHT_MIN = 0.95
COMPLETENESS_FAINT_POINTS = 2.0
#: Fewest S/N 5-10 transients for a case's own completeness verdict: with fewer, one transient is
#: more than the 2-point margin, and only the pooled number is judged.
MIN_FAINT_TRANSIENTS = 100
FALSE_POSITIVES_PER_4096 = 2.0
FLUX_BIAS_MAX = 0.02
GIB = 2.0**30
MIB = 2.0**20

#: Mask planes whose pixels sfft's masked images set to zero (grown by the kernel half-width).
SFFT_MASKED_PLANES = ("SAT", "BAD", "NO_DATA", "CR")

REALDATA = ROOT.parent / "shared" / "realdata"
DECAM_PAIRS = (("18a", "04a"), ("18b", "04b"), ("18c", "04c"), ("18d", "04d"), ("18e", "04e"))
NIRCAM_REF = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"
NIRCAM_SCI = "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"
NIRCAM_PSF_SIZE = 51


@dataclass(frozen=True)
class Case:
    """One simulated pair: a preset variant, a detector and whether sfft runs on it by default."""

    name: str
    size: int
    overrides: dict[str, Any] = field(default_factory=dict)
    detector: int | None = None
    description: str = ""


CASES = {
    "4096": Case("4096", 4096, description="large preset, detector 4"),
    "2048": Case("2048", 2048, description="large preset densities on 2048x2048"),
    "2048-sci-sharper": Case(
        "2048-sci-sharper", 2048, {"seeing_template": (0.85, 0.95), "seeing_science": (0.6, 0.65)},
        description="science PSF narrower than the template's",
    ),
    "2048-varying-psf": Case(
        "2048-varying-psf", 2048, {"psf_variation": 0.35, "detector_ids": (0,)}, detector=0,
        description="corner detector, psf_variation 0.35",
    ),
    "4096-varying-psf": Case(
        "4096-varying-psf", 4096, {"psf_variation": 0.35, "detector_ids": (0,)}, detector=0,
        description="corner detector, psf_variation 0.35",
    ),
    "4096-transients": Case(
        "4096-transients", 4096, {"transient_density": 22000.0, "transient_mag_range": (21.5, 23.5)},
        description="4x the transients, peak mag 21.5-23.5: S/N 5-10 statistics",
    ),
}


def mark(ok: bool | None) -> str:
    """PASS / MISS (or n/a)."""
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def fmt(value: Any, spec: str) -> str:
    """Format a number, ``-`` for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


# ------------------------------------------------------------------------------------ files
def write_inputs(folder: Path, template: Exposure, science: Exposure, sources: Table) -> None:
    """The inputs of one subtraction, as the child processes read them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_exposure_fits(template, folder / "template.fits", overwrite=True, fsync=False)
    write_exposure_fits(science, folder / "science.fits", overwrite=True, fsync=False)
    write_catalog_parquet(sources, folder / "src.parquet")


def _rss_now() -> float:
    """Current resident set size, bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> float:
    """Peak resident set size of this process so far, bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


# ------------------------------------------------------------------------------------ workers
def ours_worker(folder: Path, spec: dict[str, Any]) -> None:
    """Child process: read the inputs, subtract and detect once (timed), write the results.

    The process is set up as a pipeline worker is (:func:`pipeline.executors.hygiene.configure_worker`:
    one BLAS thread); ``spec["fft_workers"]`` sets the tasks' ``fftWorkers``.
    """
    from pipeline.executors.hygiene import configure_worker

    configure_worker()
    template = read_exposure_fits(folder / "template.fits", require_wcs=False)
    science = read_exposure_fits(folder / "science.fits", require_wcs=False)
    sources = read_catalog_parquet(folder / "src.parquet")
    rss_inputs = _rss_now()
    cfg = ImageDifferenceConfig()
    dcfg = DetectAndMeasureConfig()
    if spec.get("fft_workers"):
        cfg.fftWorkers = dcfg.fftWorkers = cfg.makeKernel.fftWorkers = int(spec["fft_workers"])
    task = ImageDifferenceTask(config=cfg)
    detect = DetectAndMeasureTask(config=dcfg)
    t0, c0 = time.perf_counter(), time.process_time()
    result = task.run(template, science, sources)
    t1 = time.perf_counter()
    measured = detect.run(science, result.matchedExposure, result.subtractedExposure)
    t2, c2 = time.perf_counter(), time.process_time()
    peak = _peak_rss()
    stages = {k[: -len("Duration")]: float(v) for k, v in task.metadata.items() if k.endswith("Duration")}
    kmd = task.makeKernel.metadata
    out = {
        "wall_subtract": t1 - t0,
        "wall_detect": t2 - t1,
        "cpu": (c2 - c0),
        "peak_rss": peak,
        "rss_inputs": rss_inputs,
        "stages": stages,
        "kernel_sum": float(kmd.get("kernelSumCentre", float("nan"))),
        "kernel_size": int(kmd.get("kernelSize", 0)),
        "spatial_order": int(kmd.get("spatialKernelOrder", -1)),
        "n_used": int(kmd.get("n_used", 0)),
        "convolved": task.metadata["convolvedImage"],
        "n_dia": len(measured.diaSources),
        "snr_std_blank": float(detect.metadata.get("snrStdBlankSky", float("nan"))),
    }
    if spec.get("write"):
        write_exposure_fits(result.subtractedExposure, folder / "ours_difference.fits", overwrite=True, fsync=False)
        write_catalog_parquet(measured.diaSources, folder / "ours_diaSrc.parquet")
    (folder / f"ours_result{spec.get('tag', '')}.json").write_text(json.dumps(out))


def sfft_worker(folder: Path, spec: dict[str, Any]) -> None:
    """Child process: sfft's CPU subtraction and decorrelation of the pair in ``folder``.

    Mirrors ``sfft.CustomizedPacket.Customized_Packet.CP`` (arrays in sfft's transposed frame,
    ``ForceConv`` side, sign flip) without its FITS round trip, so that the function compilation
    (``SingleSFFTConfigure.SSC``) and the subtraction are timed separately.
    """
    from scipy.signal import fftconvolve
    from sfft.sfftcore.SFFTConfigure import SingleSFFTConfigure
    from sfft.sfftcore.SFFTSubtract import GeneralSFFTSubtract
    from sfft.utils.DeCorrelationCalculator import DeCorrelation_Calculator
    from sfft.utils.SFFTSolutionReader import Realize_FluxScaling, Realize_MatchingKernel
    from sfft.utils.SkyLevelEstimator import SkyLevel_Estimator

    template = read_exposure_fits(folder / "template.fits", require_wcs=False)
    science = read_exposure_fits(folder / "science.fits", require_wcs=False)
    cross = {}
    if spec.get("cross_psf"):
        cross = {name: fits.getdata(path).astype(np.float64) for name, path in spec["cross_psf"].items()}
    rss_inputs = _rss_now()
    threads = int(spec.get("threads", 2))
    kerhw = int(spec["kerhw"])
    conv = spec["conv"]
    t0, c0 = time.perf_counter(), time.process_time()
    ref = template.image.astype(np.float64)
    sci = science.image.astype(np.float64)
    if cross:
        # sfft's NIRCam example: REF (x) PSF_SCI and SCI (x) PSF_REF first (normalized kernels)
        ref = fftconvolve(np.nan_to_num(ref), cross["science"] / cross["science"].sum(), mode="same")
        sci = fftconvolve(np.nan_to_num(sci), cross["template"] / cross["template"].sum(), mode="same")
    bad = ~np.isfinite(ref) | ~np.isfinite(sci)
    for exp in (template, science):
        bits = exp.get_plane_bitmask([p for p in SFFT_MASKED_PLANES if p in exp.mask_planes])
        if bits:
            bad |= (exp.mask & bits) != 0
    bad = ndimage.binary_dilation(bad, iterations=kerhw) if bad.any() else bad
    nan_union = ~np.isfinite(ref) | ~np.isfinite(sci)
    masked_ref = np.where(bad, 0.0, np.nan_to_num(ref))
    masked_sci = np.where(bad, 0.0, np.nan_to_num(sci))
    ref_t = np.ascontiguousarray(np.where(nan_union, masked_ref, ref).T)
    sci_t = np.ascontiguousarray(np.where(nan_union, masked_sci, sci).T)
    mref_t = np.ascontiguousarray(masked_ref.T)
    msci_t = np.ascontiguousarray(masked_sci.T)
    if conv == "REF":
        pix_i, pix_j, pix_mi, pix_mj = ref_t, sci_t, mref_t, msci_t
    else:
        pix_i, pix_j, pix_mi, pix_mj = sci_t, ref_t, msci_t, mref_t
    t_conf0 = time.perf_counter()
    config = SingleSFFTConfigure.SSC(
        NX=pix_i.shape[0], NY=pix_i.shape[1], KerHW=kerhw, KerPolyOrder=int(spec["ker_order"]),
        BGPolyOrder=int(spec["bg_order"]), ConstPhotRatio=True, BACKEND_4SUBTRACT="Numpy",
        NUM_CPU_THREADS_4SUBTRACT=threads, NUMBA_CACHE=True, VERBOSE_LEVEL=0,
    )
    t_conf = time.perf_counter() - t_conf0
    solution, diff_t = GeneralSFFTSubtract.GSS(
        PixA_I=pix_i, PixA_J=pix_j, PixA_mI=pix_mi, PixA_mJ=pix_mj, SFFTConfig=config, ContamMask_I=None,
        BACKEND_4SUBTRACT="Numpy", NUM_CPU_THREADS_4SUBTRACT=threads, VERBOSE_LEVEL=0,
    )[:2]
    if conv == "SCI":
        diff_t = -diff_t
    c = config[0]
    n0, n1 = int(c["N0"]), int(c["N1"])
    args = {"Solution": solution, "N0": n0, "N1": n1, "L0": int(c["L0"]), "L1": int(c["L1"]), "DK": int(c["DK"]), "Fpq": int(c["Fpq"])}
    # sfft's coordinates: (x + 1, y + 1) in its transposed frame, i.e. numpy (column + 1, row + 1)
    centre = np.array([[0.5 * (n0 - 1) + 1.0, 0.5 * (n1 - 1) + 1.0]])
    kernel_centre_t = Realize_MatchingKernel(XY_q=centre).FromArray(**args)[0]
    flux_scale = float(Realize_FluxScaling(XY_q=centre).FromArray(**args)[0])
    sky_ref = float(SkyLevel_Estimator.SLE(PixA_obj=np.nan_to_num(template.image.astype(np.float64)).T)[1])
    sky_sci = float(SkyLevel_Estimator.SLE(PixA_obj=np.nan_to_num(science.image.astype(np.float64)).T)[1])
    sig_i, sig_j = (sky_ref, sky_sci) if conv == "REF" else (sky_sci, sky_ref)
    mk_j, mk_i = None, None
    if cross:
        # J was convolved with the PSF of I's image and vice versa (sfft's frame: transposed)
        psf_j = cross["template"] if conv == "REF" else cross["science"]
        psf_i = cross["science"] if conv == "REF" else cross["template"]
        mk_j, mk_i = (psf_j / psf_j.sum()).T, (psf_i / psf_i.sum()).T
    dc_t = DeCorrelation_Calculator.DCC(
        MK_JLst=[mk_j], SkySig_JLst=[sig_j], MK_ILst=[mk_i], SkySig_ILst=[sig_i], MK_Fin=kernel_centre_t,
        KERatio=2.0, VERBOSE_LEVEL=0,
    )
    diff = np.ascontiguousarray(diff_t.T)
    dc = np.ascontiguousarray(dc_t.T)
    finite = np.isfinite(diff)
    decorrelated = fftconvolve(np.where(finite, diff, 0.0), dc, mode="same")
    decorrelated[~finite] = np.nan
    t1, c1 = time.perf_counter(), time.process_time()
    peak = _peak_rss()
    np.save(folder / "sfft_difference.npy", decorrelated.astype(np.float32))
    np.save(folder / "sfft_kernel_centre.npy", np.ascontiguousarray(kernel_centre_t.T))
    np.save(folder / "sfft_decorrelation.npy", dc)
    out = {
        "wall": t1 - t0,
        "wall_configure": t_conf,
        "cpu": c1 - c0,
        "peak_rss": peak,
        "rss_inputs": rss_inputs,
        "kernel_sum": flux_scale,
        "sky_ref": sky_ref,
        "sky_sci": sky_sci,
    }
    (folder / "sfft_result.json").write_text(json.dumps(out))


def run_child(kind: str, folder: Path, spec: dict[str, Any], *, memory_gib: float | None = None,
              timeout: float | None = None, python: str | None = None) -> dict[str, Any]:
    """Run a worker in a fresh interpreter; returns its result dict or ``{"error": ...}``."""
    spec_path = folder / f"{kind}_spec{spec.get('tag', '')}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(folder), str(spec_path)]

    def limits() -> None:
        os.setsid()
        if memory_gib:
            limit = int(memory_gib * GIB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limits, env=env, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return {"error": f"timeout after {timeout:.0f} s"}
    elapsed = time.perf_counter() - start
    result_path = folder / (f"{kind}_result{spec.get('tag', '')}.json")
    if proc.returncode != 0 or not result_path.exists():
        tail = (stderr or "").strip().splitlines()[-3:]
        reason = "MemoryError (address-space limit)" if "MemoryError" in (stderr or "") else f"exit {proc.returncode}"
        return {"error": f"{reason}: {' | '.join(tail)[-300:]}", "elapsed": elapsed}
    out = json.loads(result_path.read_text())
    result_path.unlink()
    out["process_elapsed"] = elapsed
    return out


# ------------------------------------------------------------------------------------ sfft output
def sfft_difference_exposure(
    folder: Path, res: dict[str, Any], template: Exposure, science: Exposure, conv: str,
    cross_psfs: tuple[np.ndarray, np.ndarray] | None = None,
) -> Exposure:
    """sfft's decorrelated difference with a propagated variance, a grown mask and its PSF.

    ``D = U (x) A - C (x) B`` (sign so that science transients are positive; divided by the kernel
    sum when the science image was convolved) with ``A = phi`` and ``B = K (x) phi`` -- or, after
    cross-convolution, ``A = P_C (x) phi`` and ``B = P_U (x) K (x) phi``: the variance is
    ``V_U (x) A^2 + V_C (x) B^2``, the PSF ``P_U (x) A`` (for ``C`` = template).
    """
    diff = np.load(folder / "sfft_difference.npy")
    kernel = np.load(folder / "sfft_kernel_centre.npy")
    phi = trim_kernel(np.load(folder / "sfft_decorrelation.npy"), 1e-5)
    unconv, convd = (science, template) if conv == "REF" else (template, science)
    a = phi
    b = convolve_kernels(phi, kernel)
    if cross_psfs is not None:
        p_t, p_s = cross_psfs
        p_u, p_c = (p_s, p_t) if conv == "REF" else (p_t, p_s)
        a = convolve_kernels(trim_kernel(p_c / p_c.sum(), 1e-4), phi)
        b = convolve_kernels(trim_kernel(p_u / p_u.sum(), 1e-4), b)
    scale = 1.0
    if conv == "SCI":
        scale = 1.0 / res["kernel_sum"]
    vu = np.nan_to_num(unconv.variance).astype(np.float32)
    vc = np.nan_to_num(convd.variance).astype(np.float32)
    variance = convolve_constant(vu, a**2) + convolve_constant(vc, b**2)
    variance *= np.float32(scale**2)
    image = (diff * np.float32(scale)).astype(np.float32)
    planes = dict(science.mask_planes)
    for name in template.mask_planes:
        add_plane(planes, name)
    edge = 1 << add_plane(planes, "EDGE")
    no_data = 1 << add_plane(planes, "NO_DATA")
    ra = trim_kernel(a, 1e-3).shape[0] // 2
    rb = trim_kernel(b, 1e-3).shape[0] // 2

    def remap(exp: Exposure) -> np.ndarray:
        out = np.zeros(exp.shape, np.int32)
        for name, bit in exp.mask_planes.items():
            if name in ("DETECTED", "DETECTED_NEGATIVE"):
                continue
            hit = (exp.mask & (1 << bit)) != 0
            if hit.any():
                out[hit] |= np.int32(1 << planes[name])
        return out

    mask = grow_mask(remap(unconv), (-ra, ra, -ra, ra)) | grow_mask(remap(convd), (-rb, rb, -rb, rb))
    mask[:rb, :] |= edge
    mask[-rb:, :] |= edge
    mask[:, :rb] |= edge
    mask[:, -rb:] |= edge
    bad = ~np.isfinite(image)
    if bad.any():
        mask |= np.where(grow_mask(bad.astype(np.int32), (-rb, rb, -rb, rb)) != 0, np.int32(no_data), np.int32(0))
        image[(mask & no_data) != 0] = np.nan
        variance[(mask & no_data) != 0] = np.nan
    bbox = science.bbox
    psf = convolved_psf(unconv.psf, a, bbox)
    return Exposure(image, mask, variance, xy0=science.xy0, wcs=science.wcs, psf=psf, photo_calib=science.photo_calib,
                    visit_info=science.visit_info, band=science.band, mask_planes=planes)


def sfft_kernel_half_width(template: Exposure, science: Exposure) -> int:
    """sfft's automatic half-width: 2 x the larger FWHM, clipped to [2, 20] (``KerHWRatio``, ``KerHWLimit``)."""
    fwhm = max(psf_fwhm_over_box(template.psf, science.bbox), psf_fwhm_over_box(science.psf, science.bbox))
    return int(np.clip(round(2.0 * fwhm), 2, 20))


# ------------------------------------------------------------------------------------ scoring
def score_simulated(pair: SimulatedPair, difference: Exposure, dia: Table, kernel_sum: float, convolved: str) -> dict[str, Any]:
    """Quality numbers of one subtraction of a simulated pair."""
    rs = residual_statistics(difference, pair)
    tr = transient_recovery(dia, pair, difference)
    expected = pair.true_scale if convolved == "template" else 1.0 / pair.true_scale
    area = float(difference.width * difference.height)
    fp = tr["false_positives"]
    return {
        "blank": rs["blank_std"],
        "near": rs["near_star_std"],
        "n_stars": rs["n_bright_stars"],
        "kernel_sum": kernel_sum,
        "kernel_sum_err": kernel_sum / expected - 1.0,
        "c10": tr["completeness"]["10-inf"],
        "c5": tr["completeness"]["5-10"],
        "n10": tr["n_expected"]["10-inf"],
        "n5": tr["n_expected"]["5-10"],
        "fp": fp,
        "fp_blank": tr["false_positives_blank"],
        "fp_4096": fp * 4096.0**2 / area,
        "flux_bias": tr["flux_ratio_median"] - 1.0,
        "n_dia": tr["n_dia"],
    }


def noise_only_detections(difference: Exposure, realizations: int = 4, seed: int = 1) -> float:
    """Mean number of DIA sources detectAndMeasure finds in white Gaussian noise alone.

    The noise has the difference's variance plane, mask, PSF and size: it is the false-positive
    count a perfect subtraction still gives at the detection threshold (a 5-sigma matched filter
    over ~10^7 pixels expects a few noise peaks), the floor of "false positives on blank sky".
    """
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(np.maximum(np.nan_to_num(difference.variance), 0.0)).astype(np.float32)
    counts = []
    for _ in range(realizations):
        noise = rng.standard_normal(difference.shape, dtype=np.float32) * sigma
        exposure = Exposure(
            noise, difference.mask, difference.variance, xy0=difference.xy0, psf=difference.psf,
            photo_calib=difference.photo_calib, mask_planes=difference.mask_planes,
        )
        counts.append(len(DetectAndMeasureTask().run(None, None, exposure).diaSources))
    return float(np.mean(counts))


def simulate_case(case: Case) -> SimulatedPair:
    cfg = replace(get_preset("large"), detector_size=case.size, **case.overrides)
    return make_simulated_pair(cfg, detector=case.detector)


def run_simulated_case(case: Case, args: argparse.Namespace, workdir: Path, repeat: int, with_sfft: bool) -> dict[str, Any]:
    """Simulate, run ours (``repeat`` fresh processes), the true kernel and sfft; score them all."""
    t0 = time.perf_counter()
    pair = simulate_case(case)
    folder = workdir / case.name
    write_inputs(folder, pair.template, pair.science, pair.sources)
    print(f"[{case.name}] simulated {pair.science.shape} ({case.description}): science FWHM "
          f"{psf_fwhm_over_box(pair.science.psf, pair.science.bbox):.2f} px, template "
          f"{psf_fwhm_over_box(pair.template.psf, pair.science.bbox):.2f} px, true scale {pair.true_scale:.4f}, "
          f"{len(pair.sources)} src, {len(pair.truth_transients)} truth transients/variables "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    out: dict[str, Any] = {"case": case, "pair": pair}
    variants = list(args.fft_workers) if repeat > 1 else list(args.fft_workers[:1])
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in variants}
    load = []
    for k in range(repeat):
        # variants interleaved, so that they share the machine's load
        for w in variants:
            spec = {"write": k == 0 and w == variants[0], "tag": f"_{k}_{w}", "fft_workers": w}
            load.append(os.getloadavg()[0])
            res = run_child("ours", folder, spec, timeout=args.ours_timeout)
            if "error" in res:
                print(f"[{case.name}] ours failed: {res['error']}", flush=True)
                out["ours_error"] = res["error"]
                return out
            runs[w].append(res)
    out["ours_runs"] = runs
    out["load"] = float(np.mean(load))
    first = runs[variants[0]][0]
    difference = read_exposure_fits(folder / "ours_difference.fits", require_wcs=False)
    dia = read_catalog_parquet(folder / "ours_diaSrc.parquet")
    out["ours"] = score_simulated(pair, difference, dia, first["kernel_sum"], first["convolved"])
    out["ours"]["fp_noise"] = noise_only_detections(difference)
    for w in variants:
        print(f"[{case.name}] ours (fftWorkers={w}): {len(runs[w])} run(s), median wall "
              f"{np.median([r['wall_subtract'] + r['wall_detect'] for r in runs[w]]):.2f} s", flush=True)

    res = subtract_with_true_kernel(pair)
    dia_true = DetectAndMeasureTask().run(pair.science, res.matchedExposure, res.subtractedExposure).diaSources
    convolved = res.convolvedImage
    ksum = float(res.psfMatchingKernel.kernel_sum(*pair.science.bbox.center))
    out["true"] = score_simulated(pair, res.subtractedExposure, dia_true, ksum, convolved)
    del res

    if with_sfft:
        conv = "REF" if convolved == "template" else "SCI"
        kerhw = sfft_kernel_half_width(pair.template, pair.science)
        spec = {"kerhw": kerhw, "conv": conv, "ker_order": 2, "bg_order": 1, "threads": args.sfft_threads}
        print(f"[{case.name}] sfft: ForceConv={conv}, KerHW={kerhw}, KerPolyOrder=2, BGPolyOrder=1 "
              f"(limits {args.sfft_memory_gib:g} GiB, {args.sfft_timeout:.0f} s)...", flush=True)
        res = run_child("sfft", folder, spec, memory_gib=args.sfft_memory_gib, timeout=args.sfft_timeout,
                        python=args.sfft_python)
        out["sfft_run"] = res
        if "error" not in res:
            diff = sfft_difference_exposure(folder, res, pair.template, pair.science, conv)
            dia_sfft = DetectAndMeasureTask().run(pair.science, None, diff).diaSources
            out["sfft"] = score_simulated(pair, diff, dia_sfft, res["kernel_sum"], convolved)
        else:
            print(f"[{case.name}] sfft failed: {res['error']}", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ printing
def print_timing_table(results: list[dict[str, Any]]) -> None:
    print()
    print("Time and memory: subtraction (ImageDifferenceTask.run) + detection (DetectAndMeasureTask.run), one fresh")
    print("process per run reading its inputs from files first; peak RSS of that process (inputs included).")
    print("ours/N: fftWorkers = N (BLAS: one thread, as in a pipeline worker).  Times are medians over the runs.")
    head = (f"{'case':18s} {'method':8s} {'runs':>4s} {'wall s':>7s} {'sub s':>6s} {'det s':>6s} {'cpu s':>6s} "
            f"{'peak MiB':>8s} {'inputs MiB':>10s}  targets (4096^2: <= {WALL_TARGET_S:g} s, <= {PEAK_TARGET_GIB:g} GiB)")
    print(head)
    print("-" * len(head))
    for r in results:
        case = r["case"]
        for workers, runs in (r.get("ours_runs") or {}).items():
            wall = np.array([x["wall_subtract"] + x["wall_detect"] for x in runs])
            k = int(np.argsort(wall)[len(wall) // 2])
            med = runs[k]
            peak = max(x["peak_rss"] for x in runs)
            target = ""
            if case.size >= 4096:
                target = (f"wall {mark(float(np.median(wall)) <= WALL_TARGET_S)}, "
                          f"peak {mark(peak <= PEAK_TARGET_GIB * GIB)}")
            method = f"ours/{workers}"
            print(f"{case.name:18s} {method:8s} {len(runs):4d} {np.median(wall):7.2f} {med['wall_subtract']:6.2f} "
                  f"{med['wall_detect']:6.2f} {med['cpu']:6.2f} {peak / MIB:8.0f} {med['rss_inputs'] / MIB:10.0f}  {target}")
            if len(runs) > 1:
                cpus = ", ".join(format(x["cpu"], ".2f") for x in runs)
                print(f"{'':18s} {'':8s} {'':4s} walls: {', '.join(f'{w:.2f}' for w in wall)}; cpu: {cpus}")
            stages = ", ".join(f"{k2} {v:.2f}" for k2, v in med["stages"].items() if k2 != "subtract")
            print(f"{'':18s} {'':8s} {'':4s} stages (s): {stages}; detect {med['wall_detect']:.2f}; kernel "
                  f"{med['kernel_size']} px, order {med['spatial_order']}, {med['n_used']} candidates")
        if "load" in r:
            print(f"{'':18s} {'':8s} {'':4s} (1-min load average during these runs: {r['load']:.1f} on {os.cpu_count()} CPUs)")
        s = r.get("sfft_run")
        if s is not None:
            if "error" in s:
                print(f"{case.name:18s} {'sfft':8s} {1:4d} failed: {s['error']}")
            else:
                print(f"{case.name:18s} {'sfft':8s} {1:4d} {s['wall']:7.2f} {'':6s} {'':6s} {s['cpu']:6.2f} "
                      f"{s['peak_rss'] / MIB:8.0f} {s['rss_inputs'] / MIB:10.0f}  (of which function compilation "
                      f"{s['wall_configure']:.1f} s; detection with ours not included)")


QUALITY_COLUMNS = (
    ("blank std", "blank", ".4f"),
    ("near-star std", "near", ".4f"),
    ("ksum err", "kernel_sum_err", "+.2%"),
    ("C(S/N>=10)", "c10", ".1%"),
    ("C(5-10)", "c5", ".1%"),
    ("FP blank", "fp_blank", "d"),
    ("FP all", "fp", "d"),
    ("FP/4096^2", "fp_4096", ".1f"),
    ("FP noise", "fp_noise", ".2f"),
    ("flux bias", "flux_bias", "+.2%"),
    ("n DIA", "n_dia", "d"),
)


def print_quality_table(results: list[dict[str, Any]]) -> None:
    print()
    print("Quality on simulated pairs (truth-based; std of difference/sqrt(variance); kernel sum vs true scale;")
    print("completeness of transients by expected difference S/N; false positives; median PSF-flux bias, S/N >= 10)")
    head = f"{'case':18s} {'method':11s} " + " ".join(f"{name:>13s}" for name, _, _ in QUALITY_COLUMNS)
    print(head)
    print("-" * len(head))
    for r in results:
        for method, key in (("ours", "ours"), ("true kernel", "true"), ("sfft", "sfft")):
            q = r.get(key)
            if q is None:
                continue
            print(f"{r['case'].name:18s} {method:11s} " + " ".join(f"{fmt(q.get(k), spec):>13s}" for _, k, spec in QUALITY_COLUMNS))
        if "ours" in r:
            q = r["ours"]
            print(f"{'':18s} {'':11s} transients expected: {q['n5']} at S/N 5-10, {q['n10']} at S/N >= 10; "
                  f"{q['n_stars']} bright stars")


def print_targets(results: list[dict[str, Any]]) -> None:
    print()
    print("Targets (PASS/MISS), ours; the true-kernel number in brackets where it is the reference")
    scored = [r for r in results if "ours" in r and "true" in r]
    if scored:
        n, n_true = (sum(r[m]["n5"] for r in scored) for m in ("ours", "true"))
        ours, true = (sum(round(r[m]["c5"] * r[m]["n5"]) for r in scored if r[m]["n5"]) for m in ("ours", "true"))
        if n and n_true:
            delta = 100.0 * (ours / n - true / n_true)
            print(f"  all cases pooled: completeness S/N 5-10 {ours}/{n} = {ours / n:.1%}, true kernel {true}/{n_true} = "
                  f"{true / n_true:.1%}: {delta:+.1f} points (target >= -{COMPLETENESS_FAINT_POINTS:g})   "
                  f"{mark(delta >= -COMPLETENESS_FAINT_POINTS)}")
    for r in results:
        q, t = r.get("ours"), r.get("true")
        if q is None:
            continue
        case = r["case"]
        print(f"  {case.name} ({case.description})")
        rows = []
        if case.size >= 4096:
            for workers, runs in (r.get("ours_runs") or {}).items():
                wall = float(np.median([x["wall_subtract"] + x["wall_detect"] for x in runs]))
                cpu = float(np.median([x["cpu"] for x in runs]))
                peak = max(x["peak_rss"] for x in runs)
                rows.append((f"wall, sub + detect, fftWorkers={workers}", f"{wall:.2f} s (cpu {cpu:.2f})",
                             f"<= {WALL_TARGET_S:g} s", wall <= WALL_TARGET_S))
                rows.append((f"peak RSS, fftWorkers={workers}", f"{peak / GIB:.2f} GiB", f"<= {PEAK_TARGET_GIB:g} GiB",
                             peak <= PEAK_TARGET_GIB * GIB))
        rows += [
            ("blank-sky std", f"{q['blank']:.4f} [{t['blank']:.4f}]", f"[{BLANK_RANGE[0]}, {BLANK_RANGE[1]}]",
             BLANK_RANGE[0] <= q["blank"] <= BLANK_RANGE[1]),
            ("near-star std", f"{q['near']:.4f} [{t['near']:.4f}]", f"<= {NEAR_STAR_MAX}", q["near"] <= NEAR_STAR_MAX),
            ("kernel sum vs true scale", f"{q['kernel_sum_err']:+.2%}", f"within {KERNEL_SUM_TOLERANCE:.0%}",
             abs(q["kernel_sum_err"]) <= KERNEL_SUM_TOLERANCE),
            ("completeness S/N >= 10", f"{q['c10']:.1%} [{t['c10']:.1%}]", f">= {COMPLETENESS_BRIGHT_MIN:.0%}",
             q["c10"] >= COMPLETENESS_BRIGHT_MIN if math.isfinite(q["c10"]) else None),
            ("completeness S/N 5-10", f"{q['c5']:.1%} [{t['c5']:.1%}]",
             f"true - {COMPLETENESS_FAINT_POINTS:g} pts" if q["n5"] >= MIN_FAINT_TRANSIENTS else "pooled above",
             (100 * (q["c5"] - t["c5"]) >= -COMPLETENESS_FAINT_POINTS)
             if math.isfinite(q["c5"]) and q["n5"] >= MIN_FAINT_TRANSIENTS else None),
            ("false positives, blank sky", f"{q['fp_blank']} [{t['fp_blank']}]", "0", q["fp_blank"] == 0),
            ("  white noise alone (mean of 4)", f"{q['fp_noise']:.2f}", "", None),
            ("false positives per 4096^2", f"{q['fp_4096']:.1f} [{t['fp_4096']:.1f}]", f"<= {FALSE_POSITIVES_PER_4096:g}",
             q["fp_4096"] <= FALSE_POSITIVES_PER_4096),
            ("PSF flux bias, S/N >= 10", f"{q['flux_bias']:+.2%} [{t['flux_bias']:+.2%}]", f"within {FLUX_BIAS_MAX:.0%}",
             abs(q["flux_bias"]) <= FLUX_BIAS_MAX if math.isfinite(q["flux_bias"]) else None),
        ]
        for name, value, target, ok in rows:
            print(f"    {name:34s} {value:>22s}   {target:>16s}   {mark(ok)}")


# ------------------------------------------------------------------------------------ real data
def _zscale(img: np.ndarray) -> tuple[float, float]:
    from astropy.visualization import ZScaleInterval

    finite = img[np.isfinite(img)]
    return ZScaleInterval().get_limits(finite) if finite.size else (0.0, 1.0)


def write_png(path: Path, title: str, panels: list[tuple[str, np.ndarray, bool]]) -> None:
    """Panels side by side; ``True`` marks a difference (symmetric stretch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    for ax, (label, img, is_diff) in zip(np.atleast_1d(axes), panels, strict=True):
        if is_diff:
            finite = img[np.isfinite(img)]
            lim = 5.0 * robust_std(finite) if finite.size else 1.0
            ax.imshow(img, origin="lower", cmap="gray", vmin=-lim, vmax=lim)
        else:
            lo, hi = _zscale(img)
            ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def usable_pixels(difference: Exposure) -> np.ndarray:
    """Finite pixels with a positive variance and none of the unusable mask planes."""
    bad = difference.get_plane_bitmask([p for p in ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT")
                                        if p in difference.mask_planes])
    ok = np.isfinite(difference.image) & np.isfinite(difference.variance) & (difference.variance > 0)
    return ok & ((difference.mask & bad) == 0)


def source_free_pixels(science: Exposure, template: Exposure) -> np.ndarray:
    """Pixels with no 5-sigma source footprint of either input within 2 FWHM (PSF matched filter)."""
    cx, cy = science.bbox.center
    fwhm = max(science.psf.fwhm(cx, cy), template.psf.fwhm(cx, cy))
    occupied = np.zeros(science.shape, bool)
    for exp in (science, template):
        snr, _, _ = significance_image(exp)
        occupied |= snr >= 5.0
    r = int(math.ceil(2.0 * fwhm))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ~ndimage.binary_dilation(occupied, structure=(xx**2 + yy**2) <= r * r)


def near_star_pixels(science: Exposure, template: Exposure, sources: Table, snr_min: float = 30.0) -> np.ndarray:
    """Pixels within 2 FWHM of the science sources with S/N > ``snr_min`` not flagged saturated or edge."""
    cx, cy = science.bbox.center
    radius = 2.0 * max(science.psf.fwhm(cx, cy), template.psf.fwhm(cx, cy))
    sel = np.asarray(sources["snr"], dtype=float) > snr_min
    for flag in ("pixelFlags_saturatedAround", "pixelFlags_saturated", "pixelFlags_edge"):
        if flag in sources.colnames:
            sel &= ~np.asarray(sources[flag], dtype=bool)
    yy, xx = np.mgrid[0 : science.height, 0 : science.width]
    near = np.zeros(science.shape, bool)
    x0, y0 = science.xy0
    for x, y in zip(np.asarray(sources["x"])[sel] - x0, np.asarray(sources["y"])[sel] - y0, strict=True):
        r = int(math.ceil(radius)) + 1
        ya, yb, xa, xb = max(int(y) - r, 0), int(y) + r + 1, max(int(x) - r, 0), int(x) + r + 1
        near[ya:yb, xa:xb] |= (xx[ya:yb, xa:xb] - x) ** 2 + (yy[ya:yb, xa:xb] - y) ** 2 <= radius**2
    return near


def score_real(difference: Exposure, dia: Table, free: np.ndarray, common: np.ndarray, near: np.ndarray,
               kernel_sum: float, snr_std: float) -> dict[str, Any]:
    """Normalized residual on ``free`` pixels and near bright stars; DIA sources in all and within ``common``."""
    z = difference.image[free] / np.sqrt(difference.variance[free])
    zn = difference.image[near] / np.sqrt(difference.variance[near])
    x0, y0 = difference.xy0
    if len(dia):
        ix = np.clip(np.rint(np.asarray(dia["x"]) - x0).astype(int), 0, difference.width - 1)
        iy = np.clip(np.rint(np.asarray(dia["y"]) - y0).astype(int), 0, difference.height - 1)
        inside = common[iy, ix]
        neg = np.asarray(dia["isNegative"], dtype=bool)
        dip = np.asarray(dia["isDipole"], dtype=bool)
    else:
        inside = neg = dip = np.zeros(0, bool)
    return {
        "free_fraction": float(free.mean()),
        "std": float(np.std(z)) if z.size else float("nan"),
        "robust_std": robust_std(z),
        "mean": float(np.mean(z)) if z.size else float("nan"),
        "near_std": float(np.std(zn)) if zn.size else float("nan"),
        "near_pixels": int(zn.size),
        "expected_sigma": float(np.sqrt(np.median(difference.variance[free]))) if z.size else float("nan"),
        "measured_sigma": robust_std(difference.image[free]),
        "kernel_sum": kernel_sum,
        "n_dia": len(dia),
        "n_common": int(np.count_nonzero(inside)),
        "n_pos": int(np.count_nonzero(inside & ~neg & ~dip)),
        "n_neg": int(np.count_nonzero(inside & neg & ~dip)),
        "n_dipole": int(np.count_nonzero(inside & dip)),
        "snr_std": snr_std,
    }


def make_real_repository(repo: Path) -> Any:
    """A temporary repository with the dimension records of the real pairs; returns a Butler."""
    from butler.butler import Butler

    Butler.create(repo)
    butler = Butler(repo, run="external")
    butler.insert_dimension_records("instrument", [{"name": "DECam"}, {"name": "NIRCam"}])
    butler.insert_dimension_records("band", [{"name": "i"}, {"name": "F200W"}])
    butler.insert_dimension_records("physical_filter", [
        {"instrument": "DECam", "name": "i DECam SDSS c0003", "band": "i"},
        {"instrument": "NIRCam", "name": "CLEAR-F200W", "band": "F200W"},
    ])
    butler.insert_dimension_records("detector", [{"instrument": "DECam", "id": 37, "full_name": "N6"},
                                                 {"instrument": "NIRCam", "id": 0, "full_name": "stamp"}])
    visits = [{"instrument": "DECam", "id": 1800 + k, "physical_filter": "i DECam SDSS c0003", "name": f"OBS18{c}"}
              for k, c in enumerate("abcde")]
    visits += [{"instrument": "DECam", "id": 400 + k, "physical_filter": "i DECam SDSS c0003", "name": f"OBS04{c}"}
               for k, c in enumerate("abcde")]
    visits += [{"instrument": "NIRCam", "id": 1324, "physical_filter": "CLEAR-F200W", "name": "GLASS"},
               {"instrument": "NIRCam", "id": 2561, "physical_filter": "CLEAR-F200W", "name": "UNCOVER"}]
    butler.insert_dimension_records("visit", visits)
    butler.register_dataset_type("externalExposure", ["instrument", "visit", "detector"], "Exposure")
    return butler


#: makeKernel settings of the NIRCam crossConvolve row: the PSF models leave residuals at the bright
#: stars that the default candidate screening (residual std 1.5, mean 0.25) rejects every candidate for.
NIRCAM_CROSS_OVERRIDES = {"candidateResidualStdMax": 5.0, "candidateResidualMeanMax": 2.0}

#: Short names of ImageDifferenceTask modes in the real-pixel table.
MODE_LABELS = {"crossConvolve": "cross"}


def run_real_pair(name: str, template: Exposure, science: Exposure, tsrc: Table, ssrc: Table, args: argparse.Namespace,
                  workdir: Path, outdir: Path, sfft_spec: dict[str, Any] | None,
                  cross_psfs: tuple[np.ndarray, np.ndarray] | None = None,
                  extra_modes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ours (and ours in each of ``extra_modes``: mode -> makeKernel config overrides) and sfft on one
    prepared real pair, scored on the same pixels; a PNG."""
    out: dict[str, Any] = {"name": name, "shape": science.shape}
    diffs: dict[str, tuple[Exposure, Table, float, float]] = {}

    def run_ours(label: str, config: ImageDifferenceConfig) -> ImageDifferenceTask:
        task = ImageDifferenceTask(config=config)
        detect = DetectAndMeasureTask()
        t0 = time.perf_counter()
        res = task.run(template, science, ssrc)
        dia = detect.run(science, res.matchedExposure, res.subtractedExposure).diaSources
        out["wall" if label == "ours" else f"wall_{label.split('/', 1)[1]}"] = time.perf_counter() - t0
        diffs[label] = (res.subtractedExposure, dia, float(task.makeKernel.metadata["kernelSumCentre"]),
                        float(detect.metadata["snrStdBlankSky"]))
        return task

    task = run_ours("ours", ImageDifferenceConfig())
    kmd = task.makeKernel.metadata
    out["order"] = int(kmd["spatialKernelOrder"])
    out["n_used"] = int(kmd["n_used"])
    out["convolved"] = task.metadata["convolvedImage"]
    for mode, overrides in (extra_modes or {}).items():
        cfg = ImageDifferenceConfig()
        cfg.mode = mode
        for key, value in overrides.items():
            setattr(cfg.makeKernel, key, value)
        run_ours(f"ours/{MODE_LABELS.get(mode, mode)}", cfg)
    if sfft_spec is not None:
        folder = workdir / name
        write_inputs(folder, template, science, ssrc)
        spec = dict(sfft_spec)
        spec.setdefault("conv", "REF" if out["convolved"] == "template" else "SCI")
        if spec.get("kerhw") is None:
            spec["kerhw"] = sfft_kernel_half_width(template, science)
        out["sfft_spec"] = {k: v for k, v in spec.items() if k != "cross_psf"}
        s = run_child("sfft", folder, spec, memory_gib=args.sfft_memory_gib, timeout=args.sfft_timeout,
                      python=args.sfft_python)
        out["sfft_run"] = s
        if "error" not in s:
            diff = sfft_difference_exposure(folder, s, template, science, spec["conv"], cross_psfs)
            sdet = DetectAndMeasureTask()
            sdia = sdet.run(science, None, diff).diaSources
            diffs["sfft"] = (diff, sdia, s["kernel_sum"], float(sdet.metadata["snrStdBlankSky"]))
        shutil.rmtree(folder, ignore_errors=True)
    common = np.logical_and.reduce([usable_pixels(d[0]) for d in diffs.values()])
    free = source_free_pixels(science, template) & common
    near = near_star_pixels(science, template, ssrc) & common
    out["common_fraction"] = float(common.mean())
    panels = [("science", science.image, False), ("template", template.image, False)]
    for method, (diff, catalog, ksum, snr_std) in diffs.items():
        out[method] = score_real(diff, catalog, free, common, near, ksum, snr_std)
        panels.append((f"{method} ({len(catalog)} DIA sources)", diff.image, True))
    path = outdir / f"diffim_{name}.png"
    write_png(path, f"{name}: science / template / difference", panels)
    out["png"] = str(path)
    return out


def run_realdata(args: argparse.Namespace, workdir: Path, outdir: Path) -> list[dict[str, Any]]:
    """Ingest the DECam and NIRCam pairs into a temporary repository, prepare, subtract, detect."""
    from tasks.diffim.external import prepare_external_exposure

    if not REALDATA.is_dir():
        print(f"\nreal data: {REALDATA} not found; skipped")
        return []
    repo = workdir / "realrepo"
    butler = make_real_repository(repo)
    decam = REALDATA / "sfft_decam_i"
    nircam = REALDATA / "sfft_jwst_nircam_f200w"
    files, ids = [], []
    for k, c in enumerate("abcde"):
        files += [decam / f"DEC-OBS18{c}.mini.fits", decam / f"DEC-OBS04{c}.mini.fits"]
        ids += [{"instrument": "DECam", "visit": 1800 + k, "detector": 37}, {"instrument": "DECam", "visit": 400 + k, "detector": 37}]
    files += [nircam / f"{NIRCAM_REF}.fits", nircam / f"{NIRCAM_SCI}.fits"]
    ids += [{"instrument": "NIRCam", "visit": 1324, "detector": 0}, {"instrument": "NIRCam", "visit": 2561, "detector": 0}]
    t0 = time.perf_counter()
    refs = butler.ingest(files, "externalExposure", ids, run="external")
    print(f"\nreal data: ingested {len(refs)} FITS files into a temporary repository ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    results = []
    with_sfft = not args.no_sfft and args.sfft_python is not None
    for ref_c, sci_c in DECAM_PAIRS[: args.decam_pairs]:
        k_ref, k_sci = "abcde".index(ref_c[-1]), "abcde".index(sci_c[-1])
        t_raw = butler.get("externalExposure", instrument="DECam", visit=1800 + k_ref, detector=37)
        s_raw = butler.get("externalExposure", instrument="DECam", visit=400 + k_sci, detector=37)
        template, tsrc = prepare_external_exposure(t_raw)
        science, ssrc = prepare_external_exposure(s_raw)
        spec = {"ker_order": 0, "bg_order": 0, "threads": args.sfft_threads} if with_sfft else None
        r = run_real_pair(f"decam_OBS{ref_c}_OBS{sci_c}", template, science, tsrc, ssrc, args, workdir, outdir, spec)
        r["fwhm"] = (template.psf.fwhm(*template.bbox.center), science.psf.fwhm(*science.bbox.center))
        results.append(r)
        print(f"real data: {r['name']} done", flush=True)
    psfs = {}
    prepared = {}
    for role, name, visit in (("template", NIRCAM_REF, 1324), ("science", NIRCAM_SCI, 2561)):
        raw = butler.get("externalExposure", instrument="NIRCam", visit=visit, detector=0)
        noise = fits.getdata(nircam / f"{name}.noise.fits").astype(np.float32)
        full = fits.getdata(nircam / f"{name}.WebbPSF.fits").astype(np.float64)
        psfs[role] = full
        c, h = full.shape[0] // 2, NIRCAM_PSF_SIZE // 2
        psf = ImagePsf.normalized(np.clip(full[c - h : c + h + 1, c - h : c + h + 1], 0.0, None))
        prepared[role] = prepare_external_exposure(raw, psf=psf, variance=noise**2)
    (template, tsrc), (science, ssrc) = prepared["template"], prepared["science"]
    spec = None
    psf_paths = {}
    if with_sfft:
        for role, name in (("template", NIRCAM_REF), ("science", NIRCAM_SCI)):
            psf_paths[role] = str(nircam / f"{name}.WebbPSF.fits")
        spec = {"ker_order": 2, "bg_order": 0, "kerhw": 11, "conv": "REF", "threads": args.sfft_threads, "cross_psf": psf_paths}
    r = run_real_pair("nircam_F200W", template, science, tsrc, ssrc, args, workdir, outdir, spec,
                      cross_psfs=(psfs["template"], psfs["science"]) if with_sfft else None,
                      extra_modes={"crossConvolve": NIRCAM_CROSS_OVERRIDES})
    r["fwhm"] = (template.psf.fwhm(0, 0), science.psf.fwhm(0, 0))
    results.append(r)
    print(f"real data: {r['name']} done", flush=True)
    butler.close()
    return results


def print_realdata(results: list[dict[str, Any]]) -> None:
    if not results:
        return
    print()
    print("Real pixels.  std, rob std: difference/sqrt(variance) (variance propagated from the inputs) on source-free")
    print("pixels usable in every method's difference (no 5-sigma source of either input within 2 FWHM); sigma meas/exp:")
    print("robust std of the difference there / sqrt(median variance); DIA: all sources, then +/-/dipoles among those")
    print("in the area usable by every method; S/N std: blank-sky std of the detection S/N image (1 for white noise);")
    print("near: the std within 2 FWHM of science sources with S/N > 30 (unsaturated): 1 for a perfect kernel")
    head = (f"{'pair':24s} {'method':10s} {'FWHM t/s px':>11s} {'free px':>7s} {'std':>6s} {'rob std':>7s} {'near':>6s} "
            f"{'sigma meas/exp':>15s} {'ksum':>7s} {'DIA':>5s} {'+/-/dip':>12s} {'S/N std':>7s} {'time s':>7s} {'compile s':>9s}")
    print(head)
    print("-" * len(head))
    for r in results:
        ft, fs = r["fwhm"]
        extra_methods = [k for k in r if k.startswith("ours/")]
        for method in ("ours", *extra_methods, "sfft"):
            q = r.get(method)
            if q is None:
                if method == "sfft" and "sfft_run" in r:
                    print(f"{r['name']:24s} {'sfft':10s} failed: {r['sfft_run']['error']}")
                continue
            if method == "sfft":
                t = r["sfft_run"]["wall"]
            else:
                t = r["wall"] if method == "ours" else r[f"wall_{method.split('/', 1)[1]}"]
            compile_s = f"{r['sfft_run']['wall_configure']:9.1f}" if method == "sfft" else f"{'':9s}"
            sig = f"{q['measured_sigma']:.3g}/{q['expected_sigma']:.3g}"
            counts = f"{q['n_pos']}/{q['n_neg']}/{q['n_dipole']}"
            print(f"{r['name']:24s} {method:10s} {ft:5.2f}/{fs:<5.2f} {q['free_fraction']:7.1%} {q['std']:6.3f} "
                  f"{q['robust_std']:7.3f} {q['near_std']:6.2f} {sig:>15s} {q['kernel_sum']:7.4f} {q['n_dia']:5d} {counts:>12s} "
                  f"{q['snr_std']:7.3f} {t:7.2f} {compile_s}")
        extra = ""
        if "sfft_spec" in r:
            sp = r["sfft_spec"]
            extra = (f"; sfft ForceConv={sp['conv']} KerHW={sp['kerhw']} KerPolyOrder={sp['ker_order']} "
                     f"BGPolyOrder={sp['bg_order']}")
        print(f"{'':24s} {'':10s} ours: convolved the {r['convolved']}, spatial order {r['order']}, {r['n_used']} kernel "
              f"candidates{extra}; common usable area {r['common_fraction']:.0%}; PNG {r['png']}")


# ------------------------------------------------------------------------------------ main
def _sfft_python(args: argparse.Namespace) -> str | None:
    """An interpreter with sfft: ``--sfft-python`` or this one."""
    python = args.sfft_python or sys.executable
    probe = subprocess.run([python, "-c", "import sfft"], capture_output=True)
    return python if probe.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), help="simulated pairs to run")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs of ours on the 4096 and 2048 pairs")
    parser.add_argument("--fft-workers", type=int, nargs="+", default=[1, 2],
                        help="fftWorkers values to time (each --repeat times on the 4096 and 2048 pairs; the first "
                        "one alone elsewhere); results do not depend on it")
    parser.add_argument("--no-sfft", action="store_true", help="do not run sfft")
    parser.add_argument("--sfft-cases", nargs="+", default=["2048"], choices=list(CASES), help="simulated pairs sfft runs on")
    parser.add_argument("--sfft-python", default=None, help="interpreter with sfft installed (default: this one)")
    parser.add_argument("--sfft-memory-gib", type=float, default=20.0, help="address-space limit of the sfft process")
    parser.add_argument("--sfft-timeout", type=float, default=1800.0, help="time limit of the sfft process, s")
    parser.add_argument("--sfft-threads", type=int, default=2, help="sfft NUM_CPU_THREADS_4SUBTRACT")
    parser.add_argument("--ours-timeout", type=float, default=600.0, help="time limit of one run of ours, s")
    parser.add_argument("--realdata", action=argparse.BooleanOptionalAction, default=True, help="the real-pixel section")
    parser.add_argument("--decam-pairs", type=int, default=len(DECAM_PAIRS), help="how many DECam pairs (OBS18x/OBS04x)")
    parser.add_argument("--outdir", default=None, help="folder of the PNGs (default: a new temporary folder)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "FOLDER", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, folder, spec_path = args.worker
        spec = json.loads(Path(spec_path).read_text())
        {"ours": ours_worker, "sfft": sfft_worker}[kind](Path(folder), spec)
        return

    import logging

    logging.basicConfig(level=logging.ERROR)
    args.sfft_python = None if args.no_sfft else _sfft_python(args)
    if not args.no_sfft and args.sfft_python is None:
        print("sfft is not importable by this interpreter (use --sfft-python); its columns are skipped")
    outdir = Path(args.outdir) if args.outdir else Path(tempfile.mkdtemp(prefix="bench_diffim_png_"))
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"bench_diffim: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, fftWorkers {args.fft_workers}, sfft: {args.sfft_python or 'not run'}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_diffim_") as tmp:
        workdir = Path(tmp)
        for name in args.cases:
            case = CASES[name]
            repeat = args.repeat if name in ("4096", "2048") else 1
            with_sfft = args.sfft_python is not None and name in args.sfft_cases
            results.append(run_simulated_case(case, args, workdir, repeat, with_sfft))
        real = run_realdata(args, workdir, outdir) if args.realdata else []
    print_timing_table(results)
    print_quality_table(results)
    print_targets(results)
    print_realdata(real)
    if real:
        print(f"\nPNGs in {outdir}")


if __name__ == "__main__":
    main()
