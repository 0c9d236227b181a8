import math

import pytest
import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.lr_schedules import constant, cosine, lr_multiplier_fn, make_lr_scheduler, wsd


def test_constant_with_warmup():
    assert [constant(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert constant(0) == 1.0


def test_cosine_hand_values():
    f = lr_multiplier_fn("cosine", warmup_steps=2, decay_steps=4, min_ratio=0.1)
    assert f(0) == pytest.approx(0.5)
    assert f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)  # start of decay
    assert f(4) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert f(3) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(6) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    assert cosine(5, decay_steps=10) < cosine(4, decay_steps=10)


def test_wsd_hand_values():
    f = lr_multiplier_fn("wsd", warmup_steps=2, stable_steps=3, decay_steps=4, min_ratio=0.0)
    values = [f(s) for s in range(11)]
    assert values == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0])
    assert wsd(9, stable_steps=0, decay_steps=2, min_ratio=0.2) == pytest.approx(0.2)


def test_lambda_lr_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = make_lr_scheduler(opt, "wsd", warmup_steps=2, stable_steps=1, decay_steps=2)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 2.0, 2.0, 1.0, 0.0])
    assert sched.state_dict()["last_epoch"] == 5


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("nope", {}),
        ("cosine", {"decay_steps": 0}),
        ("wsd", {"decay_steps": 0}),
        ("constant", {"warmup_steps": -1}),
    ],
)
def test_bad_schedule_settings_raise(name, kwargs):
    with pytest.raises(KexaoneError):
        lr_multiplier_fn(name, **kwargs)
