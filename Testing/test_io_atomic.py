"""Atomic writing: complete file or nothing, never silently overwriting."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
from test_io_support import GEOM, files_in, random_probabilities

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.io import atomic_output, atomic_write_bytes, atomic_write_text, save_volume
from ConformalSegLib.io.atomic import format_suffix


def test_write_text_and_bytes_create_parents(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b" / "report.json", '{"x": 1}')
    assert path.read_text() == '{"x": 1}'
    assert atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert files_in(path.parent) == ["report.json"]


def test_file_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "r.txt", "x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0o600


def test_refuses_to_overwrite_without_force(tmp_path):
    path = atomic_write_text(tmp_path / "r.txt", "original")
    with pytest.raises(ConformalSegError) as info:
        atomic_write_text(path, "new")
    assert "r.txt" in str(info.value) and "pass --force to overwrite or choose another output" in str(info.value)
    assert path.read_text() == "original"
    atomic_write_text(path, "new", force=True)
    assert path.read_text() == "new"
    assert files_in(tmp_path) == ["r.txt"]


def test_existing_folder_is_not_a_valid_output(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConformalSegError, match="folder"):
        atomic_write_text(tmp_path / "d", "x", force=True)


@pytest.mark.parametrize(
    "name, suffix",
    [("m.nii.gz", ".nii.gz"), ("s.seg.nrrd", ".seg.nrrd"), ("x.mha", ".mha"), ("R.NII.GZ", ".NII.GZ"), ("plain", "")],
)
def test_temporary_file_keeps_format_suffix(tmp_path, name, suffix):
    assert format_suffix(name) == suffix
    with atomic_output(tmp_path / name) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(suffix)
        assert ".tmp-" in tmp.name
        tmp.write_bytes(b"data")
    assert files_in(tmp_path) == [name]


def test_failure_leaves_no_partial_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "out.nii.gz") as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("writer crashed")
    assert files_in(tmp_path) == []


def test_failure_with_force_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "r.txt", "original")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(path, force=True) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert path.read_text() == "original" and files_in(tmp_path) == ["r.txt"]


def test_save_volume_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    def crash_after_partial_write(img, name, *args, **kwargs):
        with open(name, "wb") as handle:
            handle.write(b"\x1f\x8b partial gzip")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", crash_after_partial_write)
    with pytest.raises(ConformalSegError, match="out.nii.gz"):
        save_volume(random_probabilities(), GEOM, tmp_path / "out.nii.gz")
    assert files_in(tmp_path) == []


def test_output_appearing_during_write_is_not_overwritten(tmp_path):
    path = tmp_path / "r.txt"
    with pytest.raises(ConformalSegError, match="already exists"):
        with atomic_output(path) as tmp:
            tmp.write_text("mine")
            path.write_text("someone else's")
    assert path.read_text() == "someone else's" and files_in(tmp_path) == ["r.txt"]


def test_unwritable_location_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConformalSegError, match="writable"):
        atomic_write_text(blocker / "sub" / "r.txt", "x")
    np.testing.assert_equal(files_in(tmp_path), ["file"])


def test_writers_stream_in_order_and_a_failing_writer_keeps_the_old_pair(tmp_path):
    """An NpzWriter compresses into the temporary file and knows its SHA-256 before the JSON writer runs; a
    writer that fails leaves the previous pair as it was and no temporary file."""
    import json

    from ConformalSegLib.io.atomic import NpzWriter, atomic_write_files
    from ConformalSegLib.io.checksums import sha256_file

    npz_path, json_path = tmp_path / "p.npz", tmp_path / "p.json"
    arrays = {"values": np.arange(100_000, dtype=np.float32), "offsets": np.array([0, 5], dtype=np.int64)}
    npz = NpzWriter(arrays)
    atomic_write_files(
        [(npz_path, npz), (json_path, lambda handle: handle.write(json.dumps({"sha256": npz.sha256}).encode()))]
    )
    assert json.loads(json_path.read_text())["sha256"] == sha256_file(npz_path)
    with np.load(npz_path) as stored:
        assert sorted(stored.files) == ["offsets", "values"]
        assert all(stored[k].tobytes() == v.tobytes() for k, v in arrays.items())
    before = {p.name: p.read_bytes() for p in (npz_path, json_path)}

    def failing(handle):
        handle.write(b"{half a JSON")
        raise ValueError("the JSON could not be built")

    with pytest.raises(ValueError, match="could not be built"):
        atomic_write_files([(npz_path, NpzWriter({"values": np.zeros(3)})), (json_path, failing)], force=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
