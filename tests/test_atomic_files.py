"""``grounding_dino.io.atomic``: results appear in one step, with a new file's mode, under
temporary names nobody can guess, never through a symlink, and never over a file unless
asked."""

import os
import stat

import pytest

from grounding_dino.io.atomic import (
    atomic_file,
    new_file_mode,
    publish,
    refuse_existing,
    temporary_directory,
    temporary_path,
    write_bytes_atomic,
)
from grounding_dino.io.coco_files import write_errors, write_json_atomic


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_results_get_the_mode_of_a_new_file(tmp_path, umask_027):
    assert new_file_mode() == 0o640 and new_file_mode(directory=True) == 0o750
    write_bytes_atomic(str(tmp_path / "a.bin"), b"x", replace=False)
    write_json_atomic(str(tmp_path / "a.json"), {"k": 1})
    write_errors(str(tmp_path / "a.errors"), [{"path": "p.png", "error": "bad\nfile"}])
    folder = temporary_directory(str(tmp_path / "split"))
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "a.json") == 0o640  # mkstemp: 0o600
    assert _mode(tmp_path / "a.errors") == 0o640
    assert (tmp_path / "a.errors").read_text() == "p.png\tbad file\n"
    assert _mode(folder) == 0o750  # mkdtemp: 0o700


def test_temporary_names_are_unpredictable_and_hidden_next_to_the_result(tmp_path):
    names = {temporary_path(str(tmp_path / "r.json"), ".partial") for _ in range(20)}
    assert len(names) == 20
    for name in names:
        base = os.path.basename(name)
        assert os.path.dirname(name) == str(tmp_path)
        assert base.startswith(".r.json.") and base.endswith(".partial")
        assert str(os.getpid()) not in base.split(".")[2]  # not the predictable .tmp-<pid>


def test_existing_files_and_symlinks_are_never_followed_or_replaced_unless_asked(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "result.json"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError, match=f"{link} exists; not replaced: pass --force"):
        write_bytes_atomic(str(link), b"new", replace=False)
    assert victim.read_text() == "keep me" and link.is_symlink()
    with pytest.raises(FileExistsError, match=r"--json: .*result.json exists.*--force"):
        refuse_existing([str(link), str(tmp_path / "new.json")], force=False, what="--json")
    refuse_existing([str(link)], force=True)

    write_bytes_atomic(str(link), b"new", replace=True)  # replaces the link, not its target
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "victim.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(str(path)) as f:
            f.write("half of the new content")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]

    # publish without replace keeps the temporary file when the name is taken.
    temporary = temporary_path(str(path))
    with pytest.raises(FileExistsError):
        publish(temporary, str(path), replace=False)
    assert os.path.exists(temporary) and path.read_text() == "old"
