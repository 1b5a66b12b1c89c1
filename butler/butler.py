"""The Butler: one object to put, get and query the datasets of a repository.

A repository is a folder with ``butler.yaml``, the registry database (``registry.sqlite3`` by
default) and the datastore files.  The API follows today's ``lsst.daf.butler`` in snake_case.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .datastore import FileDatastore, storage_class, validate_run_name
from .dimensions import DataId, DimensionUniverse, default_universe
from .errors import (
    ButlerError,
    CollectionTypeError,
    DatasetExistsError,
    DatasetNotFoundError,
    NotARepositoryError,
)
from .refs import DatasetRef, DatasetType

if TYPE_CHECKING:
    from .registry.registry import Registry

__all__ = ["Butler", "DeferredDatasetHandle"]

_log = logging.getLogger(__name__)

CONFIG_NAME = "butler.yaml"
_DEFAULT_DB = "registry.sqlite3"


def _registry_class() -> type[Registry]:
    """:class:`Registry`, imported when a repository is first opened or created.

    Not with this module: SQLAlchemy was ~60% of importing the Butler class (~200 of ~330 ms,
    measured), which code that only names the class, or only uses a datastore, need not pay.
    """
    from .registry.registry import Registry

    return Registry


class DeferredDatasetHandle:
    """A dataset found now and read later with :meth:`get`."""

    def __init__(self, butler: Butler, ref: DatasetRef, parameters: Mapping[str, Any] | None) -> None:
        self.butler = butler
        self.ref = ref
        self.parameters = dict(parameters or {})

    @property
    def data_id(self) -> DataId:
        """The dataset's data ID."""
        return self.ref.data_id

    def get(self, *, parameters: Mapping[str, Any] | None = None) -> Any:
        """Read the dataset (``parameters`` update those given at creation)."""
        return self.butler.get(self.ref, parameters={**self.parameters, **(parameters or {})})


class Butler:
    """Access to a butler repository.

    Parameters
    ----------
    repo : str or Path
        Repository folder (holding ``butler.yaml``).
    collections : str or sequence of str, optional
        Default collections searched by get and queries.
    run : str, optional
        Default RUN collection for puts; created when missing.
    """

    def __init__(
        self,
        repo: str | Path,
        *,
        collections: str | Sequence[str] | None = None,
        run: str | None = None,
    ) -> None:
        self.root = Path(repo)
        config_path = self.root / CONFIG_NAME
        if not config_path.is_file():
            raise NotARepositoryError(
                f"{self.root} is not a butler repository (no {CONFIG_NAME}); create one with `butler create {self.root}`"
            )
        with open(config_path, encoding="utf-8") as stream:
            self.config: dict[str, Any] = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        db = self.config.get("registry", {}).get("db", _DEFAULT_DB)
        db_target = db if "://" in db else str(self.root / db)
        durability = self.config.get("durability", "process")
        self.datastore = FileDatastore(self.root, self.config.get("datastore", {}).get("formatters"), durability)
        self.registry: Registry = _registry_class().open(db_target, synchronous="FULL" if durability == "power" else "NORMAL")
        self.run = run
        if run is not None:
            self.registry.register_collection(run, "RUN")
        if collections is None:
            self.collections: list[str] = [run] if run else []
        else:
            self.collections = [collections] if isinstance(collections, str) else list(collections)

    # ------------------------------------------------------------------ creation
    @staticmethod
    def create(
        repo: str | Path,
        *,
        universe: DimensionUniverse | None = None,
        db: str | None = None,
        formatters: Mapping[str, str] | None = None,
        durability: str = "process",
        exist_ok: bool = False,
    ) -> Path:
        """Create a new repository folder and its registry.

        Parameters
        ----------
        repo : str or Path
            Folder to create (may exist if empty).
        db : str, optional
            Registry location: an SQLAlchemy URL; default an SQLite file in the folder.
        formatters : mapping, optional
            Storage class -> formatter overrides, e.g. ``{"Exposure": "fits"}``.
        durability : {"process", "power"}
            ``"process"`` (default): a put is all-or-nothing whatever happens to the writing
            process. ``"power"``: files, their directories and registry commits are also synced
            to disk, so completed puts survive an OS crash or power loss (~5 ms more per put
            on this kind of disk).
        exist_ok : bool
            Return quietly if a repository already exists there.
        """
        root = Path(repo)
        if (root / CONFIG_NAME).exists():
            if exist_ok:
                return root
            raise ButlerError(f"{root} is already a butler repository")
        if root.exists() and any(root.iterdir()):
            raise ButlerError(f"{root} exists and is not empty; choose a new folder")
        FileDatastore(root, formatters, durability)  # validate the settings before creating anything
        root.mkdir(parents=True, exist_ok=True)
        db_name = db or _DEFAULT_DB
        _registry_class().create(db_name if "://" in db_name else str(root / db_name), universe or default_universe()).close()
        config = {
            "registry": {"db": db_name},
            "datastore": {"formatters": dict(formatters or {})},
            "durability": durability,
        }
        tmp = root / f".{CONFIG_NAME}.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        tmp.replace(root / CONFIG_NAME)
        return root

    def close(self) -> None:
        """Release database connections."""
        self.registry.close()

    def __enter__(self) -> Butler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    @property
    def universe(self) -> DimensionUniverse:
        """The repository's dimension universe."""
        return self.registry.universe

    def _collections(self, collections: str | Sequence[str] | None) -> list[str]:
        if collections is None:
            if not self.collections:
                raise CollectionTypeError(
                    "no collections to search: pass collections=... or create the Butler with collections/run"
                )
            return self.collections
        return [collections] if isinstance(collections, str) else list(collections)

    @staticmethod
    def _merge(data_id: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        merged = dict(data_id or {})
        merged.update(kwargs)
        return merged

    # ------------------------------------------------------------------ dataset types and records
    def register_dataset_type(self, name: str, dimensions: Iterable[str], storage_class_name: str) -> bool:
        """Register a dataset type (name, dimensions, storage class); False if it already exists."""
        storage_class(storage_class_name)
        return self.registry.register_dataset_type(DatasetType(name, tuple(dimensions), storage_class_name))

    def insert_dimension_records(
        self, element: str, records: Iterable[Mapping[str, Any]], *, skip_existing: bool = False
    ) -> int:
        """Insert dimension records; see :meth:`Registry.insert_dimension_records`."""
        return self.registry.insert_dimension_records(element, records, skip_existing=skip_existing)

    def register_run(self, name: str, doc: str | None = None) -> bool:
        """Create a RUN collection (False if it exists)."""
        return self.registry.register_collection(name, "RUN", doc)

    def register_collection(self, name: str, type: str = "RUN", doc: str | None = None) -> bool:  # noqa: A002
        """Create a collection of type RUN, TAGGED or CHAINED."""
        return self.registry.register_collection(name, type, doc)

    def set_collection_chain(self, parent: str, children: Sequence[str]) -> None:
        """Create or redefine a CHAINED collection's search path."""
        self.registry.register_collection(parent, "CHAINED")
        self.registry.set_collection_chain(parent, children)

    # ------------------------------------------------------------------ put / get
    def put(
        self,
        obj: Any,
        dataset_type: str | DatasetType,
        data_id: Mapping[str, Any] | None = None,
        *,
        run: str | None = None,
        **kwargs: Any,
    ) -> DatasetRef:
        """Store an object as a dataset; returns its ref.

        The file is written completely (atomically) before the registry row is committed; if the
        registry insert fails (e.g. the dataset already exists) the new file is removed again.

        Raises
        ------
        DatasetExistsError
            A dataset of this type and data ID is already in the run.
        """
        run = run or self.run
        if run is None:
            raise CollectionTypeError("put needs a run: pass run=... or create the Butler with run=...")
        validate_run_name(run)
        name = dataset_type if isinstance(dataset_type, str) else dataset_type.name
        dt = self.registry.get_dataset_type(name)
        full_id = self.registry.expand_data_id(dt.dimensions, self._merge(data_id, kwargs), where=name)
        self.registry.register_collection(run, "RUN")
        # No existence check first: file names are unique per dataset id, so a conflicting put
        # cannot touch the existing file, and the registry's unique constraint rejects the row.
        ref = DatasetRef(dt, full_id, run)
        rel, _ = self.datastore.put(obj, ref)
        stored = DatasetRef(dt, full_id, run, ref.id, rel)
        try:
            self.registry.insert_datasets([stored])
        except BaseException:
            self.datastore.remove([rel])
            raise
        return stored

    def find_dataset(
        self,
        dataset_type: str | DatasetType,
        data_id: Mapping[str, Any] | None = None,
        *,
        collections: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> DatasetRef | None:
        """The ref a get would read, or None."""
        return self.registry.find_dataset(dataset_type, self._merge(data_id, kwargs), self._collections(collections))

    def _resolve(
        self,
        dataset_type: str | DatasetType | DatasetRef,
        data_id: Mapping[str, Any] | None,
        collections: str | Sequence[str] | None,
        kwargs: Mapping[str, Any],
    ) -> DatasetRef:
        if isinstance(dataset_type, DatasetRef):
            if dataset_type.path is None:
                found = self.registry.find_dataset(dataset_type.dataset_type, dataset_type.data_id, [dataset_type.run])
                if found is None:
                    raise DatasetNotFoundError(f"{dataset_type} is not stored in run {dataset_type.run!r}")
                return found
            return dataset_type
        colls = self._collections(collections)
        merged = self._merge(data_id, kwargs)
        ref = self.registry.find_dataset(dataset_type, merged, colls)
        if ref is None:
            name = dataset_type if isinstance(dataset_type, str) else dataset_type.name
            raise DatasetNotFoundError(
                f"no {name} with data ID {merged} in collections {colls}; "
                f"check the data ID and collections (butler query-datasets {self.root} {name})"
            )
        return ref

    def get(
        self,
        dataset_type: str | DatasetType | DatasetRef,
        data_id: Mapping[str, Any] | None = None,
        *,
        collections: str | Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Read a dataset by type and data ID (or by ref).

        Parameters
        ----------
        parameters : mapping, optional
            ``{"bbox": Box}`` reads a sub-image (only the chunks it needs, for Zarr);
            ``{"columns": [...]}`` reads some catalog columns.
        """
        ref = self._resolve(dataset_type, data_id, collections, kwargs)
        return self.datastore.get(ref, parameters)

    def get_deferred(
        self,
        dataset_type: str | DatasetType | DatasetRef,
        data_id: Mapping[str, Any] | None = None,
        *,
        collections: str | Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> DeferredDatasetHandle:
        """Find a dataset now; read it when the handle's ``get()`` is called."""
        return DeferredDatasetHandle(self, self._resolve(dataset_type, data_id, collections, kwargs), parameters)

    def exists(
        self,
        dataset_type: str | DatasetType | DatasetRef,
        data_id: Mapping[str, Any] | None = None,
        *,
        collections: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> bool:
        """True when the dataset is in the registry and its file is present."""
        try:
            ref = self._resolve(dataset_type, data_id, collections, kwargs)
        except DatasetNotFoundError:
            return False
        return self.datastore.exists(ref)

    def ingest(
        self,
        files: Sequence[str | Path],
        dataset_type: str,
        data_ids: Sequence[Mapping[str, Any]],
        *,
        run: str | None = None,
        transfer: str = "copy",
    ) -> list[DatasetRef]:
        """Ingest external files (e.g. FITS exposures) as datasets, one data ID per file.

        Every file is validated (read) first, so a bad file ingests nothing.
        """
        run = run or self.run
        if run is None:
            raise CollectionTypeError("ingest needs a run: pass run=...")
        if len(files) != len(data_ids):
            raise ButlerError(f"ingest got {len(files)} files but {len(data_ids)} data IDs")
        dt = self.registry.get_dataset_type(dataset_type)
        self.registry.register_collection(run, "RUN")
        refs = []
        for path, data_id in zip(files, data_ids, strict=True):
            full_id = self.registry.expand_data_id(dt.dimensions, data_id, where=f"{dataset_type} ({path})")
            if self.registry.find_dataset(dt, full_id, [run]) is not None:
                raise DatasetExistsError(f"{dataset_type} {data_id} already exists in run {run!r} (ingesting {path})")
            self.datastore.validate_external(Path(path), dt.storage_class)
            refs.append(DatasetRef(dt, full_id, run))
        stored = []
        try:
            for path, ref in zip(files, refs, strict=True):
                rel, _ = self.datastore.ingest(Path(path), ref, transfer)
                stored.append(DatasetRef(ref.dataset_type, ref.data_id, run, ref.id, rel))
            self.registry.insert_datasets(stored)
        except BaseException:
            if transfer != "move":
                self.datastore.remove([r.path for r in stored if r.path])
            raise
        return stored

    # ------------------------------------------------------------------ queries
    def query_datasets(
        self,
        dataset_type: str | DatasetType,
        *,
        collections: str | Sequence[str] | None = None,
        where: str | None = None,
        bind: Mapping[str, Any] | None = None,
        data_id: Mapping[str, Any] | None = None,
        find_first: bool = True,
        limit: int | None = None,
        **kwargs: Any,
    ) -> list[DatasetRef]:
        """Refs of one dataset type matching a data ID and a where expression."""
        return self.registry.query_datasets(
            dataset_type,
            self._collections(collections),
            where=where,
            bind=bind,
            data_id=self._merge(data_id, kwargs),
            find_first=find_first,
            limit=limit,
        )

    def query_data_ids(
        self,
        dimensions: str | Iterable[str],
        *,
        where: str | None = None,
        bind: Mapping[str, Any] | None = None,
        data_id: Mapping[str, Any] | None = None,
        datasets: str | Sequence[str] | None = None,
        collections: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[DataId]:
        """Data IDs of the dimensions that satisfy the constraints (spatial joins included)."""
        dims = [dimensions] if isinstance(dimensions, str) else list(dimensions)
        colls = self._collections(collections) if datasets else None
        return self.registry.query_data_ids(
            dims, where=where, bind=bind, data_id=self._merge(data_id, kwargs), datasets=datasets, collections=colls
        )

    def query_dimension_records(
        self,
        element: str,
        *,
        where: str | None = None,
        bind: Mapping[str, Any] | None = None,
        data_id: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Records of a dimension element."""
        return self.registry.query_dimension_records(
            element, where=where, bind=bind, data_id=self._merge(data_id, kwargs)
        )

    def query_collections(self, pattern: str = "*", types: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """``(name, type)`` of collections matching a glob pattern."""
        return self.registry.query_collections(pattern, types)

    def query_dataset_types(self, pattern: str = "*") -> list[DatasetType]:
        """Registered dataset types matching a glob pattern."""
        return self.registry.query_dataset_types(pattern)

    def remove_runs(self, names: Sequence[str]) -> int:
        """Delete RUN collections, their datasets and files; returns the number of files removed."""
        paths = self.registry.remove_runs(names)
        self.datastore.remove(paths)
        return len(paths)
