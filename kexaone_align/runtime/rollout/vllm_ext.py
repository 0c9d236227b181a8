"""Methods vLLM mixes into its workers (``worker_extension_cls``) so a trainer can push weights in place.

vLLM imports this class by its qualified name inside each worker process, and the driver reaches the
methods with ``LLM.collective_rpc(name, args=...)``; every tensor-parallel rank receives the full
tensors and ``model.load_weights`` keeps the shard that rank owns.

Why each step is there (all measured on vLLM 0.32's CPU build against a transformers forward):

* Tensors cannot travel as ``collective_rpc`` arguments of the multiprocess engine (its serializer
  refuses them), so a bucket travels as one flat byte string plus its ``TensorMeta`` list.
* ``model.load_weights`` alone fails once vLLM has repacked linear weights into kernel layouts (on CPU:
  ``'Parameter' object has no attribute 'weight_loader'``). vLLM's layerwise reload
  (``initialize_layerwise_reload`` before the first bucket of a version, ``finalize_layerwise_reload``
  after the last) restores checkpoint-format parameters, loads, and processes each layer again.
* The fused-MoE experts kernel prepares its own weight layout only on the first load; after a reload
  the experts would compute with the old weights, so its ``process_weights_after_loading`` runs again.
* transformers names the router's score-correction bias ``mlp.gate.e_score_correction_bias`` in memory
  but ``mlp.e_score_correction_bias`` in checkpoints; vLLM silently ignores the former, so it is renamed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kexaone_align.runtime.weight_wire import Bucket, TensorMeta, open_sync_group, unflatten_bucket

# in-memory transformers name -> the checkpoint name vLLM's ExaoneMoe loader maps
_RENAMES = ((".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"),)


def checkpoint_names(bucket: Iterable[tuple[str, torch.Tensor]]) -> Bucket:
    """Rename transformers' in-memory parameter names to the checkpoint names vLLM loads."""
    out: Bucket = []
    for name, tensor in bucket:
        for old, new in _RENAMES:
            if name.endswith(old):
                name = name[: -len(old)] + new
        out.append((name, tensor))
    return out


def pack_bucket(bucket: Bucket) -> tuple[list[TensorMeta], bytes]:
    """A bucket as (metadata, one byte string): what ``collective_rpc`` can carry to every worker."""
    from kexaone_align.runtime.weight_wire import flatten_bucket

    flat, metas = flatten_bucket([(n, t.detach().cpu()) for n, t in bucket], device="cpu")
    return metas, flat.numpy().tobytes()


def unpack_bucket(metas: list[TensorMeta], payload: bytes) -> Bucket:
    """Inverse of :func:`pack_bucket` (the tensors own a fresh copy of the bytes)."""
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return unflatten_bucket(flat, metas)


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the vLLM worker (``model_runner``, ``device``)."""

    model_runner: Any
    device: Any

    # -- one version, bucket by bucket -----------------------------------------------------------
    def kexaone_begin_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.model)

    def kexaone_load_bucket(self, metas: list[TensorMeta], payload: bytes) -> int:
        self._kexaone_load(unpack_bucket(metas, payload))
        return len(metas)

    def kexaone_finish_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.model
        finalize_layerwise_reload(model, self.model_runner.model_config)
        for module in model.modules():  # re-prepare fused-MoE kernel layouts from the new weights
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            if kernel is not None:
                kernel.fused_experts.process_weights_after_loading(module)

    def _kexaone_load(self, bucket: Bucket) -> None:
        device = self.device
        self.model_runner.model.load_weights(weights=[(n, t.to(device)) for n, t in checkpoint_names(bucket)])

    # -- collective transport: this rank joins the learners' side group and receives broadcasts -----
    def kexaone_join_sync_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = rank_offset + get_world_group().rank
        self._kexaone_group = open_sync_group(host, port, rank, world_size, backend)

    def kexaone_receive_weights(self, version: int, load: bool = True) -> dict[str, int]:
        """Receive one whole push (every bucket until the sender's end marker) and load it; returns
        ``{buckets, tensors, bytes}``. ``load=False`` receives and discards (a refused stale version), and
        a failed load still receives the rest, so the sender never waits forever."""
        from kexaone_align.runtime.weight_wire import receive_into

        if not load:
            return receive_into(self._kexaone_group, self.device, version, lambda bucket: None)
        self.kexaone_begin_update()
        counts = receive_into(self._kexaone_group, self.device, version, self._kexaone_load)
        self.kexaone_finish_update()
        return counts
