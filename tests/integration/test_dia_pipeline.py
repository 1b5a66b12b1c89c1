"""The whole DIA pipeline (``pipelines/DIA.yaml``: coadds, subtraction, detection, association,
forced photometry) on the simulated ``tiny`` survey, with the threads scheduler and on a loopback
dask.distributed cluster (real ``dask scheduler`` and ``dask worker`` processes): both runs
succeed and write identical catalogs.
"""

from __future__ import annotations

import numpy as np
import pytest

from butler.butler import Butler
from pipeline.errors import ContractError
from pipeline.executors.distributed import DistributedExecutor
from pipeline.pipeline import Pipeline
from tests.pipeline.execution_helpers import loopback_cluster

from .dia_survey import DIA_PIPELINE, OUTPUT, dia_repository, run_dia

CATALOGS = (
    "goodSeeingDiff_diaSrc",
    "diaObject",
    "goodSeeingDiff_assocDiaSrc",
    "diaForcedSource",
    "deepCoadd_forced_src",
)
DISTRIBUTED = "u/dia-distributed"


def test_pipeline_file_imports_the_coadds_and_defines_the_subsets() -> None:
    pipeline = Pipeline.from_uri(str(DIA_PIPELINE))
    assert pipeline.labels == [
        "makeWarp", "assembleCoadd", "detectCoaddSources", "getTemplate", "subtractImages", "detectAndMeasure",
        "associateDiaSources", "forcedPhotDiffim", "forcedPhotCoadd",
    ]
    subsets = {
        "coadd": ["makeWarp", "assembleCoadd", "detectCoaddSources"],
        "diffim": ["getTemplate", "subtractImages", "detectAndMeasure"],
        "subtraction": ["subtractImages", "detectAndMeasure"],
        "forced": ["associateDiaSources", "forcedPhotDiffim", "forcedPhotCoadd"],
    }
    for name, labels in subsets.items():
        assert Pipeline.from_uri(f"{DIA_PIPELINE}#{name}").labels == labels
    pipeline.add_config_override("forcedPhotDiffim", "connections.diffName", "other")
    with pytest.raises(ContractError, match="forcedPhotDiffim must measure"):
        pipeline.to_task_defs()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny survey after DIA.yaml with threads (``u/dia``) and on a loopback cluster."""
    repo = dia_repository(tmp_path_factory)
    with loopback_cluster(2, tmp_path_factory.mktemp("cluster-logs")) as cluster:
        executor = DistributedExecutor(2, address=cluster.address)
        try:
            report = run_dia(repo, executor, output=DISTRIBUTED)
        finally:
            executor.close()
    return repo, report


def test_distributed_run_succeeds_with_the_expected_quanta(runs) -> None:
    _, report = runs
    assert report.exit_code == 0, report.failures
    tasks = report.tasks
    assert tasks["makeWarp"]["succeeded"] == 18 and tasks["makeWarp"]["no_work"] == 27  # template visits only
    for label in ("getTemplate", "subtractImages", "detectAndMeasure", "forcedPhotDiffim"):
        assert tasks[label]["succeeded"] == 10, label  # 5 visits x 2 detectors
    # patches whose overlapping visit-detectors have no DIA source end with NoWorkFound
    association = tasks["associateDiaSources"]
    assert association["quanta"] == 9 and association["succeeded"] + association["no_work"] == 9
    assert association["succeeded"] >= 3
    assert tasks["forcedPhotCoadd"]["succeeded"] == 9


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f":
        return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))
    return bool(np.array_equal(a, b))


def test_threads_and_distributed_runs_write_identical_catalogs(runs) -> None:
    repo, _ = runs
    with Butler(repo) as butler:
        for name in CATALOGS:
            threads = {tuple(sorted(r.data_id.items())): r for r in butler.query_datasets(name, collections=[OUTPUT])}
            dist = {tuple(sorted(r.data_id.items())): r for r in butler.query_datasets(name, collections=[DISTRIBUTED])}
            assert threads and threads.keys() == dist.keys(), name
            rows = 0
            for key, ref in threads.items():
                a, b = butler.get(ref), butler.get(dist[key])
                assert a.colnames == b.colnames, (name, key)
                for column in a.colnames:
                    assert _equal(a[column], b[column]), (name, key, column)
                assert a.meta == b.meta, (name, key)
                rows += len(a)
            assert rows > 0, name
