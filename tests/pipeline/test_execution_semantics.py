"""The executor semantics, identical on threads, processes and a loopback dask.distributed cluster.

Every test runs small tasks that read and write Exposures (Zarr) through the butler.  One process
pool and one loopback cluster (real ``dask scheduler`` + 2 ``dask worker`` processes) serve the
whole module.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from butler.butler import Butler
from pipeline.executors.base import Status
from pipeline.graph import QuantumGraph
from tests.butler.conftest import INSTRUMENT

from .execution_helpers import (
    DETECTORS,
    build,
    by_tag,
    copy_repo,
    execute,
    loopback_cluster,
    make_exposure_repo,
    registered,
    visible_files,
    write_pipeline,
)
from .execution_tasks import raw_exposure

SCHEDULERS = ["threads", "processes", "distributed"]
RUN = "u/test/run1"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_exposure_repo(tmp_path_factory.mktemp("exec-template") / "repo")


@pytest.fixture
def repo(template, tmp_path):
    return copy_repo(template, tmp_path / "repo")


@pytest.fixture(scope="module")
def executors(tmp_path_factory):
    """``get(name)``: one executor per scheduler for the module (pool and cluster reused)."""
    from pipeline.executors.distributed import DistributedExecutor
    from pipeline.executors.processes import ProcessesExecutor
    from pipeline.executors.threads import ThreadsExecutor

    made: dict[str, object] = {}
    stack: list[object] = []

    def get(name: str):
        if name not in made:
            if name == "threads":
                made[name] = ThreadsExecutor(2)
            elif name == "processes":
                made[name] = ProcessesExecutor(2)
            else:
                ctx = loopback_cluster(2, tmp_path_factory.mktemp("cluster-logs"))
                cluster = ctx.__enter__()
                stack.append(ctx)
                executor = DistributedExecutor(2, address=cluster.address)
                executor.cluster = cluster
                made[name] = executor
        return made[name]

    yield get
    for executor in made.values():
        executor.close()
    for ctx in stack:
        ctx.__exit__(None, None, None)


def _all_paths_registered(repo: Path) -> None:
    """Nothing visible in the run that the registry does not know (no half-written outputs)."""
    with Butler(repo) as butler:
        known = set()
        for dt in butler.query_dataset_types():
            for ref in butler.query_datasets(dt.name, collections=[RUN], find_first=False):
                known.add(ref.path)
    files = visible_files(repo, RUN)
    assert files <= known, f"files not in the registry: {sorted(files - known)}"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_pipeline_runs_and_records_outputs_and_provenance(repo, tmp_path, executors, scheduler):
    executor = executors(scheduler)
    graph = build(repo, write_pipeline(tmp_path, {"factor": 3.0}))
    report = execute(repo, graph, executor)
    assert report.exit_code == 0, report.failures
    assert report.tasks == {
        "scale": {"quanta": 8, "succeeded": 8, "no_work": 0, "failed": 0, "blocked": 0, "cancelled": 0, "skipped": 0},
        "visitSum": {"quanta": 2, "succeeded": 2, "no_work": 0, "failed": 0, "blocked": 0, "cancelled": 0, "skipped": 0},
        "stats": {"quanta": 8, "succeeded": 8, "no_work": 0, "failed": 0, "blocked": 0, "cancelled": 0, "skipped": 0},
    }
    with Butler(repo, collections=["u/test"]) as butler:
        # Outputs: the pixels really went through the butler.
        for v in (100, 101):
            for d in DETECTORS:
                calexp = butler.get("calexpExp", instrument=INSTRUMENT, visit=v, detector=d)
                raw = raw_exposure(v, d)
                np.testing.assert_allclose(calexp.image, raw.image * 3.0)
                np.testing.assert_allclose(calexp.variance, raw.variance * 9.0)
                stats = butler.get("calexpStats", instrument=INSTRUMENT, visit=v, detector=d)
                assert stats["mean"] == pytest.approx(float(raw.image.mean() * 3.0), rel=1e-5)
            total = butler.get("visitSum", instrument=INSTRUMENT, visit=v)
            np.testing.assert_allclose(total.image, sum(raw_exposure(v, d).image * 3.0 for d in DETECTORS), rtol=1e-5)
        # Per-quantum metadata: timings, host, attempts, peak memory, the task's log records.
        meta = butler.get("scale_metadata", instrument=INSTRUMENT, visit=100, detector=2)
        q = meta["quantum"]
        assert q["status"] == "succeeded" and q["attempt"] == 1 and q["host"] and q["max_rss_bytes"] > 0
        assert any(r["message"] == "scaling 100:2 by 3.0" and r["level"] == "INFO" for r in q["logs"])
        assert meta["scale"]["factor"] == 3.0 and meta["scale"]["runQuantumDuration"] >= 0
        if scheduler == "distributed":
            assert q["worker"].startswith("tcp://127.0.0.1:")
        elif scheduler == "processes":
            assert q["pid"] != os.getpid()
        else:
            assert q["pid"] == os.getpid()
        # Per-run provenance: configs, package versions, the graph.
        assert butler.get("scale_config", {})["factor"] == 3.0
        packages = butler.get("packages", {})
        assert packages["numpy"] == np.__version__ and packages["python"]
        assert butler.registry.get_collection_chain("u/test") == [RUN, "inputs"]
    saved = QuantumGraph.load(report.graph_file)
    assert len(saved) == 18 and saved.metadata["output_run"] == RUN
    summary = json.loads(Path(report.summary_file).read_text())
    assert summary["succeeded"] and summary["exit_code"] == 0 and summary["tasks"]["scale"]["succeeded"] == 8
    keys = {o.key for o in report.outcomes.values()}
    assert any(k.startswith("scale-instrument=SimCam,visit=100,detector=1-") for k in keys), sorted(keys)[:3]
    _all_paths_registered(repo)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_failures_retries_no_work_and_blocked(repo, tmp_path, executors, scheduler):
    markers = tmp_path / "markers"
    config = {"fail": ["100:1"], "repeatable": ["100:2"], "flaky": ["101:0"], "no_work": ["101:3"], "marker_dir": str(markers)}
    graph = build(repo, write_pipeline(tmp_path, config))
    report = execute(repo, graph, executors(scheduler), retries=2)
    assert report.exit_code == 1
    scale, stats, vsum = by_tag(report, "scale"), by_tag(report, "stats"), by_tag(report, "visitSum")
    # A transient error is retried (3 attempts), RepeatableQuantumError never.
    assert scale["100:1"].status == Status.FAILED and scale["100:1"].attempts == 3
    assert scale["100:1"].error == "boom in 100:1" and "RuntimeError" in scale["100:1"].traceback
    assert scale["100:2"].status == Status.FAILED and scale["100:2"].attempts == 1 and scale["100:2"].exit_code == 20
    assert scale["101:0"].status == Status.SUCCEEDED and scale["101:0"].attempts == 2
    assert scale["101:3"].status == Status.NO_WORK
    assert {t for t, o in scale.items() if o.status == Status.SUCCEEDED} == {"100:0", "100:3", "101:0", "101:1", "101:2"}
    # Downstream: blocked behind failures; no work where the input was never produced (LSST rule).
    assert stats["100:1"].status == Status.BLOCKED and stats["100:1"].blocked_by == scale["100:1"].key
    assert stats["100:2"].status == Status.BLOCKED
    assert stats["101:3"].status == Status.NO_WORK
    assert vsum["100"].status == Status.BLOCKED
    assert vsum["101"].status == Status.SUCCEEDED  # 3 of 4 detectors: multiple input, minimum 1
    with Butler(repo, collections=["u/test"]) as butler:
        assert butler.get("visitSum", instrument=INSTRUMENT, visit=101).metadata["n"] == 3
        meta = butler.get("scale_metadata", instrument=INSTRUMENT, visit=101, detector=0)["quantum"]
        assert meta["attempt"] == 2 and "transient failure in 101:0" in meta["previous_attempts"][0]["error"]
        nowork = butler.get("scale_metadata", instrument=INSTRUMENT, visit=101, detector=3)["quantum"]
        assert nowork["status"] == "no_work"
        assert butler.get("stats_metadata", instrument=INSTRUMENT, visit=101, detector=3)["quantum"]["status"] == "no_work"
    assert set(registered(repo, "calexpExp")) == {"100:0", "100:3", "101:0", "101:1", "101:2"}
    assert set(registered(repo, "scale_metadata")) == {"100:0", "100:3", "101:0", "101:1", "101:2", "101:3"}
    # The summary names each failure with its data ID and error.
    failures = {(f["task"], f["data_id_text"]): f for f in report.failures}
    assert failures[("scale", "instrument=SimCam, visit=100, detector=1")]["error"] == "boom in 100:1"
    assert failures[("scale", "instrument=SimCam, visit=100, detector=2")]["error_type_short"] == "RepeatableQuantumError"
    summary = json.loads(Path(report.summary_file).read_text())
    assert {f["data_id"]["detector"] for f in summary["failures"]} == {1, 2}
    assert len(summary["blocked"]) == 3
    _all_paths_registered(repo)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_fail_fast_stops_the_run(repo, tmp_path, executors, scheduler):
    others = [f"{v}:{d}" for v in (100, 101) for d in DETECTORS if (v, d) != (100, 0)]
    config = {"fail": ["100:0"], "slow": others, "slow_seconds": 0.4}
    graph = build(repo, write_pipeline(tmp_path, config))
    report = execute(repo, graph, executors(scheduler), fail_fast=True)
    assert report.exit_code == 1
    assert report.count(Status.FAILED) == 1 and report.count(Status.BLOCKED) == 0
    # The failed quantum's downstream and whatever had not finished never ran.
    assert report.count(Status.CANCELLED) >= 2 and report.count(Status.SUCCEEDED) <= 15
    assert len(report.outcomes) == 18
    assert by_tag(report, "stats")["100:0"].status == Status.CANCELLED
    cancelled = {o.quantum_id for o in report.outcomes.values() if o.status == Status.CANCELLED}
    recorded = set()
    with Butler(repo) as butler:
        for name in ("scale_metadata", "stats_metadata", "visitSum_metadata"):
            for ref in butler.query_datasets(name, collections=[RUN], find_first=False):
                recorded.add(ref.id)
    cancelled_meta = {r.id for qid in cancelled for r in graph.get_quantum(qid).outputs.get("_metadata", [])}
    assert not (recorded & cancelled_meta)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_timeout_stops_a_quantum(repo, tmp_path, executors, scheduler):
    # threads and distributed: a Python loop (stopped by the injected exception); processes: a
    # single C call that cannot be interrupted (the worker process is ended after the grace).
    # On threads a spinning quantum holds the GIL and starves the others (use processes for such
    # code), so that case runs on one thread.
    kind = "hang" if scheduler == "processes" else "spin"
    graph = build(repo, write_pipeline(tmp_path, {kind: ["100:0"]}, tasks=("scale",)), where="visit = 100")
    start = time.perf_counter()
    if scheduler == "threads":
        from pipeline.executors.threads import ThreadsExecutor

        with ThreadsExecutor(1) as executor:
            report = execute(repo, graph, executor, timeout=1.5, retries=1)
    else:
        report = execute(repo, graph, executors(scheduler), timeout=1.5, retries=1)
    elapsed = time.perf_counter() - start
    scale = by_tag(report, "scale")
    assert scale["100:0"].status == Status.FAILED and scale["100:0"].timed_out
    assert "timed out after 1.5 s" in scale["100:0"].error
    assert {t for t, o in scale.items() if o.status == Status.SUCCEEDED} == {"100:1", "100:2", "100:3"}
    assert elapsed < 60
    assert "100:0" not in registered(repo, "scale_metadata")
    _all_paths_registered(repo)


@pytest.mark.parametrize("scheduler", ["processes", "distributed"])
def test_worker_killed_mid_quantum(repo, tmp_path, executors, scheduler):
    markers = tmp_path / "markers"
    config = {"slow": ["100:0"], "slow_seconds": 4.0, "marker_dir": str(markers)}
    graph = build(repo, write_pipeline(tmp_path, config, tasks=("scale", "stats")), where="visit = 100")
    box = {}
    thread = threading.Thread(target=lambda: box.update(report=execute(repo, graph, executors(scheduler))))
    thread.start()
    deadline = time.time() + 60
    victim = None
    while time.time() < deadline and victim is None:
        found = sorted(markers.glob("pid-100_0-*")) if markers.is_dir() else []
        if found:
            victim = int(found[0].name.rsplit("-", 1)[1])
        time.sleep(0.05)
    assert victim is not None and victim != os.getpid()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=120)
    report = box["report"]
    scale = by_tag(report, "scale")
    # Re-run on another worker process (the dead attempt left nothing behind).
    assert scale["100:0"].status == Status.SUCCEEDED, scale["100:0"].error
    assert report.exit_code == 0
    assert len(list(markers.glob("pid-100_0-*"))) >= 2
    assert set(registered(repo, "calexpExp")) == {"100:0", "100:1", "100:2", "100:3"}
    assert set(registered(repo, "calexpStats")) == {"100:0", "100:1", "100:2", "100:3"}
    _all_paths_registered(repo)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_corrupt_input_fails_only_its_quanta(repo, tmp_path, executors, scheduler):
    with Butler(repo) as butler:
        ref = butler.find_dataset("rawExp", instrument=INSTRUMENT, visit=101, detector=2, collections=["inputs"])
    target = Path(repo) / ref.path
    for f in target.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage\xff" * 3)
    graph = build(repo, write_pipeline(tmp_path, {}))
    report = execute(repo, graph, executors(scheduler))
    scale, stats, vsum = by_tag(report, "scale"), by_tag(report, "stats"), by_tag(report, "visitSum")
    assert scale["101:2"].status == Status.FAILED and scale["101:2"].error
    assert stats["101:2"].status == Status.BLOCKED and vsum["101"].status == Status.BLOCKED
    assert report.count(Status.SUCCEEDED) == 7 + 7 + 1
    assert report.exit_code == 1
    _all_paths_registered(repo)
