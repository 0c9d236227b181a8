"""A torch extension build lock left by a killed build must not hang learner setup forever."""

import logging
import os
import threading
import time

import pytest

from kexaone_align.runtime import ds_ops


def test_a_lock_no_process_holds_is_removed_with_a_warning(tmp_path, caplog):
    baton = tmp_path / "lock"
    baton.touch()  # what a build killed midway leaves: the file, closed
    assert ds_ops.baton_is_held(baton) is False
    with caplog.at_level(logging.WARNING, logger=ds_ops.__name__):
        assert ds_ops.clear_stale_baton(baton) is True
    assert not baton.exists()
    assert str(baton) in caplog.text and "killed mid-build" in caplog.text
    assert ds_ops.clear_stale_baton(baton) is False  # nothing to do


def test_a_lock_held_by_a_live_build_is_waited_for_not_removed(tmp_path):
    baton = tmp_path / "lock"
    fd = os.open(baton, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it while building
    assert ds_ops.baton_is_held(baton) is True

    def finish_build() -> None:
        time.sleep(0.4)
        os.close(fd)
        baton.unlink()

    builder = threading.Thread(target=finish_build)
    builder.start()
    started = time.perf_counter()
    removed = ds_ops.clear_stale_baton(baton, poll_s=0.05)
    builder.join()
    assert removed is False  # the build released it; we did not take it away
    assert time.perf_counter() - started >= 0.35


def test_without_a_process_table_only_an_old_lock_counts_as_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_ops, "baton_is_held", lambda _: None)
    baton = tmp_path / "lock"
    baton.touch()
    old = time.time() - 2.0
    os.utime(baton, (old, old))
    assert ds_ops.clear_stale_baton(baton, stale_after_s=1.0) is True


def test_another_users_unreadable_processes_make_the_holder_unknown(tmp_path, monkeypatch):
    baton = tmp_path / "lock"
    baton.touch()

    def refuse(_path):
        raise PermissionError("not yours")

    monkeypatch.setattr(ds_ops.os, "readlink", refuse)
    assert ds_ops.baton_is_held(baton) is None  # could be their build: only its age may condemn it


def test_an_extensions_directory_we_cannot_write_is_used_unlocked(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    ran = []
    with ds_ops._exclusive(blocker / "kexaone.flock"):
        ran.append(True)
    assert ran == [True]


def test_load_op_clears_a_leftover_lock_before_building(tmp_path, monkeypatch):
    """The path learner setup takes: a leftover lock in the op's build directory is gone before the
    builder runs (torch's own build would otherwise wait on it forever), and the op it returns is used."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = tmp_path / "fake_op"
    build_dir.mkdir()
    (build_dir / "lock").touch()
    seen = {}

    class FakeBuilder:
        NAME = name = "fake_op"

        def load(self, verbose: bool = False) -> str:
            seen["dir"] = _get_build_directory(self.name, verbose=False)
            seen["lock_left"] = (build_dir / "lock").exists()
            return "module"

    monkeypatch.setattr(get_accelerator(), "create_op_builder", lambda name: FakeBuilder())
    import deepspeed.ops

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "fake_op", True)
    assert ds_ops.load_op("FakeBuilder") == "module"
    assert seen == {"dir": str(build_dir), "lock_left": False}
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "fake_op", False)
    assert ds_ops.load_op("FakeBuilder") is None  # as DeepSpeed: an incompatible op is not built


@pytest.mark.slow
def test_a_real_shm_op_build_goes_past_a_leftover_lock(tmp_path):
    """DeepSpeed's CPU allreduce op, really built in a fresh extensions directory that holds a
    leftover lock (what hung every learner of a CI run), then loaded."""
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    script = (
        "from torch.utils.cpp_extension import _get_build_directory as d; import pathlib; "
        "p = pathlib.Path(d('deepspeed_shm_comm', False)); (p / 'lock').touch(); print(p)"
    )
    made = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    lock_dir = made.stdout.strip().splitlines()[-1]
    load = (
        "from kexaone_align.runtime.ds_ops import load_op\nprint(load_op('ShareMemCommBuilder') is not None)"
    )
    proc = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"
    assert "killed mid-build" in proc.stderr and not os.path.exists(os.path.join(lock_dir, "lock"))
