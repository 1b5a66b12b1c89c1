"""The file datastore: where each dataset's file lives and which formatter reads and writes it.

Paths are built from the run, the dataset type and the data ID::

    {run}/{dataset_type}/{first key values...}/{dataset_type}_{all key values}_{id prefix}.{ext}

Every value that goes into a path is validated (no separators, no ``..``, no NUL).  Writes are
atomic (written aside, synced, renamed into place by the formatter), and the registry row is
written by the caller only after the file is complete.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CollectionTypeError, DataIdError, FormatError, UnknownStorageClassError
from .refs import DatasetRef

__all__ = [
    "DURABILITY_LEVELS",
    "StorageClass",
    "STORAGE_CLASSES",
    "FileDatastore",
    "validate_run_name",
    "formatter_for_path",
]

_log = logging.getLogger(__name__)

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-~]*$")


def validate_run_name(name: str) -> str:
    """Check a collection name that may become a path: ``/``-separated safe components.

    Raises
    ------
    CollectionTypeError
        With what is wrong and what is allowed.
    """
    if not isinstance(name, str) or not name:
        raise CollectionTypeError(f"collection names must be non-empty strings, got {name!r}")
    for part in name.split("/"):
        if not part or part in (".", "..") or not _SAFE_COMPONENT.match(part):
            raise CollectionTypeError(
                f"invalid collection name {name!r}: each '/'-separated part must be non-empty, not '.' or "
                "'..', and use only letters, digits and _ . + - ~ (not starting with . + - or ~)"
            )
    return name


@dataclass(frozen=True)
class StorageClass:
    """How a kind of in-memory object is stored.

    Attributes
    ----------
    name : str
    python_type : str
        Dotted name of the Python type accepted by put (checked lazily, by name).
    formatters : tuple of str
        Allowed formatter names; the first is the default.
    """

    name: str
    python_type: str
    formatters: tuple[str, ...]


#: Storage class name -> definition.
STORAGE_CLASSES: Mapping[str, StorageClass] = {
    sc.name: sc
    for sc in [
        StorageClass("Exposure", "butler.exposure.Exposure", ("zarr", "fits")),
        StorageClass("SourceCatalog", "astropy.table.Table", ("parquet",)),
        StorageClass("ArrowAstropy", "astropy.table.Table", ("parquet",)),
        StorageClass("SkyMap", "butler.skymap.SkyMap", ("json",)),
        StorageClass("Psf", "butler.psf.Psf", ("json",)),
        StorageClass("StructuredDataDict", "builtins.dict", ("json", "yaml")),
        StorageClass("TaskMetadata", "builtins.dict", ("json",)),
        StorageClass("Config", "builtins.dict", ("yaml", "json")),
    ]
}

#: Durability levels of a repository (see :class:`FileDatastore`).
DURABILITY_LEVELS = ("process", "power")

_EXTENSIONS = {"zarr": ".zarr", "fits": ".fits", "parquet": ".parquet", "json": ".json", "yaml": ".yaml"}


def storage_class(name: str) -> StorageClass:
    """A storage class by name; unknown names raise with the list of known ones."""
    try:
        return STORAGE_CLASSES[name]
    except KeyError:
        raise UnknownStorageClassError(
            f"unknown storage class {name!r}; known: {', '.join(STORAGE_CLASSES)}"
        ) from None


@functools.cache
def _python_type(dotted_name: str) -> type:
    module_name, _, type_name = dotted_name.rpartition(".")
    return getattr(importlib.import_module(module_name), type_name)


def _check_type(obj: Any, sc: StorageClass, where: str) -> None:
    if not isinstance(obj, _python_type(sc.python_type)):
        raise FormatError(f"{where}: storage class {sc.name} stores {sc.python_type}, got {type(obj).__name__}")


def formatter_for_path(path: str | Path) -> str:
    """Formatter name from a file's extension."""
    suffix = Path(path).suffix.lower()
    for name, ext in _EXTENSIONS.items():
        if suffix == ext or (name == "fits" and suffix in (".fit", ".fz")):
            return name
    raise FormatError(f"{path}: no formatter reads files ending in {suffix!r}")


def _write(formatter: str, obj: Any, sc: StorageClass, path: Path, fsync: bool) -> None:
    if formatter == "zarr":
        from .formats.zarr_exposure import write_exposure_zarr

        write_exposure_zarr(obj, path, fsync=fsync)
    elif formatter == "fits":
        from .formats.fits_exposure import write_exposure_fits

        write_exposure_fits(obj, path, fsync=fsync)
    elif formatter == "parquet":
        from .formats.parquet_catalog import write_catalog_parquet

        write_catalog_parquet(obj, path, fsync=fsync)
    elif formatter == "json":
        from .formats.json_io import write_json

        data = obj.to_dict() if sc.name in ("SkyMap", "Psf") else obj
        write_json(data, path, fsync=fsync)
    elif formatter == "yaml":
        from .formats.json_io import write_yaml

        write_yaml(obj, path, fsync=fsync)
    else:  # pragma: no cover - guarded by the storage class table
        raise FormatError(f"unknown formatter {formatter!r}")


def _read(formatter: str, sc_name: str, path: Path, parameters: Mapping[str, Any]) -> Any:
    unknown = set(parameters) - {"bbox", "columns"}
    if unknown:
        raise FormatError(f"{path}: unknown read parameter(s) {sorted(unknown)}; supported: bbox, columns")
    if formatter == "zarr":
        from .formats.zarr_exposure import read_exposure_zarr

        return read_exposure_zarr(path, bbox=parameters.get("bbox"))
    if formatter == "fits":
        from .formats.fits_exposure import read_exposure_fits

        exposure = read_exposure_fits(path)
        bbox = parameters.get("bbox")
        return exposure.subexposure(bbox, deep=True) if bbox is not None else exposure
    if formatter == "parquet":
        from .formats.parquet_catalog import read_catalog_parquet

        return read_catalog_parquet(path, columns=parameters.get("columns"))
    if formatter == "json":
        from .formats.json_io import read_json

        data = read_json(path)
        if sc_name == "SkyMap":
            from .skymap import SkyMap

            return SkyMap.from_config(data)
        if sc_name == "Psf":
            from .psf import psf_from_dict

            return psf_from_dict(data)
        return data
    if formatter == "yaml":
        from .formats.json_io import read_yaml

        return read_yaml(path)
    raise FormatError(f"unknown formatter {formatter!r}")  # pragma: no cover


class FileDatastore:
    """Files under a repository root.

    Parameters
    ----------
    root : Path
        Repository root.
    formatters : mapping of str to str, optional
        Storage class name -> formatter name overriding the defaults (``{"Exposure": "fits"}``).
    durability : {"process", "power"}
        ``"process"``: files appear complete or not at all, whatever happens to the writing
        process (written aside, renamed into place). ``"power"``: also fsync each file and its
        directory, so that a completed put survives an operating-system crash or power loss.
    """

    def __init__(
        self, root: Path, formatters: Mapping[str, str] | None = None, durability: str = "process"
    ) -> None:
        if durability not in DURABILITY_LEVELS:
            raise FormatError(f"unknown durability {durability!r}; choose one of {DURABILITY_LEVELS}")
        self.root = Path(root)
        self.fsync = durability == "power"
        self.formatters: dict[str, str] = {}
        for sc_name, formatter in (formatters or {}).items():
            sc = storage_class(sc_name)
            if formatter not in sc.formatters:
                raise FormatError(f"storage class {sc_name} cannot use formatter {formatter!r}; choose from {sc.formatters}")
            self.formatters[sc_name] = formatter

    def formatter_for(self, storage_class_name: str) -> str:
        """The formatter used to write a storage class."""
        return self.formatters.get(storage_class_name) or storage_class(storage_class_name).formatters[0]

    def path_for(self, ref: DatasetRef, formatter: str | None = None) -> str:
        """Relative path of a dataset's file (posix separators)."""
        validate_run_name(ref.run)
        values = []
        for key in ref.dataset_type.dimensions:
            text = str(ref.data_id[key])
            if not _SAFE_COMPONENT.match(text.replace(" ", "_")) or text in (".", ".."):
                raise DataIdError(f"data ID value {text!r} ({key}) cannot be used in a file path")
            values.append(text.replace(" ", "_"))
        fmt = formatter or self.formatter_for(ref.dataset_type.storage_class)
        # The dataset id ends the name, so two puts of one data ID never write the same file.
        stem = "_".join([ref.dataset_type.name, *values, ref.id[:12]])
        dirs = [ref.run, ref.dataset_type.name, *values[:-1]]
        return "/".join([*dirs, stem + _EXTENSIONS[fmt]])

    def put(self, obj: Any, ref: DatasetRef) -> tuple[str, int]:
        """Write a dataset's file atomically; returns the relative path and its size in bytes."""
        sc = storage_class(ref.dataset_type.storage_class)
        _check_type(obj, sc, f"put of {ref.dataset_type.name}")
        fmt = self.formatter_for(sc.name)
        rel = self.path_for(ref, fmt)
        target = self.root / rel  # the atomic writers create missing parent folders
        try:
            _write(fmt, obj, sc, target, self.fsync)
        except BaseException:
            # The registry does not know this path yet, so nothing else can refer to it.
            self._remove_path(target)
            raise
        return rel, _size(target)

    def get(self, ref: DatasetRef, parameters: Mapping[str, Any] | None = None) -> Any:
        """Read a stored dataset."""
        if ref.path is None:
            raise FormatError(f"{ref} has no stored file")
        path = self.root / ref.path
        return _read(formatter_for_path(path), ref.dataset_type.storage_class, path, parameters or {})

    def exists(self, ref: DatasetRef) -> bool:
        """True when the dataset's file is present."""
        return ref.path is not None and (self.root / ref.path).exists()

    def validate_external(self, source: Path, storage_class_name: str) -> None:
        """Read an external file once so that a bad file is rejected before anything is ingested."""
        source = Path(source)
        if not source.is_file():
            raise FormatError(f"cannot ingest {source}: no such file")
        _read(formatter_for_path(source), storage_class_name, source, {})

    def ingest(self, source: Path, ref: DatasetRef, transfer: str = "copy") -> tuple[str, int]:
        """Bring an external file into the datastore under the dataset's path.

        Parameters
        ----------
        transfer : {"copy", "move", "symlink", "hardlink"}
        """
        source = Path(source)
        if not source.is_file():
            raise FormatError(f"cannot ingest {source}: no such file")
        fmt = formatter_for_path(source)
        rel = self.path_for(ref, fmt)
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.ingest-{os.getpid()}")
        try:
            if transfer == "copy":
                shutil.copyfile(source, tmp)
                if self.fsync:
                    with open(tmp, "rb") as stream:
                        os.fsync(stream.fileno())
            elif transfer == "move":
                shutil.move(str(source), tmp)
            elif transfer == "symlink":
                os.symlink(source.resolve(), tmp)
            elif transfer == "hardlink":
                os.link(source, tmp)
            else:
                raise FormatError(f"unknown transfer mode {transfer!r}; use copy, move, symlink or hardlink")
            os.replace(tmp, target)
        finally:
            if tmp.exists() or tmp.is_symlink():
                tmp.unlink()
        return rel, _size(target)

    def remove(self, rel_paths: list[str]) -> None:
        """Delete files (missing ones are ignored) and empty parent folders up to the root."""
        for rel in rel_paths:
            path = self.root / rel
            self._remove_path(path)
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    @staticmethod
    def _remove_path(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _size(path: Path) -> int:
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return info.st_size

