"""Run folders on a filesystem that cannot append or rename (an object store), through the
same Location API the search uses; and storage names that cannot work."""

import pytest

from autodfp.errors import AutoDFPError
from launch.storage import Location, check_location


@pytest.fixture
def bucket():
    """An in-memory pyarrow filesystem (fsspec's), standing in for S3: not a LocalFileSystem,
    so writes and appends take the object-store path."""
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    memory = fsspec.filesystem("memory")
    memory.store.clear()
    return Location("mem://bucket/runs", PyFileSystem(FSSpecHandler(memory)), "/bucket/runs")


def test_object_store_writes_replace_and_appends_keep_earlier_lines(bucket):
    trial = bucket.child("run", "AutoDFPSAC_x")
    assert not trial.is_local and not trial.is_file("episodes.jsonl")
    trial.append_text("episodes.jsonl", '{"episode": 0}\n')
    trial.append_text("episodes.jsonl", '{"episode": 1}\n')
    assert trial.read_text("episodes.jsonl") == '{"episode": 0}\n{"episode": 1}\n'
    trial.write_text("best.json", "{}\n")
    trial.write_text("best.json", '{"accuracy": 0.5}\n')
    assert trial.read_text("best.json") == '{"accuracy": 0.5}\n'
    assert bucket.child("run").list_dirs() == ["AutoDFPSAC_x"]
    assert bucket.child("run").is_dir() and not bucket.child("other").is_dir()
    assert str(trial) == "mem://bucket/runs/run/AutoDFPSAC_x"


def test_local_writes_leave_no_temporary_file(tmp_path):
    folder = Location.of(tmp_path / "run")
    folder.write_text("best.json", "1\n")
    folder.write_text("best.json", "2\n")
    folder.append_text("episodes.jsonl", "a\n")
    folder.append_text("episodes.jsonl", "b\n")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.json", "episodes.jsonl"]
    assert (tmp_path / "run" / "episodes.jsonl").read_text() == "a\nb\n"


def test_file_uri_and_path_name_the_same_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "search.json").write_text("{}")
    uri = Location.of(f"file://{tmp_path}/run")
    assert uri.is_file("search.json") and uri.read_text("search.json") == "{}"
    assert Location.of(tmp_path / "run").path == uri.path


@pytest.mark.parametrize("name", ["ftp://host/runs", "s4://bucket/runs", "memory://x"])
def test_unknown_storage_schemes_fail_in_one_line(name):
    with pytest.raises(AutoDFPError, match="unknown scheme"):
        check_location(name)
