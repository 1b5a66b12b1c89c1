"""Exposures in FITS: LSST's multi-extension layout for import/export, and plain FITS images.

Layout written (LSST ``afw`` conventions, so DS9 and LSST tools read the files)
---------------------------------------------------------------------------------
====  ==============  ========================================================================
HDU   EXTNAME         content
====  ==============  ========================================================================
0     PRIMARY         no data; summary keywords (``FILTER``, ``EXPTIME``, ``DATE-AVG`` (TAI),
                      ``BORE-RA``/``BORE-DEC``, ``FLUXMAG0``, ...), ``DPFORMAT``/``DPFMTVER``
1     IMAGE           float32; ``EXTTYPE='IMAGE'``; the celestial WCS (see below)
2     MASK            int32; ``EXTTYPE='MASK'``; one ``MP_<PLANE> = bit`` keyword per plane
3     VARIANCE        float32; ``EXTTYPE='VARIANCE'``
4     DIAPIPE_META    one-row binary table, column ``JSON``: PSF, calibration, visit info, band,
                      metadata, bbox (image viewers ignore binary tables)
====  ==============  ========================================================================

Pixel frames, as LSST writes them: FITS WCS keywords describe the *local* array, so ``CRPIX`` is
the parent-frame value minus ``(x0, y0)``; the parent-frame origin is stored as the alternate
linear WCS "A" (``CTYPE1A = 'LINEAR'``, ``CRPIX1A = 1``, ``CRVAL1A = x0``, ``CUNIT1A = 'PIXEL'``, and
the same for axis 2, plus ``WCSNAMEA = 'PARENT'``), which is what LSST reads ``xy0`` from, and as
``LTV1 = -x0``, ``LTV2 = -y0`` for DS9's "physical" coordinates (ignored on read, as in ``afw``).
All three image HDUs carry these keywords.

Reading
-------
:func:`read_exposure_fits` reads (a) files written here, (b) LSST stack files (extensions found by
``EXTNAME``/``EXTTYPE``; ``MP_*`` mask planes, the "A" WCS for ``xy0``, ``FLUXMAG0``, visit keywords;
PSFs stored in LSST's binary archive are *not* decoded), and (c) plain images: a single image HDU
(``SCI`` preferred), optional ``VARIANCE``/``VAR`` or ``ERR`` (1-sigma, squared) extensions, NaN
pixels flagged ``NO_DATA``.  Header keywords that are neither structural nor WCS become the
exposure's ``metadata``.

Truncated or non-FITS files raise :class:`~butler.errors.CorruptFileError`; a file without a
celestial WCS raises :class:`~butler.errors.FormatError` unless ``require_wcs=False``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ..errors import CorruptFileError, DataModelError, FormatError
from ..exposure import Exposure, PhotoCalib, VisitInfo
from ..geometry import Box
from ..masks import DEFAULT_MASK_PLANES
from .atomic import atomic_file
from .json_io import exposure_components_from_dict, exposure_components_to_dict

__all__ = [
    "write_exposure_fits",
    "read_exposure_fits",
    "wcs_to_header",
    "wcs_from_header",
    "FITS_FORMAT_NAME",
    "FITS_FORMAT_VERSION",
]

_log = logging.getLogger(__name__)

FITS_FORMAT_NAME = "diapipe.exposure.fits"
FITS_FORMAT_VERSION = 1
META_EXTNAME = "DIAPIPE_META"

#: AB flux of magnitude 0, nJy (3631 Jy).
_NJY_MAG0 = 3631e9

#: Keywords describing the file structure rather than the data; never copied into metadata.
_STRUCTURAL = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|EXTNAME|EXTVER|EXTLEVEL|EXTTYPE|"
    r"BSCALE|BZERO|BLANK|CHECKSUM|DATASUM|INHERIT|TFIELDS|TTYPE\d+|TFORM\d+|THEAP|"
    r"Z[A-Z]+\d*|DPFORMAT|DPFMTVER|AR_HDU|ARCHIVE_ID_.+|(PSF|WCS|SKYWCS|COADD_INPUTS|AP_CORR_MAP|"
    r"VALID_POLYGON|TRANSMISSION_CURVE|DETECTOR|PHOTOCALIB|FILTER|SUMMARYSTATS)_ID)$"
)
#: WCS keywords (primary and alternates), SIP/TPV distortion terms, IRAF LTV/LTM, mask planes.
_WCS_LIKE = re.compile(
    r"^(WCSAXES|CRPIX\d|CRVAL\d|CDELT\d|CTYPE\d|CUNIT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+|PS\d_\d+|"
    r"CRDER\d|CSYER\d|CNAME\d|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|WCSNAME|MJDREF|"
    r"(A|B|AP|BP)_ORDER|(A|B|AP|BP)_\d+_\d+|A_DMAX|B_DMAX)[A-Z]?$|^(LTV\d|LTM\d_\d|MP_.+)$"
)
_FITS_KEY = re.compile(r"^[A-Z0-9_-]{1,8}$")
#: Keywords of the primary header written by this module (others from metadata must not clash).
_SUMMARY_KEYS = {
    "DPFORMAT", "DPFMTVER", "FILTER", "EXPTIME", "DATE-AVG", "TIMESYS", "MJD-AVG", "BORE-RA",
    "BORE-DEC", "BORE-ROTANG", "ROTTYPE", "AIRMASS", "SEEING", "EXPID", "FLUXMAG0", "FLUXMAG0ERR",
}


# --------------------------------------------------------------------------- WCS <-> header
def wcs_to_header(wcs: WCS, *, x0: int = 0, y0: int = 0) -> fits.Header:
    """FITS WCS keywords of ``wcs`` (SIP and ``PV``/TPV terms included) at full double precision.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS of the parent frame (0-based pixels).
    x0, y0 : int
        Origin of the array the header will describe, in the parent frame: ``CRPIX`` is written
        relative to it (LSST's convention); ``(0, 0)`` keeps the parent frame.

    Returns
    -------
    astropy.io.fits.Header
    """
    if wcs.naxis != 2:
        wcs = wcs.celestial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        header = wcs.to_header(relax=True)
    # wcslib prints ~14 significant digits; put back the exact doubles (LSST's "precise" metadata).
    w = wcs.wcs
    shift = (x0, y0)
    for i in range(2):
        _set_if_present(header, f"CRPIX{i + 1}", float(w.crpix[i]) - shift[i])
        _set_if_present(header, f"CRVAL{i + 1}", float(w.crval[i]))
    if any(f"CD{i}_{j}" in header for i in (1, 2) for j in (1, 2)):
        cd = w.cd
        for i in range(2):
            for j in range(2):
                _set_if_present(header, f"CD{i + 1}_{j + 1}", float(cd[i, j]))
    else:
        pc, cdelt = w.get_pc(), w.get_cdelt()
        for i in range(2):
            _set_if_present(header, f"CDELT{i + 1}", float(cdelt[i]))
            for j in range(2):
                _set_if_present(header, f"PC{i + 1}_{j + 1}", float(pc[i, j]))
    for axis, index, value in w.get_pv():
        _set_if_present(header, f"PV{axis}_{index}", float(value))
    return header


def _set_if_present(header: fits.Header, key: str, value: float) -> None:
    if key in header:
        header[key] = value


def wcs_from_header(
    header: fits.Header | Mapping[str, Any], *, x0: int = 0, y0: int = 0, where: str = "header"
) -> WCS | None:
    """The celestial WCS in a FITS header, moved to the parent frame; ``None`` if there is none.

    Parameters
    ----------
    header : astropy.io.fits.Header or mapping
        Keywords (a plain dict as stored in Zarr attributes is accepted).
    x0, y0 : int
        Parent-frame origin of the array the header describes; added to ``CRPIX``.
    where : str
        Names the source in error messages.

    Raises
    ------
    FormatError
        The keywords describe a WCS that astropy cannot parse.
    """
    if isinstance(header, fits.Header):
        hdr = header.copy(strip=False)
    else:
        hdr = fits.Header(list(header.items()))  # ~5x faster than card-by-card assignment
    if not any(f"CTYPE{i}" in hdr for i in (1, 2)):
        return None
    for i, shift in ((1, x0), (2, y0)):
        hdr[f"CRPIX{i}"] = float(hdr.get(f"CRPIX{i}", 0.0)) + shift
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(hdr, relax=True)
    except Exception as exc:  # astropy raises a zoo of types for bad WCS keywords
        raise FormatError(f"{where}: invalid WCS keywords: {exc}") from None
    if not wcs.has_celestial:
        return None
    if wcs.naxis != 2:
        wcs = wcs.celestial
    return wcs


def _parent_keywords(x0: int, y0: int) -> list[tuple[str, Any, str]]:
    return [
        ("WCSNAMEA", "PARENT", "LSST parent-frame pixel coordinates"),
        ("CTYPE1A", "LINEAR", "Type of projection"),
        ("CTYPE2A", "LINEAR", "Type of projection"),
        ("CRPIX1A", 1.0, "Column Pixel Coordinate of Reference"),
        ("CRPIX2A", 1.0, "Row Pixel Coordinate of Reference"),
        ("CRVAL1A", float(x0), "Column pixel of Reference Pixel"),
        ("CRVAL2A", float(y0), "Row pixel of Reference Pixel"),
        ("CUNIT1A", "PIXEL", "Column unit"),
        ("CUNIT2A", "PIXEL", "Row unit"),
        ("LTV1", float(-x0), "-x0, for DS9's physical coordinates"),
        ("LTV2", float(-y0), "-y0, for DS9's physical coordinates"),
    ]


def _xy0_from_header(header: fits.Header) -> tuple[int, int]:
    """``xy0`` from the "A" linear WCS, as LSST reads it (``(0, 0)`` when absent)."""
    keys = ("CRPIX1A", "CRPIX2A", "CRVAL1A", "CRVAL2A")
    if all(key in header for key in keys):
        try:
            if float(header["CRPIX1A"]) == 1.0 and float(header["CRPIX2A"]) == 1.0:
                return int(round(float(header["CRVAL1A"]))), int(round(float(header["CRVAL2A"])))
        except (TypeError, ValueError):
            pass
    return 0, 0


# --------------------------------------------------------------------------- writing
def _readonly(array: np.ndarray) -> np.ndarray:
    # astropy byteswaps writeable arrays *in place* while writing (and swaps back): another thread
    # reading the exposure meanwhile would see garbage.  A read-only view makes it swap a copy.
    view = array.view()
    view.flags.writeable = False
    return view


def _summary_header(exposure: Exposure) -> fits.Header:
    header = fits.Header()
    header["DPFORMAT"] = (FITS_FORMAT_NAME, "diapipe file format")
    header["DPFMTVER"] = (FITS_FORMAT_VERSION, "diapipe file format version")
    if exposure.band is not None:
        header["FILTER"] = (exposure.band, "band")
    visit = exposure.visit_info
    if visit is not None:
        header["EXPTIME"] = (float(visit.exposure_time), "[s] exposure time")
        if math.isfinite(visit.mjd):
            from astropy.time import Time

            header["DATE-AVG"] = (Time(visit.mjd, format="mjd", scale="tai").isot, "middle of exposure")
            header["TIMESYS"] = ("TAI", "time scale of DATE-AVG")
            header["MJD-AVG"] = (float(visit.mjd), "[d] MJD (TAI) of the middle of exposure")
        for key, value, comment in (
            ("BORE-RA", visit.boresight_ra, "[deg] boresight ICRS RA"),
            ("BORE-DEC", visit.boresight_dec, "[deg] boresight ICRS Dec"),
            ("AIRMASS", visit.airmass, "airmass at the middle of exposure"),
            ("SEEING", visit.seeing, "[arcsec] delivered PSF FWHM"),
        ):
            if math.isfinite(value):
                header[key] = (float(value), comment)
        header["HIERARCH BORE-ROTANG"] = (float(visit.rotation_angle), "[deg] sky position angle")
        header["ROTTYPE"] = ("SKY", "type of BORE-ROTANG")
        if visit.visit_id is not None:
            header["EXPID"] = (int(visit.visit_id), "visit id")
    if exposure.photo_calib is not None:
        calib = exposure.photo_calib
        header["FLUXMAG0"] = (_NJY_MAG0 / calib.calibration, "[count] flux of a 0 mag AB source")
        header["HIERARCH FLUXMAG0ERR"] = (_NJY_MAG0 * calib.calibration_err / calib.calibration**2, "[count]")
    # Simple scalar metadata also goes to the header, for people looking at the file.
    for key, value in exposure.metadata.items():
        if (
            isinstance(key, str)
            and _FITS_KEY.match(key)
            and key not in _SUMMARY_KEYS
            and not _STRUCTURAL.match(key)
            and not _WCS_LIKE.match(key)
            and isinstance(value, (bool, int, float, str))
            and not (isinstance(value, float) and not math.isfinite(value))
            and not (isinstance(value, str) and (len(value) > 68 or not value.isascii()))
        ):
            header[key] = value
    return header


def _plane_header(exposure: Exposure, exttype: str, wcs_header: fits.Header | None) -> fits.Header:
    header = fits.Header()
    header["EXTTYPE"] = exttype
    if wcs_header is not None:
        header.extend(wcs_header)
    x0, y0 = exposure.xy0
    for key, value, comment in _parent_keywords(x0, y0):
        header[key] = (value, comment)
    return header


def write_exposure_fits(
    exposure: Exposure, path: str | os.PathLike[str], *, overwrite: bool = False, fsync: bool = True
) -> Path:
    """Write an exposure as an LSST-style multi-extension FITS file, atomically.

    Parameters
    ----------
    exposure : Exposure
        The exposure to write (not modified, safe to share with other threads).
    path : path-like
        Target file.
    overwrite : bool
        Replace an existing file.
    fsync : bool
        Make the file durable before publishing it (default); see :mod:`butler.formats.atomic`.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    FormatError
        ``path`` exists and ``overwrite`` is false.
    DataModelError
        ``exposure.metadata`` is not JSON-able.
    """
    path = Path(path)
    if not isinstance(exposure, Exposure):
        raise DataModelError(f"write_exposure_fits needs an Exposure, got {type(exposure).__name__}")
    x0, y0 = exposure.xy0
    wcs_header = None if exposure.wcs is None else wcs_to_header(exposure.wcs, x0=x0, y0=y0)

    meta = {"format": FITS_FORMAT_NAME, "version": FITS_FORMAT_VERSION, "bbox": exposure.bbox.to_list()}
    meta.update(exposure_components_to_dict(exposure))
    text = json.dumps(meta, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    meta_hdu = fits.BinTableHDU.from_columns(
        [fits.Column(name="JSON", format=f"{max(len(text), 1)}A", array=np.array([text.encode("ascii")]))],
        name=META_EXTNAME,
    )
    meta_hdu.header["DPFORMAT"] = FITS_FORMAT_NAME

    image_header = _plane_header(exposure, "IMAGE", wcs_header)
    mask_header = _plane_header(exposure, "MASK", wcs_header)
    for name, bit in sorted(exposure.mask_planes.items(), key=lambda item: item[1]):
        key = f"MP_{name}"
        mask_header[key if len(key) <= 8 else f"HIERARCH {key}"] = (int(bit), "mask plane bit")
    variance_header = _plane_header(exposure, "VARIANCE", wcs_header)

    hdus = fits.HDUList(
        [
            fits.PrimaryHDU(header=_summary_header(exposure)),
            fits.ImageHDU(_readonly(exposure.image), header=image_header, name="IMAGE"),
            fits.ImageHDU(_readonly(exposure.mask), header=mask_header, name="MASK"),
            fits.ImageHDU(_readonly(exposure.variance), header=variance_header, name="VARIANCE"),
            meta_hdu,
        ]
    )
    with atomic_file(path, overwrite=overwrite, fsync=fsync) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            hdus.writeto(tmp, output_verify="exception")
    _log.debug("wrote %s (%s)", path, exposure)
    return path


# --------------------------------------------------------------------------- reading
def _open(path: Path) -> fits.HDUList:
    """Open a FITS file, turning astropy's truncation/corruption symptoms into CorruptFileError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=True, lazy_load_hdus=False, mode="readonly")
        except FileNotFoundError:
            raise
        except Exception as exc:  # OSError, ValueError, TypeError, ... for non-FITS bytes
            raise CorruptFileError(f"{path}: not a readable FITS file: {exc}") from None
    try:
        size = path.stat().st_size
        end = 0
        for index, hdu in enumerate(hdul):
            info = hdu.fileinfo()
            if info is None:
                continue
            end = info["datLoc"] + info["datSpan"]
            if end > size:
                raise CorruptFileError(
                    f"{path}: truncated: HDU {index} ({hdu.name}) extends to byte {end}, "
                    f"but the file has {size} bytes"
                )
        for warning in caught:
            message = str(warning.message)
            if "corrupt" in message.lower() and end < size:
                with open(path, "rb") as stream:
                    stream.seek(end)
                    if stream.read(8) == b"XTENSION":
                        raise CorruptFileError(
                            f"{path}: damaged or truncated header after HDU {len(hdul) - 1}: {message}"
                        )
            if not issubclass(warning.category, (FITSFixedWarning, fits.verify.VerifyWarning)):
                if "truncated" not in message:
                    _log.debug("%s: %s", path, message)
    except BaseException:
        hdul.close()
        raise
    return hdul


def _find(hdul: fits.HDUList, kind: str) -> int | None:
    for index, hdu in enumerate(hdul):
        if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            continue
        if hdu.name.upper() == kind or str(hdu.header.get("EXTTYPE", "")).strip().upper() == kind:
            return index
    return None


def _first_image(hdul: fits.HDUList) -> int | None:
    sci = _find(hdul, "SCI")
    if sci is not None:
        return sci
    for index, hdu in enumerate(hdul):
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) and hdu.header.get("NAXIS", 0) >= 2:
            return index
    return None


def _resolve_hdu(hdul: fits.HDUList, hdu: int | str, path: Path) -> int:
    names = [h.name for h in hdul]
    if isinstance(hdu, (int, np.integer)):
        if not 0 <= int(hdu) < len(hdul):
            raise FormatError(f"{path}: no HDU {hdu}; the file has {len(hdul)} HDUs ({', '.join(names)})")
        return int(hdu)
    try:
        return hdul.index_of(hdu)
    except (KeyError, IndexError):
        raise FormatError(f"{path}: no HDU named {hdu!r}; HDUs: {', '.join(names)}") from None


def _pixels(hdu: Any, sl: tuple[slice, slice] | None, dtype: type, path: Path, what: str) -> np.ndarray:
    """The HDU's 2-D pixels (optionally a slice) as a new native-endian array of ``dtype``."""
    shape = hdu.shape
    if len(shape) < 2 or any(n != 1 for n in shape[:-2]):
        raise FormatError(f"{path}: {what} HDU {hdu.name!r} is not a 2-D image (shape {shape})")
    lead = (0,) * (len(shape) - 2)
    header = hdu.header
    unscaled = header.get("BSCALE", 1) == 1 and header.get("BZERO", 0) == 0 and "BLANK" not in header
    try:
        if sl is None:
            data = hdu.data
            data = data[lead] if lead else data
        elif unscaled and not isinstance(hdu, fits.CompImageHDU):
            # Memory-mapped and unscaled: slicing .data reads only the pages of the box (astropy's
            # .section would do the same row by row in Python, ~10x slower).
            data = hdu.data[lead + sl]
        else:
            data = hdu.section[lead + sl]
        return np.array(data, dtype=dtype, order="C")
    except (TypeError, ValueError, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot read the {what} pixels of HDU {hdu.name!r}: {exc}") from None


def _header_metadata(*headers: fits.Header) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for header in headers:
        for card in header.cards:
            key = card.keyword
            if not key or key in ("COMMENT", "HISTORY") or _STRUCTURAL.match(key) or _WCS_LIKE.match(key):
                continue
            value = card.value
            if isinstance(value, (bool, np.bool_)):
                value = bool(value)
            elif isinstance(value, (int, np.integer)):
                value = int(value)
            elif isinstance(value, (float, np.floating)):
                value = float(value) if math.isfinite(value) else None
            elif isinstance(value, str):
                value = value.rstrip()
            else:  # Undefined (blank) and complex values
                value = None if isinstance(value, fits.card.Undefined) else str(value)
            out[key] = value
    return out


def _float(header: Mapping[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = header.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _visit_info_from_header(header: Mapping[str, Any]) -> VisitInfo | None:
    """Best-effort VisitInfo from LSST (``DATE-AVG``/``BORE-*``) or common keywords."""
    exptime = _float(header, "EXPTIME", "EXPOSURE")
    mjd = _float(header, "MJD-AVG")
    if mjd is None and isinstance(header.get("DATE-AVG"), str):
        try:
            from astropy.time import Time

            scale = str(header.get("TIMESYS", "UTC")).strip().lower()
            mjd = float(Time(header["DATE-AVG"], scale=scale if scale in ("tai", "utc", "tt") else "utc").tai.mjd)
        except (ValueError, TypeError):
            mjd = None
    if mjd is None:
        start = _float(header, "MJD-OBS")  # exposure start, in TIMESYS (UTC when absent)
        if start is not None:
            mid = start + (exptime or 0.0) / 2.0 / 86400.0
            scale = str(header.get("TIMESYS", "UTC")).strip().lower()
            try:
                from astropy.time import Time

                mjd = float(Time(mid, format="mjd", scale=scale).tai.mjd)  # VisitInfo.mjd is TAI
            except ValueError:  # an exotic TIMESYS: keep the number as given
                mjd = mid
    if exptime is None and mjd is None:
        return None
    visit_id = header.get("EXPID")
    return VisitInfo(
        exposure_time=exptime or 0.0,
        mjd=float("nan") if mjd is None else mjd,
        airmass=_float(header, "BORE-AIRMASS", "AIRMASS") or float("nan"),
        seeing=_float(header, "SEEING") or float("nan"),
        boresight_ra=_float(header, "BORE-RA") or float("nan"),
        boresight_dec=_float(header, "BORE-DEC") or float("nan"),
        rotation_angle=_float(header, "BORE-ROTANG") or 0.0,
        visit_id=int(visit_id) if isinstance(visit_id, int) and not isinstance(visit_id, bool) else None,
    )


def _band_from_header(header: Mapping[str, Any]) -> str | None:
    for key in ("BAND", "FILTER"):
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            return value.split()[0]
    return None


def _mask_planes(header: fits.Header) -> dict[str, int] | None:
    planes = {key[3:]: int(value) for key, value in header.items() if key.startswith("MP_") and isinstance(value, int)}
    return planes or None


def read_exposure_fits(
    path: str | os.PathLike[str],
    hdu: int | str | None = None,
    *,
    bbox: Box | None = None,
    require_wcs: bool = True,
) -> Exposure:
    """Read an exposure from a FITS file (diapipe/LSST multi-extension, or a plain image).

    Parameters
    ----------
    path : path-like
        The FITS file (tile-compressed files are read too).
    hdu : int or str, optional
        Index or ``EXTNAME`` of the image HDU; by default the ``IMAGE`` extension of an LSST-style
        file, else an ``SCI`` extension, else the first HDU with a 2-D image.
    bbox : Box, optional
        Parent-frame pixels to read (only those rows are read from disk); default everything.
    require_wcs : bool
        Raise :class:`FormatError` if the image HDU has no celestial WCS (default).  With
        ``False`` such a file reads with ``wcs=None``.

    Returns
    -------
    Exposure

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CorruptFileError
        Not a FITS file, truncated, or inconsistent diapipe metadata.
    FormatError
        No image HDU, no celestial WCS (with ``require_wcs``), or ``bbox`` outside the image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such FITS file: {path}")
    with _open(path) as hdul:
        if hdu is None:
            image_index = _find(hdul, "IMAGE")
            lsst_layout = image_index is not None
            if image_index is None:
                image_index = _first_image(hdul)
            if image_index is None:
                names = ", ".join(f"{i}:{h.name}" for i, h in enumerate(hdul))
                raise FormatError(f"{path}: no 2-D image HDU (HDUs: {names})")
        else:
            image_index = _resolve_hdu(hdul, hdu, path)
            lsst_layout = _find(hdul, "IMAGE") == image_index
        image_hdu = hdul[image_index]
        primary = hdul[0].header
        image_header = image_hdu.header

        xy0 = _xy0_from_header(image_header)
        shape = tuple(image_hdu.shape[-2:])
        full = Box.from_shape(shape, *xy0)
        if bbox is not None:
            if not isinstance(bbox, Box):
                raise FormatError(f"bbox must be a butler.geometry.Box, got {type(bbox).__name__}")
            if not full.contains(bbox):
                raise FormatError(
                    f"{path}: bbox {bbox} is not inside the exposure's {full}; "
                    f"read bbox.intersection(...) instead"
                )
        box = full if bbox is None else bbox
        sl = None if bbox is None else box.slices(full)

        wcs = wcs_from_header(image_header, x0=xy0[0], y0=xy0[1], where=f"{path}[{image_hdu.name}]")
        if wcs is None and image_index != 0:
            wcs = wcs_from_header(primary, x0=xy0[0], y0=xy0[1], where=f"{path}[PRIMARY]")
        if wcs is None and require_wcs:
            raise FormatError(
                f"{path}: no celestial WCS in HDU {image_index} ({image_hdu.name}); "
                "pass require_wcs=False to read the pixels without one"
            )

        image = _pixels(image_hdu, sl, np.float32, path, "image")
        mask = variance = None
        planes: dict[str, int] | None = None
        if lsst_layout:
            mask_index, var_index = _find(hdul, "MASK"), _find(hdul, "VARIANCE")
            if mask_index is not None:
                mask = _pixels(hdul[mask_index], sl, np.int32, path, "mask")
                planes = _mask_planes(hdul[mask_index].header)
            if var_index is not None:
                variance = _pixels(hdul[var_index], sl, np.float32, path, "variance")
        else:
            for name in ("VARIANCE", "VAR"):
                index = _find(hdul, name)
                if index is not None and index != image_index:
                    variance = _pixels(hdul[index], sl, np.float32, path, "variance")
                    break
            else:
                index = _find(hdul, "ERR")
                if index is not None and index != image_index:
                    variance = np.square(_pixels(hdul[index], sl, np.float32, path, "error"))
        for part, what in ((mask, "mask"), (variance, "variance")):
            if part is not None and part.shape != image.shape:
                raise CorruptFileError(f"{path}: {what} shape {part.shape} differs from image shape {image.shape}")

        if str(primary.get("DPFORMAT", "")) == FITS_FORMAT_NAME:
            missing = [name for name in ("IMAGE", "MASK", "VARIANCE", META_EXTNAME) if name not in hdul]
            if missing:
                present = ", ".join(h.name for h in hdul)
                raise CorruptFileError(
                    f"{path}: a {FITS_FORMAT_NAME} file lacks HDU(s) {', '.join(missing)}; found {present} "
                    "(truncated at an HDU boundary?)"
                )
        if META_EXTNAME in hdul:
            kwargs = _diapipe_components(hdul[META_EXTNAME], path, full)
            if planes is not None:
                kwargs["mask_planes"] = planes
        else:
            header_values = {**primary, **image_header} if image_index != 0 else dict(image_header)
            kwargs = {
                "mask_planes": planes,
                "band": _band_from_header(header_values),
                "visit_info": _visit_info_from_header(header_values),
                "metadata": _header_metadata(primary, image_header) if image_index != 0 else _header_metadata(image_header),
            }
            fluxmag0 = _float(header_values, "FLUXMAG0")
            if fluxmag0 is not None and fluxmag0 > 0:
                kwargs["photo_calib"] = PhotoCalib(_NJY_MAG0 / fluxmag0)

    if not lsst_layout:
        bad = ~np.isfinite(image)
        if bad.any():
            no_data = 1 << (planes or DEFAULT_MASK_PLANES)["NO_DATA"]
            mask = np.where(bad, np.int32(no_data), np.int32(0)).astype(np.int32)
            if variance is None:
                variance = np.zeros(image.shape, np.float32)
            variance[bad] = np.nan
    try:
        return Exposure(image, mask, variance, xy0=(box.x0, box.y0), wcs=wcs, **kwargs)
    except DataModelError as exc:
        raise CorruptFileError(f"{path}: the file does not hold a valid exposure: {exc}") from None


def _diapipe_components(hdu: Any, path: Path, full: Box) -> dict[str, Any]:
    try:
        text = hdu.data["JSON"][0]
        text = text.decode("ascii") if isinstance(text, bytes) else str(text)
        meta = json.loads(text)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{path}: unreadable {META_EXTNAME} extension: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FITS_FORMAT_NAME:
        raise CorruptFileError(f"{path}: {META_EXTNAME} does not hold {FITS_FORMAT_NAME} metadata")
    version = meta.get("version")
    if not isinstance(version, int) or version > FITS_FORMAT_VERSION:
        raise FormatError(f"{path}: format version {version!r} is not supported (<= {FITS_FORMAT_VERSION})")
    if meta.get("bbox") != full.to_list():
        raise CorruptFileError(
            f"{path}: the image HDU covers {full}, but {META_EXTNAME} records bbox {meta.get('bbox')}"
        )
    return exposure_components_from_dict(meta, str(path))
