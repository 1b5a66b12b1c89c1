"""PipelineTasks for the executor tests: they really read and write Exposures through the butler.

``ScaleExposureTask`` (raw -> calexp, per visit-detector) has knobs that make chosen quanta fail,
fail once (transient), raise RepeatableQuantumError or NoWorkFound, spin in Python or hang in C
(timeouts), or sleep (interrupts, killed workers).  Quanta are chosen with ``"visit:detector"``
strings.  ``VisitSumTask`` (calexp[] -> visitSum, per visit) and ``StatsTask`` (calexp ->
calexpStats, per visit-detector) sit downstream.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from butler.exposure import Exposure
from pipeline.config import Field
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.errors import NoWorkFound, RepeatableQuantumError
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct

VD = ("instrument", "visit", "detector")
V = ("instrument", "visit")
SHAPE = (16, 16)

_log = logging.getLogger(__name__)


def raw_exposure(visit: int, detector: int) -> Exposure:
    """The raw exposure of a visit-detector: a ramp offset by the data ID."""
    image = np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE) + visit * 10 + detector
    return Exposure(image, variance=np.ones(SHAPE, np.float32), band="r", metadata={"visit": visit, "detector": detector})


class ScaleExposureConnections(PipelineTaskConnections, dimensions=VD):
    raw = Input(name="rawExp", storageClass="Exposure", dimensions=VD, doc="raw exposure")
    calexp = Output(name="calexpExp", storageClass="Exposure", dimensions=VD, doc="scaled exposure")


class ScaleExposureConfig(PipelineTaskConfig, pipelineConnections=ScaleExposureConnections):
    factor: float = Field(2.0, description="image multiplier (variance gets its square)")
    fail: list[str] = Field(default_factory=list, description="'visit:detector' quanta that raise RuntimeError")
    repeatable: list[str] = Field(default_factory=list, description="quanta that raise RepeatableQuantumError")
    no_work: list[str] = Field(default_factory=list, description="quanta that raise NoWorkFound")
    flaky: list[str] = Field(default_factory=list, description="quanta whose first attempt fails (marker files)")
    spin: list[str] = Field(default_factory=list, description="quanta that loop in Python forever")
    hang: list[str] = Field(default_factory=list, description="quanta that sleep forever in one C call")
    sleep: float = Field(0.0, description="seconds every quantum sleeps")
    slow: list[str] = Field(default_factory=list, description="quanta that sleep slow_seconds")
    slow_seconds: float = Field(3.0, description="sleep of the slow quanta")
    marker_dir: str = Field("", description="folder for flaky markers and pid files")


class ScaleExposureTask(PipelineTask):
    ConfigClass = ScaleExposureConfig
    _DefaultName = "scaleExp"

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        did = butlerQC.dataId
        self.tag = f"{did['visit']}:{did['detector']}"
        super().runQuantum(butlerQC, inputRefs, outputRefs)

    def run(self, raw: Exposure) -> Struct:
        cfg, tag = self.config, getattr(self, "tag", "")
        self.log.info("scaling %s by %s", tag, cfg.factor)
        if cfg.marker_dir:
            Path(cfg.marker_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.marker_dir) / f"pid-{tag.replace(':', '_')}-{os.getpid()}").write_text(str(time.time()))
        if cfg.sleep:
            time.sleep(cfg.sleep)
        if tag in cfg.slow:
            time.sleep(cfg.slow_seconds)
        if tag in cfg.fail:
            raise RuntimeError(f"boom in {tag}")
        if tag in cfg.repeatable:
            raise RepeatableQuantumError(f"bad data in {tag}")
        if tag in cfg.no_work:
            raise NoWorkFound(f"nothing to do for {tag}")
        if tag in cfg.flaky:
            marker = Path(cfg.marker_dir) / f"flaky-{tag.replace(':', '_')}"
            if not marker.exists():
                marker.write_text("failed once")
                raise OSError(f"transient failure in {tag}")
        if tag in cfg.spin:
            while True:
                sum(range(1000))
        if tag in cfg.hang:
            time.sleep(3600)
        out = Exposure(raw.image * cfg.factor, raw.mask, raw.variance * cfg.factor**2, band=raw.band, metadata=raw.metadata)
        self.metadata["factor"] = cfg.factor
        return Struct(calexp=out)


class VisitSumConnections(PipelineTaskConnections, dimensions=V):
    calexps = Input(name="calexpExp", storageClass="Exposure", dimensions=VD, multiple=True, doc="detectors")
    total = Output(name="visitSum", storageClass="Exposure", dimensions=V, doc="sum of the detectors")


class VisitSumConfig(PipelineTaskConfig, pipelineConnections=VisitSumConnections):
    pass


class VisitSumTask(PipelineTask):
    ConfigClass = VisitSumConfig
    _DefaultName = "visitSum"

    def run(self, calexps: list[Exposure]) -> Struct:
        image = np.sum([c.image for c in calexps], axis=0)
        self.log.info("summed %d detectors", len(calexps))
        return Struct(total=Exposure(image, metadata={"n": len(calexps)}))


class StatsConnections(PipelineTaskConnections, dimensions=VD):
    calexp = Input(name="calexpExp", storageClass="Exposure", dimensions=VD, doc="scaled exposure")
    stats = Output(name="calexpStats", storageClass="StructuredDataDict", dimensions=VD, doc="pixel statistics")


class StatsConfig(PipelineTaskConfig, pipelineConnections=StatsConnections):
    pass


class StatsTask(PipelineTask):
    ConfigClass = StatsConfig
    _DefaultName = "stats"

    def run(self, calexp: Exposure) -> Struct:
        return Struct(stats={"mean": float(calexp.image.mean()), "sum": float(calexp.image.sum())})


class NoOpConnections(PipelineTaskConnections, dimensions=VD):
    pass


class NoOpConfig(PipelineTaskConfig, pipelineConnections=NoOpConnections):
    work: str = Field("none", description="none, ufunc or fft (numpy, GIL released) or python (GIL held)")
    size: int = Field(512, description="FFT size (pixels per side)")
    repeats: int = Field(1, description="FFTs or Python loops per quantum")


class NoOpTask(PipelineTask):
    """Reads nothing, writes only its metadata (the trivial quantum of the benchmarks); optionally
    burns CPU in numpy FFTs (GIL released) or in a Python loop (GIL held)."""

    ConfigClass = NoOpConfig
    _DefaultName = "noop"

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        cfg = self.config
        if cfg.work == "fft":
            rng = np.random.default_rng(1)
            a = rng.standard_normal((cfg.size, cfg.size))
            for _ in range(cfg.repeats):
                a = np.fft.irfft2(np.fft.rfft2(a) * 0.5, s=a.shape)
            self.metadata["checksum"] = float(a[0, 0])
        elif cfg.work == "ufunc":
            a = np.linspace(0.0, 1.0, 2_000_000)
            out = np.empty_like(a)
            for _ in range(cfg.repeats):
                np.sin(a, out=out)
                np.exp(out, out=out)
            self.metadata["checksum"] = float(out[-1])
        elif cfg.work == "python":
            total = 0
            for _ in range(cfg.repeats):
                for i in range(1_000_000):
                    total += i * i % 7
            self.metadata["checksum"] = total

    def run(self) -> Struct:
        return Struct()
