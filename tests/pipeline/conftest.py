"""Shared fixtures: a repository with 6 visits x 4 detectors, a 4x4-patch skymap, and inputs."""

from __future__ import annotations

import shutil

import pytest

from butler.butler import Butler
from tests.butler.conftest import INSTRUMENT, N_DETECTORS, N_VISITS, fill_dimensions

VISITS = [100 + v for v in range(N_VISITS)]
DETECTORS = list(range(N_DETECTORS))


def make_repo(path):
    Butler.create(path, formatters={"Config": "json"})
    with Butler(path, run="inputs") as butler:
        fill_dimensions(butler)
        butler.register_dataset_type("raw", ["instrument", "visit", "detector"], "StructuredDataDict")
        butler.register_dataset_type("skyMapInfo", ["skymap"], "StructuredDataDict")
        butler.put({"name": "sky"}, "skyMapInfo", skymap="sky")
        for v in VISITS:
            for d in DETECTORS:
                butler.put({"value": float(v * 10 + d)}, "raw", instrument=INSTRUMENT, visit=v, detector=d)
    return path


@pytest.fixture(scope="session")
def template_repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("template") / "repo")


@pytest.fixture
def repo(template_repo, tmp_path):
    path = tmp_path / "repo"
    shutil.copytree(template_repo, path)
    return path


@pytest.fixture
def butler(repo):
    with Butler(repo) as b:
        yield b


def snapshot(butler):
    """Everything a graph build must not change: collections, dataset types, datasets, files."""
    collections = butler.query_collections()
    types = [(t.name, t.dimensions, t.storage_class) for t in butler.query_dataset_types()]
    datasets = sorted(
        (t.name, r.id) for t in butler.query_dataset_types() for r in butler.query_datasets(t.name, collections=[c for c, k in collections if k == "RUN"], find_first=False)
    )
    files = sorted(str(p.relative_to(butler.root)) for p in butler.root.rglob("*") if p.is_file() and not p.name.startswith("registry"))
    return collections, types, datasets, files
