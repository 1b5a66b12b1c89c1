"""Atomic writes: nothing half-written ever appears at the target; nothing is overwritten unasked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from butler import Exposure, make_source_catalog
from butler.errors import FormatError
from butler.formats import (
    atomic_directory,
    atomic_file,
    atomic_write_bytes,
    write_catalog_parquet,
    write_exposure_fits,
    write_exposure_zarr,
    write_json,
)
from butler.formats.atomic import is_temporary_name


class Boom(RuntimeError):
    pass


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ----------------------------------------------------------------------------- files
def test_write_bytes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "dir" / "a.bin"  # parents are created
    assert atomic_write_bytes(target, b"hello") == target
    assert target.read_bytes() == b"hello"
    assert listing(target.parent) == ["a.bin"]


def test_existing_file_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(FormatError, match=r"a\.bin already exists; pass overwrite=True"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    atomic_write_bytes(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new"
    assert listing(tmp_path) == ["a.bin"]


def test_target_created_meanwhile_is_not_clobbered(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    with pytest.raises(FormatError, match="already exists"):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"someone else's")  # appears between the check and the publication
    assert target.read_bytes() == b"someone else's"
    assert listing(tmp_path) == ["a.bin"]


def test_exception_mid_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    with pytest.raises(Boom):
        with atomic_file(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.tmp-")
            assert is_temporary_name(tmp.name)
            tmp.write_bytes(b"half")
            raise Boom
    assert listing(tmp_path) == []


def test_exception_mid_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_file(target, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise Boom
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["a.bin"]


def test_writer_that_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="produced no file"):
        with atomic_file(tmp_path / "a.bin"):
            pass
    assert listing(tmp_path) == []


def test_fsync_is_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert len(calls) >= 2  # the file and its directory
    calls.clear()
    atomic_write_bytes(tmp_path / "b.bin", b"x", fsync=False)
    assert calls == []


# ----------------------------------------------------------------------------- directories
def test_directory_publish_and_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "group.zarr"
    with atomic_directory(target) as tmp:
        (tmp / "a").mkdir()
        (tmp / "a" / "x").write_text("1")
    assert (target / "a" / "x").read_text() == "1"
    with pytest.raises(FormatError, match="overwrite=True"):
        with atomic_directory(target) as tmp:
            (tmp / "y").write_text("2")
    assert listing(tmp_path) == ["group.zarr"] and listing(target) == ["a"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "y").write_text("2")
    assert listing(target) == ["y"]
    assert listing(tmp_path) == ["group.zarr"]  # the old tree is gone, no .old- leftover


def test_directory_exception_mid_write(tmp_path: Path) -> None:
    target = tmp_path / "group.zarr"
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            (tmp / "partial").write_text("...")
            raise Boom
    assert listing(tmp_path) == []
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(Boom):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "partial").write_text("...")
            raise Boom
    assert listing(target) == ["keep"] and listing(tmp_path) == ["group.zarr"]


def test_directory_replace_failure_restores_the_old_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "group.zarr"
    target.mkdir()
    (target / "keep").write_text("old")
    real_rename = os.rename

    def rename(src, dst):  # type: ignore[no-untyped-def]
        if Path(src).name.startswith(".group.zarr.tmp-"):
            raise OSError("disk on fire")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk on fire"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
    assert listing(target) == ["keep"] and listing(tmp_path) == ["group.zarr"]


def test_directory_replaces_a_file_only_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    target.write_text("a file")
    with pytest.raises(FormatError):
        with atomic_directory(target) as tmp:
            (tmp / "x").write_text("1")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "x").write_text("1")
    assert target.is_dir() and listing(tmp_path) == ["thing"]


# ----------------------------------------------------------------------------- the real writers
def exposure() -> Exposure:
    return Exposure(np.arange(64 * 48, dtype=np.float32).reshape(48, 64), xy0=(5, 6))


def fail_after_some_zarr_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from zarr.core.array import AsyncArray

    real = AsyncArray.setitem
    count = {"n": 0}

    async def setitem(self, selection, value, prototype=None):  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] == 5:  # a few chunks are on disk already
            raise Boom("injected")
        return await real(self, selection, value, prototype)

    monkeypatch.setattr(AsyncArray, "setitem", setitem)


def fail_midway_through_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    real = fits.HDUList.writeto

    def writeto(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        real(self[:2], name, *args, **kwargs)  # a plausible-looking partial file on disk
        raise Boom("injected")

    monkeypatch.setattr(fits.HDUList, "writeto", writeto)


def fail_midway_through_parquet(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    def write_table(table, where, **kwargs):  # type: ignore[no-untyped-def]
        Path(where).write_bytes(b"PAR1" + b"\0" * 100)
        raise Boom("injected")

    monkeypatch.setattr(pq, "write_table", write_table)


def fail_at_publication(monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary file is complete; the final link/rename fails."""

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise Boom("injected")

    monkeypatch.setattr(os, "link", boom)
    monkeypatch.setattr(os, "replace", boom)


WRITERS = {
    "zarr": (lambda p, **kw: write_exposure_zarr(exposure(), p, chunk_size=32, **kw), fail_after_some_zarr_chunks),
    "fits": (lambda p, **kw: write_exposure_fits(exposure(), p, **kw), fail_midway_through_fits),
    "parquet": (lambda p, **kw: write_catalog_parquet(make_source_catalog(3), p, **kw), fail_midway_through_parquet),
    "json": (lambda p, **kw: write_json({"a": 1}, p, **kw), fail_at_publication),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_injected_failure_leaves_no_target_and_no_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    write, inject = WRITERS[kind]
    inject(monkeypatch)
    with pytest.raises(Boom, match="injected"):
        write(tmp_path / f"out.{kind}")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_injected_failure_keeps_the_existing_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    write, inject = WRITERS[kind]
    target = tmp_path / f"out.{kind}"
    write(target)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    inject(monkeypatch)
    with pytest.raises(Boom, match="injected"):
        write(target, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_writers_refuse_to_overwrite(tmp_path: Path, kind: str) -> None:
    write, _ = WRITERS[kind]
    target = tmp_path / f"out.{kind}"
    write(target)
    mtime = target.stat().st_mtime_ns
    with pytest.raises(FormatError, match="overwrite=True"):
        write(target)
    assert target.stat().st_mtime_ns == mtime
    write(target, overwrite=True)
    assert listing(tmp_path) == [f"out.{kind}"]
