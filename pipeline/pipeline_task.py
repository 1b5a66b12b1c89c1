"""``PipelineTask`` and ``ButlerQuantumContext``: a task that reads and writes datasets per quantum.

``run(**inputs) -> Struct`` is the algorithm, pure and testable without a butler;
``runQuantum(butlerQC, inputRefs, outputRefs)`` reads the inputs, calls ``run`` and writes the
outputs.  The context only allows the quantum's declared refs: reading or writing anything else
raises :class:`~pipeline.errors.InvalidQuantumError`.

Storage is pluggable (:class:`~pipeline.quantum_io.QuantumIO`): a full butler for tests and
single-process runs, or datastore-only writes for workers (the driver then records
:attr:`ButlerQuantumContext.outputs_written` in the registry).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from butler.refs import DatasetRef

from .config import Config, Field
from .errors import InvalidQuantumError
from .struct import Struct
from .task import Task

if TYPE_CHECKING:
    from .connections import PipelineTaskConnections
    from .graph import Quantum
    from .quantum_io import QuantumIO

__all__ = [
    "PipelineTaskConfig",
    "PipelineTask",
    "QuantizedConnection",
    "InputQuantizedConnection",
    "OutputQuantizedConnection",
    "ButlerQuantumContext",
    "QuantumContext",
]


class PipelineTaskConfig(Config):
    """Base config of pipeline tasks; subclass with ``pipelineConnections=MyConnections``."""

    ConnectionsClass: ClassVar[type | None] = None
    saveMetadata: bool = Field(True, description="Write the task metadata as the {label}_metadata dataset")


class PipelineTask(Task):
    """A task run by the pipeline framework, once per quantum.

    Parameters
    ----------
    config : PipelineTaskConfig, optional
    log : logging.Logger, optional
    initInputs : dict, optional
        ``{init-input connection name: object}`` read before the task is built.
    **kwargs
        Passed to :class:`~pipeline.task.Task` (``name``, ...).
    """

    ConfigClass: ClassVar[type[Config]] = PipelineTaskConfig
    canMultiprocess: ClassVar[bool] = True

    def __init__(
        self,
        *,
        config: Config | None = None,
        log: Any = None,
        initInputs: Mapping[str, Any] | None = None,  # noqa: N803
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, log=log, **kwargs)

    def run(self, **kwargs: Any) -> Struct:
        """The algorithm: inputs (by connection name) in, a Struct of outputs (by connection name) out."""
        raise NotImplementedError(f"{type(self).__name__} must implement run()")

    def runQuantum(  # noqa: N802
        self,
        butlerQC: ButlerQuantumContext,  # noqa: N803
        inputRefs: InputQuantizedConnection,  # noqa: N803
        outputRefs: OutputQuantizedConnection,  # noqa: N803
    ) -> None:
        """Read the inputs, call :meth:`run`, write the outputs (override for more control)."""
        inputs = butlerQC.get(inputRefs)
        outputs = self.run(**inputs)
        butlerQC.put(outputs, outputRefs)

    def getInitOutputDatasets(self) -> dict[str, Any]:  # noqa: N802
        """``{init-output connection name: object}``: attributes of the task named like its
        init-output connections (set them in ``__init__``).

        Raises
        ------
        InvalidQuantumError
            If the task did not set one of them.
        """
        connections_class = getattr(self.config, "ConnectionsClass", None)
        if connections_class is None:
            return {}
        connections = connections_class(config=self.config)
        out = {}
        for name in connections.connections_of("initOutputs"):
            if not hasattr(self, name):
                raise InvalidQuantumError(
                    f"{type(self).__name__} declares init-output {name!r} but did not set self.{name} in __init__"
                )
            out[name] = getattr(self, name)
        return out


class QuantizedConnection:
    """The refs of one quantum by connection name: a ``DatasetRef`` (or None) for single
    connections, a list for ``multiple`` ones.  Iterating yields ``(name, refs)``."""

    def __init__(self, refs: Mapping[str, DatasetRef | list[DatasetRef] | None] | None = None) -> None:
        object.__setattr__(self, "_names", [])
        for name, value in (refs or {}).items():
            self.__setattr__(name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._names:
            self._names.append(name)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        self._names.remove(name)

    def keys(self) -> list[str]:
        """Connection names."""
        return list(self._names)

    def __iter__(self) -> Iterator[tuple[str, DatasetRef | list[DatasetRef] | None]]:
        return ((name, getattr(self, name)) for name in self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._names)})"


class InputQuantizedConnection(QuantizedConnection):
    """A quantum's input refs (regular and prerequisite) by connection name."""


class OutputQuantizedConnection(QuantizedConnection):
    """A quantum's output refs by connection name."""


class ButlerQuantumContext:
    """Reads and writes the datasets of one quantum, and nothing else.

    Parameters
    ----------
    io : QuantumIO
        Where datasets are read from and written to.
    quantum : Quantum
        The quantum being run: its refs are the only ones allowed.
    connections : PipelineTaskConnections, optional
        The task's connections (``deferLoad`` inputs are read as handles).

    Attributes
    ----------
    outputs_written : list of DatasetRef
        Stored refs (with their datastore ``path``) of the outputs written so far, in order.
    inputs_read : set of str
        Dataset ids of the inputs read (or handed out as deferred handles).
    """

    def __init__(self, io: QuantumIO, quantum: Quantum, connections: PipelineTaskConnections | None = None) -> None:
        self.io = io
        self.quantum = quantum
        self._inputs: dict[str, DatasetRef] = {}
        for refs in quantum.inputs.values():
            for ref in refs:
                self._inputs[ref.id] = ref
        for ref in quantum.init_inputs.values():
            self._inputs[ref.id] = ref
        self._outputs: dict[str, DatasetRef] = {ref.id: ref for refs in quantum.outputs.values() for ref in refs}
        self._deferred: set[str] = set()
        if connections is not None:
            for kind in ("inputs", "prerequisiteInputs"):
                for name, conn in connections.connections_of(kind).items():
                    if getattr(conn, "deferLoad", False):
                        self._deferred.add(name)
        self.outputs_written: list[DatasetRef] = []
        self.inputs_read: set[str] = set()

    @property
    def dataId(self) -> dict[str, Any]:  # noqa: N802 - LSST's name
        """The quantum's data ID."""
        return self.quantum.data_id

    # ------------------------------------------------------------------ reading
    def get(
        self,
        dataset: InputQuantizedConnection | DatasetRef | Sequence[DatasetRef] | None,
        *,
        parameters: Mapping[str, Any] | None = None,
    ) -> Any:
        """Read datasets of the quantum.

        Parameters
        ----------
        dataset : InputQuantizedConnection, DatasetRef, list of DatasetRef or None
            A whole quantized connection gives ``{name: object or list}`` (deferLoad connections
            give handles with ``.get(parameters=...)``); a ref gives its object; a list a list.

        Raises
        ------
        InvalidQuantumError
            A ref that is not an input of this quantum.
        """
        if dataset is None:
            return None
        if isinstance(dataset, QuantizedConnection):
            out: dict[str, Any] = {}
            for name, refs in dataset:
                deferred = name in self._deferred
                if refs is None:
                    out[name] = None
                elif isinstance(refs, DatasetRef):
                    out[name] = self._get_one(refs, deferred, parameters)
                else:
                    out[name] = [self._get_one(r, deferred, parameters) for r in refs]
            return out
        if isinstance(dataset, DatasetRef):
            return self._get_one(dataset, False, parameters)
        if isinstance(dataset, Sequence):
            return [self._get_one(r, False, parameters) for r in dataset]
        raise TypeError(f"butlerQC.get takes refs or a quantized connection, not {type(dataset).__name__}")

    def get_deferred(self, ref: DatasetRef, *, parameters: Mapping[str, Any] | None = None) -> Any:
        """A handle for one input, read when its ``get()`` is called."""
        return self._get_one(ref, True, parameters)

    def _get_one(self, ref: DatasetRef, deferred: bool, parameters: Mapping[str, Any] | None) -> Any:
        if not isinstance(ref, DatasetRef):
            raise TypeError(f"expected a DatasetRef, got {type(ref).__name__}")
        allowed = self._inputs.get(ref.id)
        if allowed is None:
            raise InvalidQuantumError(
                f"quantum {self.quantum.task_label} {self.quantum.data_id} tried to read {ref}, which is not one "
                "of its declared inputs; declare it as a connection"
            )
        self.inputs_read.add(ref.id)
        if deferred:
            return self.io.get_deferred(allowed, parameters)
        return self.io.get(allowed, parameters)

    # ------------------------------------------------------------------ writing
    def put(
        self,
        values: Struct | Mapping[str, Any] | Any,
        dataset: OutputQuantizedConnection | DatasetRef | Sequence[DatasetRef],
    ) -> None:
        """Write outputs of the quantum.

        Parameters
        ----------
        values : Struct, mapping or object
            With an :class:`OutputQuantizedConnection`: a Struct (or mapping) whose fields are named
            like the connections; a missing or None field is not written.  With a ref: the object;
            with a list of refs: a list of objects of the same length.
        dataset : OutputQuantizedConnection, DatasetRef or list of DatasetRef

        Raises
        ------
        InvalidQuantumError
            A ref that is not an output of this quantum, an output written twice, or a list whose
            length does not match its refs.
        """
        if isinstance(dataset, QuantizedConnection):
            getter = values.get if isinstance(values, Mapping) else (lambda n: getattr(values, n, None))
            for name, refs in dataset:
                value = getter(name)
                if value is None or refs is None:
                    continue
                if isinstance(refs, DatasetRef):
                    self._put_one(value, refs)
                else:
                    self._put_many(value, refs, name)
            return
        if isinstance(dataset, DatasetRef):
            self._put_one(values, dataset)
            return
        if isinstance(dataset, Sequence):
            self._put_many(values, dataset, "refs")
            return
        raise TypeError(f"butlerQC.put takes refs or a quantized connection, not {type(dataset).__name__}")

    def _put_many(self, values: Any, refs: Sequence[DatasetRef], name: str) -> None:
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or len(values) != len(refs):
            got = len(values) if isinstance(values, Sequence) else type(values).__name__
            raise InvalidQuantumError(
                f"quantum {self.quantum.task_label} {self.quantum.data_id}: output {name!r} has {len(refs)} refs "
                f"but run() returned {got}; return a list of the same length, in ref order"
            )
        for value, ref in zip(values, refs, strict=True):
            self._put_one(value, ref)

    def _put_one(self, obj: Any, ref: DatasetRef) -> None:
        if not isinstance(ref, DatasetRef):
            raise TypeError(f"expected a DatasetRef, got {type(ref).__name__}")
        declared = self._outputs.get(ref.id)
        if declared is None:
            raise InvalidQuantumError(
                f"quantum {self.quantum.task_label} {self.quantum.data_id} tried to write {ref}, which is not one "
                "of its declared outputs"
            )
        if any(r.id == ref.id for r in self.outputs_written):
            raise InvalidQuantumError(f"quantum {self.quantum.task_label} {self.quantum.data_id} wrote {ref} twice")
        self.outputs_written.append(self.io.put(obj, declared))


#: LSST's newer name for the same class.
QuantumContext = ButlerQuantumContext
