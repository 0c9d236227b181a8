"""Methods vLLM mixes into its GPU workers (``worker_extension_cls``) so a trainer can push weights.

vLLM imports this class by its qualified name inside each worker process, and the driver reaches the
methods with ``LLM.collective_rpc(name, args=...)``. Every tensor-parallel rank receives the full
tensors and ``model.load_weights`` keeps the shard that rank owns. Unverified on these machines
(vLLM cannot be installed here); it uses only ``self.model_runner.model.load_weights`` and
``self.device`` from vLLM's worker, plus our own side process group.
"""

from __future__ import annotations

from typing import Any

import torch

from kexaone_align.runtime.weight_sync import TensorMeta, open_sync_group, receive_bucket


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the vLLM worker."""

    model_runner: Any
    device: Any

    def kexaone_join_sync_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = rank_offset + get_world_group().rank
        self._kexaone_group = open_sync_group(host, port, rank, world_size, backend)

    def kexaone_receive_bucket(self, metas: list[TensorMeta], load: bool = True) -> None:
        """Join one bucket broadcast; ``load=False`` receives and discards (a refused stale version)."""
        bucket = receive_bucket(self._kexaone_group, metas, device=self.device)
        if load:
            self.model_runner.model.load_weights(weights=bucket)

    def kexaone_load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=[(n, t.to(self.device)) for n, t in bucket])
