"""docker/: the image and compose file (validated without a Docker engine), and the same topology —
a ``dask scheduler``, two ``dask worker`` processes and a ``pipetask`` client sharing one
repository — run for real on 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .execution_helpers import ROOT, loopback_cluster, make_exposure_repo, registered, subprocess_env, write_pipeline

DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_dockerfile_builds_this_package_on_python_311_slim():
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert instructions[0] == "FROM" and re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M), "the image installs this package"
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / copied).exists(), f"COPY {copied}: not in the repository"
    assert "OMP_NUM_THREADS=1" in text and "MPLBACKEND=Agg" in text
    assert re.search(r"^EXPOSE 8786 8787", text, re.M)


def test_compose_has_scheduler_two_workers_and_a_client_on_one_image_and_volume(compose):
    services = compose["services"]
    assert {"scheduler", "worker1", "worker2", "client"} <= set(services)
    images = {services[s]["image"] for s in ("scheduler", "worker1", "worker2", "client")}
    assert images == {"diapipe:latest"}
    for name in ("scheduler", "worker1", "worker2", "client"):
        build = services[name]["build"]
        assert build["dockerfile"] == "docker/Dockerfile" and (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file()
        assert "repo:/repo" in services[name]["volumes"], f"{name} does not share the repository volume"
    assert "repo" in compose["volumes"]
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert "8786:8786" in services["scheduler"]["ports"]
    for worker in ("worker1", "worker2"):
        command = services[worker]["command"]
        assert command[:3] == ["dask", "worker", "tcp://scheduler:8786"]
        assert "scheduler" in services[worker]["depends_on"]
    assert services["client"]["command"][0] == "pipetask"


def test_same_topology_on_loopback_scheduler_workers_and_pipetask_client(tmp_path):
    repo = make_exposure_repo(tmp_path / "repo")
    pipe = write_pipeline(tmp_path, {"factor": 2.0})
    summary = tmp_path / "summary.json"
    with loopback_cluster(2, tmp_path) as cluster:
        code = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
        result = subprocess.run(
            [sys.executable, "-c", code, "run", "-b", str(repo), "-p", str(pipe), "-i", "inputs", "-o", "u/test",
             "-d", "visit IN (100, 101)", "--address", cluster.address, "--summary", str(summary)],
            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout + result.stderr
        assert f"distributed scheduler {cluster.address}, 2 worker(s)" in out
        assert "Dask dashboard:" in out
        report = subprocess.run([sys.executable, "-c", code, "report", "-b", str(repo), "u/test"], cwd=ROOT,
                                env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert report.returncode == 0 and "all succeeded" in report.stdout
    data = json.loads(summary.read_text())
    assert data["succeeded"] and data["scheduler"].startswith("distributed scheduler tcp://127.0.0.1:")
    workers = {q["worker"] for q in data["quanta"]}
    assert all(w.startswith("tcp://127.0.0.1:") for w in workers)
    run = data["run"]
    assert len(registered(Path(repo), "calexpExp", run)) == 8 and len(registered(Path(repo), "visitSum", run)) == 2
