"""Exposures as Zarr v3 groups: the datastore's native exposure format.

Layout
------
::

    <path>/zarr.json        group metadata; attributes = everything that is not pixels (below)
    <path>/image/...        float32, chunks (chunk_size, chunk_size)
    <path>/mask/...         int32
    <path>/variance/...     float32

Group attributes (plain JSON): ``format`` (``"diapipe.exposure"``) and ``format_version``;
``bbox`` (``[x0, y0, width, height]`` in the parent frame); ``wcs`` (FITS keywords from
``wcs.to_header(relax=True)`` at full precision, SIP/TPV terms included, ``CRPIX`` in the *parent*
frame -- unlike FITS files, a Zarr group has no local array frame to be relative to) or ``null``;
``psf``, ``photo_calib``, ``visit_info``, ``band``, ``mask_planes``, ``metadata`` (see
:func:`butler.formats.json_io.exposure_components_to_dict`); and ``chunk_manifest``.

Codecs
------
Chosen per plane by measurement (``benchmarks/bench_formats.py``: 4096x4096 exposure with sky,
noise, stars, masked columns and cosmic rays; 1024x1024 chunks; one core):

- ``image``: noise-dominated floats barely compress (their low mantissa bits are random).
  Blosc-LZ4 with *bit* shuffle: 1.29x at ~0.5 GB/s encode, ~1.1 GB/s decode.  Byte shuffle is
  ~2x faster to decode but only 1.07x; plain Zstandard-1 gives 1.19x at 0.36/0.7 GB/s.
- ``mask``: mostly zeros: Blosc-LZ4 with byte shuffle, ~160x at ~5/7 GB/s.
- ``variance``: smooth (sky + source counts): Blosc-LZ4 with byte shuffle, ~22x at ~3/6 GB/s
  (bit shuffle: 10x and 3x slower).

The whole exposure takes 55.6 MB instead of 201 MB.  Every chunk also carries a CRC-32C (zarr's
``crc32c`` codec, hardware accelerated; a few ms per exposure), so a flipped bit or a truncated
chunk fails loudly instead of decoding to wrong pixels.  ``codec=`` selects a preset
(:data:`CODEC_PRESETS`): ``"blosc-lz4"`` (default, above), ``"blosc-zstd"`` (Zstandard-1 inside
Blosc: 2% smaller, slower to write), ``"zstd"`` (plain Zstandard level 1: 59.4 MB, slowest) or
``"none"`` (CRC only).

Missing chunks
--------------
Zarr reads a missing chunk file as the fill value, silently.  Chunks are therefore always written
(``write_empty_chunks=True``, empty mask chunks cost a few bytes), and ``chunk_manifest`` records,
per plane, the chunk grid and the size in bytes of every chunk file.  Before reading, the chunks a
read needs are ``stat``-ed (one system call each, no data read): a missing file or a size differing
from the manifest raises :class:`~butler.errors.CorruptFileError` naming the chunk.

Concurrency
-----------
Zarr runs every I/O on one event-loop thread and decodes/encodes chunks in a thread pool
(``threading.max_workers``; zarr's default is no bound of its own: asyncio's ``min(32, CPUs + 4)``
threads) with up to ``async.concurrency`` (default 10) chunks in flight per call.  Under Dask,
every worker thread's call then brings its own burst of codec threads.  On import this module
bounds both -- unless the user chose already (``ZARR_THREADING__MAX_WORKERS`` /
``ZARR_ASYNC__CONCURRENCY`` environment variables, or ``zarr.config.set``): one codec thread per CPU
(the pool is shared by all threads of the process, and a Dask thread calling zarr blocks while the
pool works, so CPU use stays at about one busy thread per core: 2 on the reference machine) and 4
chunks in flight (measured: as fast as 8 or 16, and less memory).  :func:`configure_zarr_concurrency`
changes them; zarr creates its pool at the first I/O after the setting and never resizes it.

Writes hand zarr one chunk-shaped piece at a time (all chunks of all planes gathered in one
coroutine under that bound): given a whole plane, zarr would ``np.full`` every chunk and copy the
data into it on its event-loop thread.  Reads go through ``get_basic_selection(out=...)`` into an
``np.empty`` array for the same reason.  What remains is zarr's design: its single event-loop
thread copies every decoded chunk into the output, which caps whole-exposure reads at about
1 GB/s here (see ``benchmarks/bench_formats.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from zarr.buffer.cpu import NDBuffer
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

# zarr's own bridge from sync code to its event loop (what zarr.Array uses internally): runs our
# write coroutine on zarr's loop with zarr's bounded codec pool.  Not in zarr's documented API;
# zarr is pinned to 3.1.x in pyproject.toml, and tests/butler/test_formats_zarr.py exercises it.
from zarr.core.sync import sync as zarr_sync

from ..errors import CorruptFileError, DataModelError, FormatError
from ..exposure import Exposure
from ..geometry import Box
from .atomic import atomic_directory
from .fits_exposure import wcs_from_header, wcs_to_header
from .json_io import exposure_components_from_dict, exposure_components_to_dict, to_jsonable

__all__ = [
    "write_exposure_zarr",
    "read_exposure_zarr",
    "configure_zarr_concurrency",
    "CODEC_PRESETS",
    "ZARR_FORMAT_NAME",
    "ZARR_FORMAT_VERSION",
]

_log = logging.getLogger(__name__)

ZARR_FORMAT_NAME = "diapipe.exposure"
ZARR_FORMAT_VERSION = 1

#: Planes and their on-disk dtypes.
PLANES: dict[str, np.dtype] = {
    "image": np.dtype(np.float32),
    "mask": np.dtype(np.int32),
    "variance": np.dtype(np.float32),
}

_REQUIRED_ATTRS = ("format", "format_version", "bbox", "wcs", "mask_planes", "chunk_manifest")


def _lz4(shuffle: str) -> list[Any]:
    return [BloscCodec(cname="lz4", clevel=5, shuffle=shuffle), Crc32cCodec()]


def _blosc_zstd(shuffle: str) -> list[Any]:
    return [BloscCodec(cname="zstd", clevel=1, shuffle=shuffle), Crc32cCodec()]


#: ``codec=`` presets: plane -> zarr bytes-to-bytes codecs (compressor, then CRC-32C).
CODEC_PRESETS: dict[str, dict[str, list[Any]]] = {
    "blosc-lz4": {"image": _lz4("bitshuffle"), "mask": _lz4("shuffle"), "variance": _lz4("shuffle")},
    "blosc-zstd": {
        "image": _blosc_zstd("bitshuffle"),
        "mask": _blosc_zstd("shuffle"),
        "variance": _blosc_zstd("shuffle"),
    },
    "zstd": {plane: [ZstdCodec(level=1), Crc32cCodec()] for plane in PLANES},
    "none": {plane: [Crc32cCodec()] for plane in PLANES},
}

#: Codec threads per CPU and chunks in flight per call (see the module docstring).
DEFAULT_MAX_WORKERS = max(1, os.cpu_count() or 1)
DEFAULT_CONCURRENCY = 4


def configure_zarr_concurrency(max_workers: int | None = None, concurrency: int | None = None) -> None:
    """Bound zarr's codec thread pool and its chunks in flight per call.

    Parameters
    ----------
    max_workers : int, optional
        Threads of zarr's codec pool (``threading.max_workers``); default one per CPU.  zarr
        creates its pool lazily, at the first I/O after this is set; an existing pool is not
        resized, so call this early (e.g. when a Dask worker starts).
    concurrency : int, optional
        Chunks processed concurrently by one read or write (``async.concurrency``); default 4.
    """
    zarr.config.set(
        {
            "threading.max_workers": int(max_workers or DEFAULT_MAX_WORKERS),
            "async.concurrency": int(concurrency or DEFAULT_CONCURRENCY),
        }
    )


_ZARR_DEFAULT_CONCURRENCY = 10  # zarr's own default for async.concurrency


def _configure_defaults() -> None:
    """Bound zarr's concurrency unless the user already chose (``ZARR_*`` variables or zarr.config)."""
    settings: dict[str, int] = {}
    if "ZARR_THREADING__MAX_WORKERS" not in os.environ and zarr.config.get("threading.max_workers") is None:
        settings["threading.max_workers"] = DEFAULT_MAX_WORKERS
    if (
        "ZARR_ASYNC__CONCURRENCY" not in os.environ
        and zarr.config.get("async.concurrency") == _ZARR_DEFAULT_CONCURRENCY
    ):
        settings["async.concurrency"] = DEFAULT_CONCURRENCY
    if settings:
        zarr.config.set(settings)
        _log.debug("bounded zarr concurrency: %s", settings)


_configure_defaults()


# --------------------------------------------------------------------------- writing
def _chunk_key(plane: str, iy: int, ix: int) -> str:
    # zarr v3 "default" chunk key encoding with "/" separator.
    return f"{plane}/c/{iy}/{ix}"


def _chunk_shape(shape: tuple[int, int], chunk_size: int) -> tuple[int, int]:
    return (max(1, min(chunk_size, shape[0])), max(1, min(chunk_size, shape[1])))


def _grid(shape: tuple[int, int], chunks: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // chunks[0]), -(-shape[1] // chunks[1]))


def write_exposure_zarr(
    exposure: Exposure,
    path: str | os.PathLike[str],
    *,
    chunk_size: int = 1024,
    codec: str = "blosc-lz4",
    overwrite: bool = False,
    fsync: bool = True,
) -> Path:
    """Write an exposure as a Zarr v3 group, atomically (written aside, then renamed into place).

    Parameters
    ----------
    exposure : Exposure
        The exposure (not modified).
    path : path-like
        Target directory of the group.
    chunk_size : int
        Chunk side in pixels (chunks are ``chunk_size x chunk_size``, clipped to the array).
        1024 (4 MiB float32 chunks) measured best for whole-exposure I/O; smaller chunks make
        small ``bbox`` reads cheaper.
    codec : str
        Compression preset, one of :data:`CODEC_PRESETS`.
    overwrite : bool
        Replace an existing group (or file) at ``path``.
    fsync : bool
        Make every file durable before publishing (default).

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    FormatError
        Unknown codec, bad chunk size, or ``path`` exists and ``overwrite`` is false.
    DataModelError
        Metadata that JSON cannot store.
    """
    path = Path(path)
    if not isinstance(exposure, Exposure):
        raise DataModelError(f"write_exposure_zarr needs an Exposure, got {type(exposure).__name__}")
    if codec not in CODEC_PRESETS:
        raise FormatError(f"unknown Zarr codec preset {codec!r}; choose one of {', '.join(CODEC_PRESETS)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise FormatError(f"chunk_size must be a positive number of pixels, got {chunk_size!r}")
    chunk_size = int(chunk_size)

    attrs: dict[str, Any] = {
        "format": ZARR_FORMAT_NAME,
        "format_version": ZARR_FORMAT_VERSION,
        "bbox": exposure.bbox.to_list(),
        "wcs": None if exposure.wcs is None else to_jsonable(dict(wcs_to_header(exposure.wcs)), "wcs"),
        **exposure_components_to_dict(exposure),
    }
    shape = exposure.shape
    chunks = _chunk_shape(shape, chunk_size)
    grid = _grid(shape, chunks)
    presets = CODEC_PRESETS[codec]

    with atomic_directory(path, overwrite=overwrite, fsync=fsync) as tmp:
        # One coroutine on zarr's event loop (and its bounded codec pool) writes every chunk of
        # every plane; see _write_planes for why chunk by chunk.
        zarr_sync(_write_planes(tmp, exposure, chunks, presets))
        n_chunks = grid[0] * grid[1] if shape[0] * shape[1] else 0
        attrs["chunk_manifest"] = {
            plane: {
                "chunks": list(chunks),
                "grid": list(grid),
                "chunk_bytes": [
                    os.stat(tmp / _chunk_key(plane, i // grid[1], i % grid[1])).st_size for i in range(n_chunks)
                ],
            }
            for plane in PLANES
        }
        group = zarr.open_group(store=zarr.storage.LocalStore(tmp), mode="r+", use_consolidated=False)
        group.attrs.update(attrs)
    _log.debug("wrote %s (%s, codec=%s, chunks=%s)", path, exposure, codec, chunks)
    return path


async def _write_planes(
    root: Path, exposure: Exposure, chunks: tuple[int, int], presets: Mapping[str, list[Any]]
) -> None:
    """Create the group and its three arrays, and write all chunks, at most ``async.concurrency`` at once.

    Writing ``array[...] = plane`` makes zarr allocate each chunk with ``np.full`` and copy the
    data into it, on its single event-loop thread; handing it chunk-shaped pieces skips both
    (measured ~15% faster writes on 4096x4096 exposures).
    """
    group = await zarr_async.create_group(store=zarr.storage.LocalStore(root), zarr_format=3)
    shape = exposure.shape
    limit = asyncio.Semaphore(int(zarr.config.get("async.concurrency")))
    failed = False
    jobs = []

    async def put(array: Any, selection: tuple[slice, slice], data: np.ndarray) -> None:
        nonlocal failed
        async with limit:
            if failed:  # another chunk failed: do not start new writes
                return
            try:
                await array.setitem(selection, data[selection])
            except BaseException:
                failed = True
                raise

    for plane, dtype in PLANES.items():
        array = await group.create_array(
            plane,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            compressors=presets[plane],
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        data = getattr(exposure, plane)
        for y in range(0, shape[0], chunks[0]):
            for x in range(0, shape[1], chunks[1]):
                jobs.append(put(array, (slice(y, y + chunks[0]), slice(x, x + chunks[1])), data))
    # Wait for *every* write to finish before reporting a failure: the caller then deletes the
    # temporary tree, which must not race with chunk files still being written by zarr's threads.
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


# --------------------------------------------------------------------------- reading
def _corrupt(path: Path, problem: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: {problem}")


def _check_attrs(attrs: Mapping[str, Any], path: Path) -> Box:
    missing = [key for key in _REQUIRED_ATTRS if key not in attrs]
    if "format" in attrs and attrs["format"] != ZARR_FORMAT_NAME:
        raise FormatError(f"{path}: a Zarr group of format {attrs['format']!r}, not a diapipe exposure")
    if missing:
        raise _corrupt(path, f"group attributes lack {', '.join(missing)} (not a complete diapipe exposure)")
    version = attrs["format_version"]
    if not isinstance(version, int) or version < 1:
        raise _corrupt(path, f"invalid format_version {version!r}")
    if version > ZARR_FORMAT_VERSION:
        raise FormatError(
            f"{path}: exposure format version {version} is newer than this diapipe reads "
            f"({ZARR_FORMAT_VERSION}); upgrade diapipe"
        )
    try:
        return Box.from_list(attrs["bbox"])
    except (DataModelError, TypeError) as exc:
        raise _corrupt(path, f"invalid bbox attribute {attrs['bbox']!r}: {exc}") from None


def _needed_chunks(sl: tuple[slice, slice], chunks: tuple[int, int]) -> list[tuple[int, int]]:
    rows, cols = sl
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return []
    return [
        (iy, ix)
        for iy in range(rows.start // chunks[0], (rows.stop - 1) // chunks[0] + 1)
        for ix in range(cols.start // chunks[1], (cols.stop - 1) // chunks[1] + 1)
    ]


def _check_array(array: Any, plane: str, entry: Any, full: Box, path: Path) -> tuple[int, int]:
    if not isinstance(array, zarr.Array):
        raise _corrupt(path, f"{plane!r} is a {type(array).__name__}, not an array")
    expected = PLANES[plane]
    if np.dtype(array.dtype) != expected:
        raise _corrupt(path, f"array {plane!r} has dtype {array.dtype}, expected {expected}")
    if tuple(array.shape) != full.shape:
        raise _corrupt(path, f"array {plane!r} has shape {tuple(array.shape)}, but bbox {full} needs {full.shape}")
    if not isinstance(entry, Mapping) or not {"chunks", "grid", "chunk_bytes"} <= set(entry):
        raise _corrupt(path, f"chunk_manifest has no valid entry for {plane!r}")
    chunks = tuple(array.chunks)
    if list(chunks) != list(entry["chunks"]) or list(_grid(full.shape, chunks)) != list(entry["grid"]):
        raise _corrupt(
            path, f"array {plane!r} has chunks {chunks}, the manifest records {entry['chunks']} / grid {entry['grid']}"
        )
    return chunks  # type: ignore[return-value]


def _verify_chunks(
    path: Path, plane: str, entry: Mapping[str, Any], needed: list[tuple[int, int]]
) -> None:
    grid = entry["grid"]
    sizes = entry["chunk_bytes"]
    if len(sizes) != grid[0] * grid[1] and needed:
        raise _corrupt(path, f"chunk_manifest for {plane!r} lists {len(sizes)} chunks, the grid has {grid[0] * grid[1]}")
    for iy, ix in needed:
        key = _chunk_key(plane, iy, ix)
        try:
            size = os.stat(path / key).st_size
        except FileNotFoundError:
            raise _corrupt(path, f"missing chunk file {key} (Zarr would silently read it as zeros)") from None
        expected = sizes[iy * grid[1] + ix]
        if size != expected:
            raise _corrupt(path, f"chunk file {key} has {size} bytes, {expected} were written (truncated or replaced)")


def read_exposure_zarr(path: str | os.PathLike[str], bbox: Box | None = None) -> Exposure:
    """Read an exposure written by :func:`write_exposure_zarr`.

    Parameters
    ----------
    path : path-like
        The group directory.
    bbox : Box, optional
        Parent-frame pixels to read; only the chunks overlapping it are read.  The returned
        exposure's ``xy0`` is ``bbox``'s origin.  Default: the whole exposure.

    Returns
    -------
    Exposure

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    FormatError
        ``bbox`` is not inside the exposure, or the group is not a diapipe exposure / too new.
    CorruptFileError
        Missing or garbage ``zarr.json``, a missing array, wrong dtype/shape/chunks, missing or
        incomplete attributes, a missing, truncated or damaged chunk.  The message names the path
        and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such Zarr exposure: {path}")
    if not (path / "zarr.json").is_file():
        raise _corrupt(path, "no zarr.json: not a Zarr v3 group (or an incomplete copy)")
    try:
        group = zarr.open_group(store=zarr.storage.LocalStore(path, read_only=True), mode="r", use_consolidated=False)
        attrs = group.attrs.asdict()
    except Exception as exc:  # JSONDecodeError, ValueError, KeyError, zarr's own errors ...
        raise _corrupt(path, f"unreadable group metadata (zarr.json): {type(exc).__name__}: {exc}") from None
    full = _check_attrs(attrs, path)
    if bbox is None:
        box = full
    else:
        if not isinstance(bbox, Box):
            raise FormatError(f"bbox must be a butler.geometry.Box, got {type(bbox).__name__}")
        if not full.contains(bbox):
            raise FormatError(
                f"{path}: bbox {bbox} is not inside the exposure's {full}; read bbox.intersection(...) instead"
            )
        box = bbox
    sl = box.slices(full)

    manifest = attrs["chunk_manifest"]
    if not isinstance(manifest, Mapping):
        raise _corrupt(path, "chunk_manifest attribute is not an object")
    pixels: dict[str, np.ndarray] = {}
    for plane in PLANES:
        if not (path / plane / "zarr.json").is_file():
            raise _corrupt(path, f"missing array {plane!r} (no {plane}/zarr.json)")
        try:
            array = group[plane]
        except Exception as exc:
            raise _corrupt(path, f"unreadable metadata of array {plane!r}: {type(exc).__name__}: {exc}") from None
        entry = manifest.get(plane)
        chunks = _check_array(array, plane, entry, full, path)
        _verify_chunks(path, plane, entry, _needed_chunks(sl, chunks))
        try:
            # Into a fresh np.empty: zarr would otherwise np.full() the output first (an extra pass).
            out = np.empty(box.shape, dtype=PLANES[plane])
            array.get_basic_selection(sl, out=NDBuffer.from_numpy_array(out))
            pixels[plane] = out
        except Exception as exc:  # checksum mismatch, codec errors on damaged chunks
            raise _corrupt(path, f"cannot decode array {plane!r}: {type(exc).__name__}: {exc}") from None

    where = str(path)
    kwargs = exposure_components_from_dict(attrs, where)
    wcs_header = attrs["wcs"]
    if wcs_header is not None and not isinstance(wcs_header, Mapping):
        raise _corrupt(path, "wcs attribute is not an object of FITS keywords")
    try:
        wcs = None if wcs_header is None else wcs_from_header(wcs_header, where=f"{path} (wcs attribute)")
    except FormatError as exc:
        raise _corrupt(path, str(exc)) from None
    if wcs_header is not None and wcs is None:
        raise _corrupt(path, "wcs attribute holds no celestial WCS")
    try:
        return Exposure(
            pixels["image"], pixels["mask"], pixels["variance"], xy0=(box.x0, box.y0), wcs=wcs, **kwargs
        )
    except DataModelError as exc:
        raise _corrupt(path, f"does not hold a valid exposure: {exc}") from None
