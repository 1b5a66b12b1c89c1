"""Where a quantum's datasets are read from and written to.

- :class:`ButlerIO` writes files *and* registry rows (tests, single-process runs).
- :class:`DatastoreIO` writes files only (via ``butler.datastore.put``) and returns stored refs;
  the driver records them with ``butler.registry.insert_datasets`` — one registry writer.

Both read a predicted ref (``path is None``: written earlier in the same execution, maybe not yet
in the registry) at its deterministic datastore path, so workers never query the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from butler.errors import DatasetNotFoundError
from butler.refs import DatasetRef

if TYPE_CHECKING:
    from butler.butler import Butler

__all__ = ["QuantumIO", "ButlerIO", "DatastoreIO", "InputHandle"]


class QuantumIO(Protocol):
    """Storage behind a :class:`~pipeline.pipeline_task.ButlerQuantumContext`."""

    def get(self, ref: DatasetRef, parameters: Mapping[str, Any] | None = None) -> Any:
        """Read a dataset."""

    def get_deferred(self, ref: DatasetRef, parameters: Mapping[str, Any] | None = None) -> Any:
        """A handle that reads the dataset when its ``get()`` is called."""

    def put(self, obj: Any, ref: DatasetRef) -> DatasetRef:
        """Write a dataset for a predicted ref; returns the stored ref (same id, with ``path``)."""


class InputHandle:
    """A deferred input: ``get(parameters=...)`` reads it (LSST's DeferredDatasetHandle)."""

    def __init__(self, io: QuantumIO, ref: DatasetRef, parameters: Mapping[str, Any] | None = None) -> None:
        self.io = io
        self.ref = ref
        self.parameters = dict(parameters or {})

    @property
    def dataId(self) -> dict[str, Any]:  # noqa: N802 - LSST's name
        """The dataset's data ID."""
        return self.ref.data_id

    data_id = dataId

    def get(self, *, parameters: Mapping[str, Any] | None = None) -> Any:
        """Read the dataset (``parameters`` update those given at creation, e.g. ``{"bbox": box}``)."""
        return self.io.get(self.ref, {**self.parameters, **(parameters or {})})

    def __repr__(self) -> str:
        return f"InputHandle({self.ref!r})"


class DatastoreIO:
    """Reads and writes datastore files only; never touches the registry.

    Parameters
    ----------
    butler : Butler
        Gives the datastore (its root and formatter choices).
    """

    def __init__(self, butler: Butler) -> None:
        self.butler = butler
        self.datastore = butler.datastore

    def _stored(self, ref: DatasetRef) -> DatasetRef:
        if ref.path is not None:
            return ref
        stored = replace(ref, path=self.datastore.path_for(ref))
        if not self.datastore.exists(stored):
            raise DatasetNotFoundError(
                f"{ref} has not been written (no file at {stored.path}); did its producing quantum run?"
            )
        return stored

    def get(self, ref: DatasetRef, parameters: Mapping[str, Any] | None = None) -> Any:
        """Read a dataset (a predicted ref is read at its datastore path)."""
        return self.datastore.get(self._stored(ref), parameters)

    def get_deferred(self, ref: DatasetRef, parameters: Mapping[str, Any] | None = None) -> InputHandle:
        """A handle that reads the dataset later."""
        return InputHandle(self, ref, parameters)

    def put(self, obj: Any, ref: DatasetRef) -> DatasetRef:
        """Write the file; return the stored ref (same id) for the driver to register."""
        rel, _size = self.datastore.put(obj, ref)
        return replace(ref, path=rel)


class ButlerIO(DatastoreIO):
    """Like :class:`DatastoreIO`, but also records each written dataset in the registry."""

    def put(self, obj: Any, ref: DatasetRef) -> DatasetRef:
        """Write the file, then insert the registry row (the file is removed if that fails)."""
        stored = super().put(obj, ref)
        try:
            self.butler.registry.register_collection(ref.run, "RUN")
            self.butler.registry.insert_datasets([stored])
        except BaseException:
            self.datastore.remove([stored.path] if stored.path else [])
            raise
        return stored
