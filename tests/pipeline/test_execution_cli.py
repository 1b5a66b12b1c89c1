"""``pipetask run`` / ``pipetask report``: summaries, exit codes, resume after an interrupted or
failed run, clobbering, an unreachable scheduler."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from butler.butler import Butler
from pipeline.cli import main
from tests.butler.conftest import INSTRUMENT

from .conftest import snapshot
from .execution_helpers import ROOT, copy_repo, free_port, make_exposure_repo, registered, subprocess_env, write_pipeline

RUN = "u/test/run1"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_exposure_repo(tmp_path_factory.mktemp("cli-template") / "repo")


@pytest.fixture
def repo(template, tmp_path):
    return copy_repo(template, tmp_path / "repo")


def pipetask(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _raw_path(repo: Path, visit: int, detector: int) -> Path:
    with Butler(repo) as butler:
        ref = butler.find_dataset("rawExp", instrument=INSTRUMENT, visit=visit, detector=detector, collections=["inputs"])
    return Path(repo) / ref.path


def test_failed_run_summary_report_and_rerun_with_skip_existing(repo, template, tmp_path, capsys):
    raw = _raw_path(repo, 100, 1)
    saved = tmp_path / "raw-backup"
    shutil.copytree(raw, saved)
    for f in raw.rglob("*"):
        if f.is_file():
            f.write_bytes(b"not zarr")
    pipe = write_pipeline(tmp_path, {"factor": 2.0})
    summary = tmp_path / "report.json"
    base = ["-b", repo, "-p", pipe, "-i", "inputs", "-o", "u/test", "-d", "visit IN (100, 101)", "-j", "2"]
    code, out, err = pipetask(capsys, "run", *base, "--summary", summary)
    assert code == 1, err
    assert "FAILED scale {instrument=SimCam, visit=100, detector=1}:" in out
    assert "BLOCKED (an upstream quantum failed): " in out and "visitSum {instrument=SimCam, visit=100}" in out
    assert "total" in out and "FAILED: 18 quanta: 15 succeeded, 1 failed, 2 blocked" in out
    data = json.loads(summary.read_text())
    assert data["exit_code"] == 1 and data["tasks"]["scale"]["failed"] == 1
    assert data["failures"][0]["data_id"]["detector"] == 1 and data["failures"][0]["error"]
    code, out, _ = pipetask(capsys, "report", "-b", repo, "u/test")
    assert code == 1 and "FAILED scale {instrument=SimCam, visit=100, detector=1}" in out and "BLOCKED: 2 quanta" in out
    with Butler(repo) as butler:
        run1 = butler.registry.get_collection_chain("u/test")[0]
    before = registered(repo, "scale_metadata", run1)
    assert len(before) == 7
    # Repair the input, then resume: only the failed and blocked quanta run.
    shutil.rmtree(raw)
    shutil.copytree(saved, raw)
    code, out, err = pipetask(capsys, "run", *base, "--extend-run", "--skip-existing", "--summary", summary)
    assert code == 0, out + err
    data = json.loads(summary.read_text())
    assert data["skipped"] == {"scale": 7, "visitSum": 1, "stats": 7}
    assert {q["task"] for q in data["quanta"]} == {"scale", "visitSum", "stats"} and len(data["quanta"]) == 3
    after = registered(repo, "scale_metadata", run1)
    assert len(after) == 8 and all(after[k].id == ref.id for k, ref in before.items())  # not redone
    code, out, _ = pipetask(capsys, "report", "-b", repo, "u/test")
    assert code == 0 and "all succeeded" in out


def test_interrupted_driver_is_resumed_with_skip_existing(repo, tmp_path):
    # Quanta slow enough that the interrupt lands mid-run even when polling the repository is
    # slow on a loaded machine (8 quanta x 2 s; the interrupt comes after the second).
    pipe = write_pipeline(tmp_path, {"sleep": 2.0})
    args = ["run", "-b", str(repo), "-p", str(pipe), "-i", "inputs", "-o", "u/interrupt", "-d", "visit IN (100, 101)",
            "-j", "1", "--no-progress"]
    # A child inherits an ignored SIGINT (some library in this pytest process may leave it ignored),
    # and Python then keeps ignoring it: give the driver Python's usual Ctrl-C handler, as in a shell.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = None
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            time.sleep(0.2)
            with Butler(repo) as butler:
                chain = butler.registry.get_collection_chain("u/interrupt") if ("u/interrupt", "CHAINED") in butler.query_collections() else []
            if chain:
                run = chain[0]
                if len(registered(repo, "scale_metadata", run)) >= 2:
                    break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "pipetask: interrupted" in err
    done = {k: r.id for k, r in registered(repo, "scale_metadata", run).items()}
    assert 2 <= len(done) < 8
    summaries = sorted((Path(repo) / run / ".executions").glob("*/summary.json"))
    assert json.loads(summaries[-1].read_text())["interrupted"] is True
    # Every registered output is complete and readable; nothing else is visible.
    with Butler(repo, collections=[run]) as butler:
        for key in done:
            v, d = map(int, key.split(":"))
            assert butler.get("calexpExp", instrument=INSTRUMENT, visit=v, detector=d).image.shape == (16, 16)
    result = subprocess.run([sys.executable, "-c", code, *args, "--extend-run", "--skip-existing"], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    after = {k: r.id for k, r in registered(repo, "scale_metadata", run).items()}
    assert len(after) == 8 and all(after[k] == v for k, v in done.items())
    assert len(registered(repo, "calexpStats", run)) == 8 and len(registered(repo, "visitSum", run)) == 2


def test_clobber_outputs_replaces_datasets(repo, tmp_path, capsys):
    pipe = write_pipeline(tmp_path, {}, tasks=("scale",))
    base = ["-b", repo, "-p", pipe, "-i", "inputs", "--output-run", RUN, "-d", "visit = 100", "--no-progress"]
    assert pipetask(capsys, "run", *base)[0] == 0
    first = registered(repo, "calexpExp")
    code, _, err = pipetask(capsys, "run", *base)
    assert code == 1 and "already exist" in err and err.count("\n") == 1
    code, _, err = pipetask(capsys, "run", *base, "--extend-run", "--clobber-outputs")
    assert code == 0, err
    second = registered(repo, "calexpExp")
    assert set(second) == set(first) and not {r.id for r in first.values()} & {r.id for r in second.values()}
    assert all((Path(repo) / r.path).exists() for r in second.values())
    assert not any((Path(repo) / r.path).exists() for r in first.values())


def test_unreachable_scheduler_is_one_clear_line(repo, tmp_path, capsys):
    with Butler(repo) as butler:
        before = snapshot(butler)
    pipe = write_pipeline(tmp_path, {}, tasks=("scale",))
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    code, out, err = pipetask(capsys, "run", "-b", repo, "-p", pipe, "-i", "inputs", "-o", "u/test", "--scheduler",
                              "distributed", "--address", address, "--connect-timeout", "1", "--no-progress")
    assert code == 1
    assert err.startswith(f"pipetask: error: cannot reach the Dask scheduler at {address} within 1 s")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert time.perf_counter() - start < 30
    with Butler(repo) as butler:
        assert snapshot(butler) == before  # nothing written


def test_scheduler_options_are_checked(repo, tmp_path, capsys):
    pipe = write_pipeline(tmp_path, {}, tasks=("scale",))
    code, _, err = pipetask(capsys, "run", "-b", repo, "-p", pipe, "-i", "inputs", "-o", "u/test", "--scheduler", "processes", "--local-cluster", "2")
    assert code == 2 and "--scheduler distributed" in err
    code, _, err = pipetask(capsys, "report", "-b", repo, "nope")
    assert code == 1 and "does not exist" in err
