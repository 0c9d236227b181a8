import os
import random

import numpy as np
import pytest
import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.checkpoint import (
    COMPLETE_MARKER,
    atomic_checkpoint,
    latest_complete_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    save_trainer_state,
    step_dir_name,
)


def _write(root, step, state=None):
    with atomic_checkpoint(root / step_dir_name(step)) as tmp:
        save_trainer_state(tmp, state or {"step": step})
    return root / step_dir_name(step)


def test_roundtrip_restores_state_and_rngs(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    path = _write(tmp_path, 3, {"step": 3, "tensor": torch.arange(4)})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    state = load_trainer_state(path)
    assert state["step"] == 3 and state["tensor"].tolist() == [0, 1, 2, 3]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert (path / COMPLETE_MARKER).is_file()
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_interrupted_write_is_ignored(tmp_path):
    _write(tmp_path, 1)
    with pytest.raises(RuntimeError):
        with atomic_checkpoint(tmp_path / step_dir_name(2)) as tmp:
            save_trainer_state(tmp, {"step": 2})
            raise RuntimeError("killed mid-write")
    assert not (tmp_path / step_dir_name(2)).exists()
    # what a hard kill leaves behind: a temp dir, and a step dir without the COMPLETE marker
    stale = tmp_path / f"{step_dir_name(5)}.tmp-{os.getpid() + 1}"
    save_trainer_state(stale, {"step": 5})
    save_trainer_state(tmp_path / step_dir_name(4), {"step": 4})
    assert latest_complete_checkpoint(tmp_path) == tmp_path / step_dir_name(1)
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_latest_and_keep_last(tmp_path):
    for step in (1, 2, 10):
        _write(tmp_path, step)
    assert latest_complete_checkpoint(tmp_path).name == step_dir_name(10)
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == [step_dir_name(1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(2), step_dir_name(10)]
    with pytest.raises(KexaoneError):
        prune_checkpoints(tmp_path, keep_last=0)


def test_rewriting_a_checkpoint_replaces_it(tmp_path):
    _write(tmp_path, 1, {"v": "old"})
    _write(tmp_path, 1, {"v": "new"})
    assert load_trainer_state(tmp_path / step_dir_name(1), restore_rng=False)["v"] == "new"
    with pytest.raises(KexaoneError):
        load_trainer_state(tmp_path / "nothing")
