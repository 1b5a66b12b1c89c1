"""The pipetask command: qgraph output, files, dry runs, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.cli import main
from pipeline.graph import QuantumGraph

from .conftest import snapshot

DATA = Path(__file__).parent / "data"


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_qgraph_prints_quanta_per_task_and_writes_files(repo, tmp_path, capsys, butler):
    before = snapshot(butler)
    save, dot, mermaid = tmp_path / "g.qgraph.gz", tmp_path / "g.dot", tmp_path / "g.mmd"
    code, out, err = run(
        capsys, "qgraph", "-b", repo, "-p", DATA / "base.yaml", "-i", "inputs", "-o", "u/me", "-d", "visit = 100 AND detector IN (0, 1)",
        "-c", "scale:factor=3", "--save-qgraph", save, "--qgraph-dot", dot, "--qgraph-mermaid", mermaid,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Quantum graph: ") and "output run 'u/me/20" in lines[0]
    assert [line.split() for line in lines[1:6]] == [["task", "quanta"], ["scale", "2"], ["patchSum", lines[3].split()[1]], ["diff", "2"], ["total", lines[5].split()[1]]]
    graph = QuantumGraph.load(save)
    assert graph.summary()["scale"] == 2 and graph.task_def("scale").config.factor == 3.0
    assert dot.read_text().startswith("digraph") and mermaid.read_text().startswith("flowchart")
    assert snapshot(butler) == before


def test_qgraph_show_config_and_pipeline(repo, capsys):
    code, out, _ = run(capsys, "qgraph", "-b", repo, "-p", f"{DATA / 'base.yaml'}#scale", "-i", "inputs", "--output-run", "r", "--show", "config", "--show", "pipeline", "-c", "scale:mode=add")
    assert code == 0
    assert "scale.mode = 'add'  # command line (-c scale:mode=add)" in out
    assert f"scale.factor = 4.0  # pipeline ({DATA / 'base.yaml'}:9)" in out
    assert "scale.offset.offset = 0.0\n" in out
    assert "description: Base pipeline of the pipeline tests" in out


def test_run_dry_run_writes_nothing(repo, capsys, butler):
    before = snapshot(butler)
    code, out, _ = run(capsys, "run", "-b", repo, "-p", f"{DATA / 'base.yaml'}#scale", "-i", "inputs", "-o", "u/me", "-d", "visit = 101", "--dry-run")
    assert code == 0
    assert "Dry run: nothing was executed or written" in out and "scale: 4 quanta" in out
    assert "{instrument=SimCam, band=r, physical_filter=r_sim, visit=101, detector=0}: 1 inputs -> calexp, scale_metadata" in out
    assert snapshot(butler) == before


def test_user_errors_are_one_line(repo, tmp_path, capsys, butler):
    before = snapshot(butler)
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: d\ntasks:\n  a: tests.pipeline.example_tasks.Nope\n")
    cases = [
        (["-p", bad, "-i", "inputs", "-o", "o"], f"{bad}:3: task 'a': module 'tests.pipeline.example_tasks' has no class 'Nope'"),
        (["-p", DATA / "base.yaml", "-i", "inputs", "-o", "o", "-c", "scale:factor=x"], "config field 'factor' (set by the command line -c scale:factor=x)"),
        (["-p", DATA / "base.yaml", "-i", "inputs", "-o", "o", "-d", "visit = 999"], "data query 'visit = 999'"),
        (["-p", DATA / "base.yaml", "-i", "nope", "-o", "o"], "collection 'nope' does not exist"),
        (["-p", DATA / "base.yaml", "-i", "inputs", "-o", "o", "-C", "scale:missing.yaml"], "config file missing.yaml does not exist"),
        (["-g", tmp_path / "none.qgraph"], "quantum graph file"),
    ]
    for args, expected in cases:
        code, out, err = run(capsys, "qgraph", "-b", repo, *args)
        assert code == 1, (args, err)
        assert err.startswith("pipetask: error: ") and expected in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run(capsys, "qgraph", "-b", tmp_path / "norepo", "-p", DATA / "base.yaml", "-i", "inputs", "-o", "o")
    assert code == 1 and "is not a butler repository" in err
    assert snapshot(butler) == before


def test_usage_errors_exit_2(repo, capsys):
    assert run(capsys, "qgraph", "-b", repo, "-i", "inputs", "-o", "o")[0] == 2  # no pipeline
    assert run(capsys, "qgraph", "-b", repo, "-p", DATA / "base.yaml", "-o", "o")[0] == 2  # no inputs
    assert run(capsys, "qgraph", "-b", repo, "-p", DATA / "base.yaml", "-i", "inputs")[0] == 2  # no output
    assert run(capsys, "qgraph", "--bogus")[0] == 2
    assert run(capsys, "--help")[0] == 0


def test_help_does_not_import_heavy_packages():
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('dask', 'zarr', 'astropy', 'tasks', 'numpy', 'pydantic', 'networkx', 'sqlalchemy') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="
