"""Suite-wide settings: CPU DeepSpeed, one torch thread per process, GPU tests skipped without CUDA."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Two cores shared by the test process, Ray actors and sandboxed children: oversubscribing threads
# made tiny-model tests ~20x slower in measurements on this machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_torch_thread_per_test():
    """An in-process stage run sizes the driver's torch threads to the machine (stages.common); tests
    that compare logits bitwise across processes need every process at one thread again."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="module")
def _no_ray_session_leaks_into_the_next_module():
    """Stage runs leave their local Ray up (a pipeline reuses it); a module that then asks
    ``init_ray(num_cpus=4)`` would silently get that smaller session and wait forever for room. Each
    test module therefore ends with no Ray session."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


PARITY_VERIFIER = '''
from kexaone_align.verifiers import VerifyResult

class Parity:
    """Reward 1 when the response has an even number of characters: random, but with variance."""
    name = "parity"
    def verify(self, sample):
        return VerifyResult(float(len(sample.response) % 2 == 0))

parity = Parity()
'''


@pytest.fixture(scope="session")
def parity_verifier_file(tmp_path_factory):
    """A verifier file (``<path>:parity``) whose rewards vary without any learning: stage runs in tests."""
    path = tmp_path_factory.mktemp("verifier") / "parity_verifier.py"
    path.write_text(PARITY_VERIFIER)
    return path
