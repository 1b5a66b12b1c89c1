"""JSON documents on disk, and the plain-data encodings of small data-model objects.

Files are written atomically (see :mod:`butler.formats.atomic`) as UTF-8 JSON.  Strict JSON only:
``NaN``/``Infinity`` are refused on write (they are not JSON and other readers choke on them) and a
file that does not parse raises :class:`~butler.errors.CorruptFileError` with the line and column.

Besides the generic :func:`write_json` / :func:`read_json`, this module defines

- a small *document* envelope, ``{"format": <kind>, "version": <int>, "data": {...}}``, with
  :func:`write_document` / :func:`read_document`, and thin wrappers for the documents the butler
  stores as JSON: skymaps (anything with ``to_dict()``; rebuilt by the caller with
  ``SkyMap.from_config``), PSF models and task configs;
- :func:`to_jsonable`, which turns numpy scalars/arrays and tuples into JSON types and rejects
  everything else with the offending key path;
- :func:`exposure_components_to_dict` / :func:`exposure_components_from_dict`: the JSON form of an
  exposure's non-pixel components (PSF, calibration, visit info, band, mask planes, metadata),
  shared by the Zarr and FITS exposure formats.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import CorruptFileError, DataModelError, FormatError
from .atomic import atomic_write_bytes

if TYPE_CHECKING:
    from ..exposure import Exposure
    from ..psf import Psf

__all__ = [
    "write_json",
    "read_json",
    "write_document",
    "read_document",
    "write_skymap_json",
    "read_skymap_json",
    "write_psf_json",
    "read_psf_json",
    "write_config_json",
    "read_config_json",
    "to_jsonable",
    "exposure_components_to_dict",
    "exposure_components_from_dict",
]

_log = logging.getLogger(__name__)

#: Envelope names of the documents written by the helpers below.
SKYMAP_FORMAT = "diapipe.skymap"
PSF_FORMAT = "diapipe.psf"
CONFIG_FORMAT = "diapipe.config"


class _HasToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- plain-data conversion
def to_jsonable(value: Any, where: str = "value") -> Any:
    """A copy of ``value`` made only of JSON types (dict with str keys, list, str, int, float, bool, None).

    numpy scalars become Python numbers, numpy arrays and tuples become lists.

    Parameters
    ----------
    value : object
        The data to convert.
    where : str
        Name of ``value`` used in error messages (e.g. ``"metadata"``).

    Raises
    ------
    DataModelError
        A float is NaN or infinite, a key is not a string, or a value has no JSON form; the
        message gives the key path (e.g. ``metadata['seeing'][2]``).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            raise DataModelError(
                f"{where} is {number}, which JSON cannot store; use None for a missing value"
            )
        return number
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise DataModelError(f"{where} has a non-string key {key!r}; JSON keys are strings")
            out[key] = to_jsonable(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        return [to_jsonable(item, f"{where}[{i}]") for i, item in enumerate(items)]
    raise DataModelError(f"{where} has type {type(value).__name__}, which has no JSON form")


def _dumps(obj: Any, where: str, indent: int | None) -> bytes:
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):
        # Convert to pinpoint the offending key (to_jsonable raises with the key path).
        text = json.dumps(to_jsonable(obj, where), indent=indent, allow_nan=False, ensure_ascii=False)
    return text.encode("utf-8")


# --------------------------------------------------------------------------- files
def write_json(
    obj_dict: Any,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    indent: int | None = 2,
    fsync: bool = True,
) -> Path:
    """Write JSON-able data to ``path`` atomically.

    Parameters
    ----------
    obj_dict : dict (or any JSON-able value)
        The data; numpy scalars and tuples are accepted and converted.
    path : path-like
        Target file.
    overwrite : bool
        Replace an existing file.
    indent : int or None
        Pretty-printing indent; ``None`` for the most compact form.
    fsync : bool
        Sync the file and its directory before returning (durable across power loss).

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    DataModelError
        The data are not JSON-able (the message names the key).
    FormatError
        ``path`` exists and ``overwrite`` is false.
    """
    path = path if isinstance(path, Path) else Path(path)
    data = _dumps(obj_dict, path.name, indent)
    return atomic_write_bytes(path, data, overwrite=overwrite, fsync=fsync)


def write_yaml(obj: Any, path: str | os.PathLike[str], *, overwrite: bool = False, fsync: bool = True) -> Path:
    """Write plain data (a dict, or a model with ``to_dict()``) as YAML, atomically.

    Raises
    ------
    DataModelError
        The data are not JSON-able (YAML here holds the same plain data as JSON).
    """
    import yaml

    path = Path(path)
    plain = to_jsonable(obj.to_dict() if hasattr(obj, "to_dict") else obj, path.name)
    text = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite, fsync=fsync)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file written by :func:`write_yaml` (safe loader: plain data only).

    Raises
    ------
    CorruptFileError
        The file is not valid YAML; the message gives the line and column.
    """
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise CorruptFileError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CorruptFileError
        The file is not UTF-8 or not valid JSON; the message gives the file, line and column.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (the file is empty)" if not text.strip() else ""
        raise CorruptFileError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}"
        ) from None


# --------------------------------------------------------------------------- documents
def write_document(
    kind: str,
    data: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    version: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write ``{"format": kind, "version": version, "data": data}`` atomically.

    Parameters
    ----------
    kind : str
        Document type, e.g. ``"diapipe.skymap"``; checked by :func:`read_document`.
    data : mapping
        JSON-able payload.
    path : path-like
        Target file.
    version : int
        Version of the payload's schema.
    overwrite : bool
        Replace an existing file.
    """
    if not isinstance(data, Mapping):
        raise DataModelError(f"a {kind} document must hold a mapping, got {type(data).__name__}")
    return write_json({"format": kind, "version": int(version), "data": dict(data)}, path, overwrite=overwrite)


def read_document(path: str | os.PathLike[str], kind: str, *, max_version: int = 1) -> dict[str, Any]:
    """Read a document written by :func:`write_document` and return its payload.

    Raises
    ------
    CorruptFileError
        Invalid JSON, or not an envelope (``format``, ``version``, ``data`` keys).
    FormatError
        The document is of another kind, or newer than ``max_version``.
    """
    path = Path(path)
    doc = read_json(path)
    if not isinstance(doc, dict) or not {"format", "version", "data"} <= set(doc):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise CorruptFileError(
            f"{path}: not a diapipe document (expected keys 'format', 'version', 'data'; found {found})"
        )
    if doc["format"] != kind:
        raise FormatError(f"{path}: holds a {doc['format']!r} document, expected {kind!r}")
    version = doc["version"]
    if not isinstance(version, int) or version < 1:
        raise CorruptFileError(f"{path}: invalid document version {version!r}")
    if version > max_version:
        raise FormatError(
            f"{path}: {kind} version {version} is newer than this diapipe reads ({max_version}); upgrade diapipe"
        )
    if not isinstance(doc["data"], dict):
        raise CorruptFileError(f"{path}: the 'data' of a {kind} document must be an object")
    return doc["data"]


def _as_dict(obj: _HasToDict | Mapping[str, Any], what: str) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    to_dict = getattr(obj, "to_dict", None)
    if to_dict is None:
        raise DataModelError(f"cannot serialize a {what} of type {type(obj).__name__}: it has no to_dict()")
    return to_dict()


def write_skymap_json(
    skymap: _HasToDict | Mapping[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a skymap definition (an object with ``to_dict()``, or that dict) as a JSON document."""
    return write_document(SKYMAP_FORMAT, _as_dict(skymap, "skymap"), path, overwrite=overwrite)


def read_skymap_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The skymap config dict stored by :func:`write_skymap_json` (pass it to ``SkyMap.from_config``)."""
    return read_document(path, SKYMAP_FORMAT)


def write_psf_json(psf: Psf, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a PSF model (``psf.to_dict()``) as a JSON document."""
    return write_document(PSF_FORMAT, _as_dict(psf, "PSF"), path, overwrite=overwrite)


def read_psf_json(path: str | os.PathLike[str]) -> Psf:
    """Read a PSF model written by :func:`write_psf_json`.

    Raises
    ------
    CorruptFileError
        The file is not a valid PSF document (the message includes the PSF error).
    """
    from ..errors import PsfError
    from ..psf import psf_from_dict

    data = read_document(path, PSF_FORMAT)
    try:
        return psf_from_dict(data)
    except PsfError as exc:
        raise CorruptFileError(f"{path}: invalid PSF: {exc}") from None


def write_config_json(
    config: _HasToDict | Mapping[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a task configuration (a dict, or an object with ``to_dict()``) as a JSON document."""
    return write_document(CONFIG_FORMAT, _as_dict(config, "config"), path, overwrite=overwrite)


def read_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The configuration dict stored by :func:`write_config_json`."""
    return read_document(path, CONFIG_FORMAT)


# --------------------------------------------------------------------------- exposure components
def exposure_components_to_dict(exposure: Exposure) -> dict[str, Any]:
    """The JSON form of an exposure's non-pixel, non-WCS components.

    Keys: ``psf``, ``photo_calib``, ``visit_info`` (each ``None`` when absent), ``band``,
    ``mask_planes`` and ``metadata``.

    Raises
    ------
    DataModelError
        ``metadata`` is not JSON-able (the message names the key).
    """
    return {
        "psf": None if exposure.psf is None else to_jsonable(exposure.psf.to_dict(), "psf"),
        "photo_calib": None if exposure.photo_calib is None else exposure.photo_calib.to_dict(),
        "visit_info": None if exposure.visit_info is None else to_jsonable(exposure.visit_info.to_dict(), "visit_info"),
        "band": exposure.band,
        "mask_planes": {name: int(bit) for name, bit in exposure.mask_planes.items()},
        "metadata": to_jsonable(exposure.metadata, "metadata"),
    }


def exposure_components_from_dict(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Inverse of :func:`exposure_components_to_dict`: keyword arguments for ``Exposure(...)``.

    Parameters
    ----------
    data : mapping
        The stored components; missing optional keys mean "absent".
    where : str
        Names the file in error messages.

    Raises
    ------
    CorruptFileError
        A component is malformed (the message names it and includes the underlying error).
    """
    from ..errors import ButlerError
    from ..exposure import PhotoCalib, VisitInfo
    from ..masks import validate_planes
    from ..psf import psf_from_dict

    out: dict[str, Any] = {}
    component = "psf"
    try:
        psf = data.get("psf")
        out["psf"] = None if psf is None else psf_from_dict(psf)
        component = "photo_calib"
        calib = data.get("photo_calib")
        out["photo_calib"] = None if calib is None else PhotoCalib.from_dict(calib)
        component = "visit_info"
        visit = data.get("visit_info")
        out["visit_info"] = None if visit is None else VisitInfo.from_dict(visit)
        component = "band"
        band = data.get("band")
        if band is not None and not isinstance(band, str):
            raise DataModelError(f"band must be a string or null, got {band!r}")
        out["band"] = band
        component = "mask_planes"
        planes = data.get("mask_planes")
        if planes is not None:
            if not isinstance(planes, Mapping):
                raise DataModelError(f"mask_planes must be an object, got {type(planes).__name__}")
            out["mask_planes"] = validate_planes(planes)
        component = "metadata"
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise DataModelError(f"metadata must be an object, got {type(metadata).__name__}")
        out["metadata"] = dict(metadata)
    except (ButlerError, KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{where}: invalid {component}: {exc}") from None
    return out
