"""Source catalogs (astropy ``Table``) as Parquet files, written and read with pyarrow directly.

Why pyarrow rather than ``Table.write(format="parquet")``: astropy serializes the table metadata
as a YAML blob that it parses on every read, and converts columns one by one through its mixin
machinery; the direct route is faster for both (``benchmarks/bench_formats.py`` prints both) and
leaves a file any Parquet reader understands without astropy: units and descriptions are also
stored as per-field metadata (``unit``, ``description``).

What round-trips: column order, dtypes (bool, int8..int64, uint*, float32/64, fixed-width
strings and bytes, fixed-shape multi-dimensional columns), units, descriptions, masked columns
(Parquet nulls), and ``table.meta`` (JSON-able).  The exact numpy dtypes and shapes are recorded
in the schema metadata key ``diapipe`` so that, e.g., ``<U8`` stays ``<U8``.  Files are compressed
with Zstandard (~10% smaller than Snappy/LZ4 for a little more time), and dictionary encoding is
used for string columns only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy import units as u
from astropy.table import Column, MaskedColumn, Table

from ..errors import CorruptFileError, DataModelError, FormatError
from .atomic import atomic_file
from .json_io import to_jsonable

__all__ = ["write_catalog_parquet", "read_catalog_parquet", "PARQUET_FORMAT_NAME", "PARQUET_FORMAT_VERSION"]

_log = logging.getLogger(__name__)

PARQUET_FORMAT_NAME = "diapipe.catalog"
PARQUET_FORMAT_VERSION = 1
_META_KEY = b"diapipe"


def _to_arrow(name: str, column: Any) -> tuple[pa.Array, dict[str, Any]]:
    data = np.asarray(np.ma.getdata(column))
    mask = np.ma.getmaskarray(column) if isinstance(column, MaskedColumn) else None
    if data.dtype.kind not in "biufUS":
        raise DataModelError(f"catalog column {name!r} has dtype {data.dtype}, which Parquet cannot store here")
    info: dict[str, Any] = {"dtype": data.dtype.str, "shape": list(data.shape[1:])}
    if mask is not None:
        info["masked"] = True  # read back as a MaskedColumn even when nothing is masked
        if not mask.any():
            mask = None
    if data.dtype.kind in "biuf":
        data = data.astype(data.dtype.newbyteorder("="), copy=False)  # pyarrow wants native order
    flat = data.reshape(len(data), -1) if data.ndim > 1 else data
    if data.ndim > 1:
        width = flat.shape[1]
        values = pa.array(np.ascontiguousarray(flat).reshape(-1))
        array: pa.Array = pa.FixedSizeListArray.from_arrays(values, width)
        if mask is not None:  # Parquet nulls are per row: a row with any masked element is masked
            row_mask = mask.reshape(len(data), -1).any(axis=1)
            array = pa.FixedSizeListArray.from_arrays(values, width, mask=pa.array(row_mask))
        return array, info
    if data.dtype.kind == "U":
        return pa.array(data.tolist(), type=pa.string(), mask=mask), info
    if data.dtype.kind == "S":
        return pa.array(data.tolist(), type=pa.binary(), mask=mask), info
    return pa.array(data, mask=mask), info


def write_catalog_parquet(
    table: Table,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    compression: str = "zstd",
    fsync: bool = True,
) -> Path:
    """Write an astropy table to Parquet, atomically.

    Parameters
    ----------
    table : astropy.table.Table
        The catalog.  ``table.meta`` must be JSON-able.
    path : path-like
        Target file.
    overwrite : bool
        Replace an existing file.
    compression : str
        Parquet codec (``"zstd"``, ``"snappy"``, ``"none"``, ...).
    fsync : bool
        Make the file durable before publishing it (default).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    DataModelError
        A column of an unsupported type (object, mixins such as ``SkyCoord``/``Time``) or
        non-JSON-able ``meta``.
    FormatError
        ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if not isinstance(table, Table):
        raise DataModelError(f"write_catalog_parquet needs an astropy Table, got {type(table).__name__}")
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    columns_info: dict[str, Any] = {}
    for name in table.colnames:
        column = table[name]
        if not isinstance(column, Column):
            raise DataModelError(
                f"catalog column {name!r} is a {type(column).__name__}; store plain columns "
                "(e.g. coord_ra/coord_dec in degrees instead of a SkyCoord)"
            )
        array, info = _to_arrow(name, column)
        field_meta: dict[bytes, bytes] = {}
        if column.unit is not None:
            unit = column.unit.to_string()
            info["unit"] = unit
            field_meta[b"unit"] = unit.encode()
        if column.description:
            info["description"] = str(column.description)
            field_meta[b"description"] = str(column.description).encode()
        if column.format is not None and isinstance(column.format, str):
            info["format"] = column.format
        columns_info[name] = info
        arrays.append(array)
        fields.append(pa.field(name, array.type, nullable=info.get("masked", False), metadata=field_meta or None))
    meta = {
        "format": PARQUET_FORMAT_NAME,
        "version": PARQUET_FORMAT_VERSION,
        "meta": to_jsonable(dict(table.meta), "table.meta"),
        "columns": columns_info,
    }
    schema = pa.schema(fields, metadata={_META_KEY: json.dumps(meta, allow_nan=False).encode()})
    arrow_table = pa.Table.from_arrays(arrays, schema=schema)
    # Dictionary encoding only pays for strings; on float columns pyarrow tries it and falls back,
    # which doubled the write time of a 10^6-row catalog (benchmarks/bench_formats.py).
    text_columns = [f.name for f in fields if pa.types.is_string(f.type) or pa.types.is_binary(f.type)]
    with atomic_file(path, overwrite=overwrite, fsync=fsync) as tmp:
        pq.write_table(arrow_table, tmp, compression=compression, use_dictionary=text_columns or False)
    _log.debug("wrote %s (%d rows, %d columns)", path, len(table), len(table.colnames))
    return path


def _from_arrow(name: str, chunked: pa.ChunkedArray, info: dict[str, Any]) -> Column:
    array = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
    dtype = np.dtype(info["dtype"]) if "dtype" in info else None
    shape = tuple(info.get("shape") or ())
    nulls = array.null_count > 0
    mask = np.asarray(array.is_null()) if nulls else None
    if isinstance(array.type, pa.FixedSizeListType):
        values = array.flatten() if not nulls else array.fill_null([0] * array.type.list_size).flatten()
        data = values.to_numpy(zero_copy_only=False).reshape((len(array), *(shape or (array.type.list_size,))))
        if mask is not None:
            mask = np.broadcast_to(mask.reshape((-1,) + (1,) * (data.ndim - 1)), data.shape)
    elif pa.types.is_string(array.type) or pa.types.is_large_string(array.type) or pa.types.is_binary(array.type):
        items = array.to_pylist()
        fill = b"" if pa.types.is_binary(array.type) else ""
        data = np.array([fill if item is None else item for item in items], dtype=dtype if dtype is not None else None)
    else:
        if nulls:
            array = array.fill_null(False if pa.types.is_boolean(array.type) else 0)
        data = array.to_numpy(zero_copy_only=False)
    if dtype is not None and data.dtype != dtype:
        data = data.astype(dtype)
    kwargs = {
        "name": name,
        "unit": u.Unit(info["unit"], parse_strict="silent") if info.get("unit") else None,
        "description": info.get("description"),
        "format": info.get("format"),
    }
    if info.get("masked") or mask is not None:
        return MaskedColumn(data, mask=mask if mask is not None else False, **kwargs)
    return Column(data, copy=False, **kwargs)


def read_catalog_parquet(path: str | os.PathLike[str], columns: Sequence[str] | None = None) -> Table:
    """Read a catalog written by :func:`write_catalog_parquet` (or any flat Parquet file).

    Parameters
    ----------
    path : path-like
        The Parquet file.
    columns : sequence of str, optional
        Columns to read (only those are decoded); default all, in the stored order.

    Returns
    -------
    astropy.table.Table
        With units, descriptions, dtypes and ``meta`` as written.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CorruptFileError
        Not a Parquet file, truncated, or damaged.
    FormatError
        A requested column does not exist (the message lists the available ones).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such Parquet file: {path}")
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise CorruptFileError(f"{path}: not a readable Parquet file: {exc}") from None
    if columns is not None:
        columns = list(columns)
        unknown = [name for name in columns if name not in schema.names]
        if unknown:
            raise FormatError(f"{path}: no column(s) {unknown}; columns: {', '.join(schema.names)}")
    try:
        arrow_table = parquet.read(columns=columns)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise CorruptFileError(f"{path}: damaged Parquet data: {exc}") from None
    finally:
        parquet.close()

    raw = (schema.metadata or {}).get(_META_KEY)
    stored: dict[str, Any] = {}
    if raw is not None:
        try:
            stored = json.loads(raw)
        except ValueError as exc:
            raise CorruptFileError(f"{path}: damaged diapipe schema metadata: {exc}") from None
        if not isinstance(stored, dict) or stored.get("format") != PARQUET_FORMAT_NAME:
            raise CorruptFileError(f"{path}: schema metadata 'diapipe' is not {PARQUET_FORMAT_NAME} metadata")
        if int(stored.get("version", 0)) > PARQUET_FORMAT_VERSION:
            raise FormatError(f"{path}: catalog format version {stored.get('version')} is newer than supported")
    columns_info = stored.get("columns", {})
    table = Table(meta=stored.get("meta", {}))
    for name in arrow_table.column_names:
        info = dict(columns_info.get(name, {}))
        if not info:  # a foreign Parquet file: take unit/description from the field metadata
            field_meta = schema.field(name).metadata or {}
            if b"unit" in field_meta:
                info["unit"] = field_meta[b"unit"].decode()
            if b"description" in field_meta:
                info["description"] = field_meta[b"description"].decode()
        try:
            table.add_column(_from_arrow(name, arrow_table.column(name), info), copy=False)
        except (pa.ArrowInvalid, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path}: cannot convert column {name!r}: {exc}") from None
    return table
