"""Seconds per weight sync and GB/s, learner stand-in -> 1 and 2 hf rollout workers, on CPU.

Two parameter sets: the tiny K-EXAONE (``build_tiny_checkpoint``) and a ~0.5B-parameter ExaoneMoe of
the same layout (hidden 1,024, 12 layers, vocabulary 153,600, 8 experts), both fp32. The sender is a
``CheckpointWeightSource`` in this process (it streams buckets the way a learner does); the receivers
are ``RolloutWorker`` Ray actors with the hf backend. Transports: Ray object store and a gloo side
group. Each (model, transport, workers) point gets one untimed warm-up push (which also sets up the
gloo group) and ``--repeats`` timed pushes; the median is reported. The machine's memory-copy
bandwidth (``torch.Tensor.copy_`` and ``numpy.copyto`` of a 1 GB buffer) is measured in the same run
as the physical limit: a sync to N workers moves at least N copies of the weights.

    python benchmarks/weight_sync.py --out benchmarks/results/weight_sync.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median, write_json

ARCH_05B = {
    "hidden_size": 1024,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "intermediate_size": 2048,
    "moe_intermediate_size": 512,
    "num_experts": 8,
    "vocab_size": 153_600,
}


def memcpy_bandwidth(nbytes: int, repeats: int) -> dict:
    """GB/s of a plain in-memory copy (read + write of ``nbytes``), torch and numpy, median of repeats."""
    import numpy as np
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    out = {}
    for name, fn in (
        ("torch_copy_", lambda: dst.copy_(src)),
        ("numpy_copyto", lambda: np.copyto(dst.numpy(), src.numpy())),
    ):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = {"gb_per_s_median": nbytes / 1e9 / median(times), "seconds_runs": times}
    out["buffer_bytes"] = nbytes
    out["torch_threads"] = torch.get_num_threads()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/weight_sync.json")
    ap.add_argument("--models", default="tiny,0.5b")
    ap.add_argument("--transports", default="object_store,gloo")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=256)
    args = ap.parse_args()
    t0 = time.perf_counter()

    import ray
    import torch

    from kexaone_align.models import build_tiny_checkpoint
    from kexaone_align.runtime.cluster import init_ray
    from kexaone_align.runtime.rollout import remote_rollout_worker
    from kexaone_align.runtime.weight_sync import CheckpointWeightSource, WeightSync

    info = machine_info()
    mem = memcpy_bandwidth(1 << 30, max(3, args.repeats))
    print(
        f"memcpy 1 GB: torch {mem['torch_copy_']['gb_per_s_median']:.2f} GB/s, "
        f"numpy {mem['numpy_copyto']['gb_per_s_median']:.2f} GB/s",
        flush=True,
    )
    worker_counts = [int(w) for w in args.workers.split(",")]
    bucket_bytes = args.bucket_mb << 20
    init_ray(num_cpus=max(4, max(worker_counts) + 1))
    rows = []
    version = 0
    with tempfile.TemporaryDirectory(prefix="kexa_wsync_") as tmp:
        for model_name in args.models.split(","):
            arch = None if model_name == "tiny" else ARCH_05B
            start = time.perf_counter()
            path = build_tiny_checkpoint(Path(tmp) / model_name, seed=0, architecture=arch)
            source = CheckpointWeightSource(str(path))
            n_params = sum(p.numel() for p in source.model.parameters())
            workers = [
                remote_rollout_worker("hf", num_cpus=1, model_path=str(path), dtype="float32")
                for _ in range(max(worker_counts))
            ]
            ray.get([w.ping.remote() for w in workers])
            print(
                f"{model_name}: {n_params / 1e6:.1f}M params, setup {time.perf_counter() - start:.1f}s",
                flush=True,
            )
            for n in worker_counts:
                for transport in args.transports.split(","):
                    sync = WeightSync(workers[:n], transport=transport)
                    version += 1
                    sync.push(version, source.state_dict_stream(bucket_bytes))  # warm-up, group setup
                    metrics = []
                    for _ in range(args.repeats):
                        version += 1
                        metrics.append(sync.push(version, source.state_dict_stream(bucket_bytes)))
                    landed = ray.get([w.ping.remote() for w in workers[:n]])
                    assert all(p["policy_version"] == version for p in landed), landed
                    secs = [m.seconds for m in metrics]
                    row = {
                        "model": model_name,
                        "params": n_params,
                        "transport": transport,
                        "workers": n,
                        "gb_per_push": metrics[0].num_bytes / 1e9,
                        "buckets": metrics[0].num_buckets,
                        "seconds_median": median(secs),
                        "seconds_runs": secs,
                        # payload GB/s as SyncMetrics reports it (bytes of the weights once)
                        "gb_per_s_median": metrics[0].num_bytes / 1e9 / median(secs),
                        # bytes delivered: every worker receives its own copy
                        "delivered_gb_per_s_median": n * metrics[0].num_bytes / 1e9 / median(secs),
                    }
                    rows.append(row)
                    print(
                        f"{model_name} {transport} workers={n}: {row['seconds_median']:.3f}s/sync, "
                        f"{row['gb_per_s_median']:.2f} GB/s payload, "
                        f"{row['delivered_gb_per_s_median']:.2f} GB/s delivered",
                        flush=True,
                    )
            for w in workers:
                ray.kill(w)
            del source, workers
    ray.shutdown()
    write_json(
        args.out,
        {
            "benchmark": "weight_sync",
            "command": command_line(),
            "machine": info,
            "settings": {**vars(args), "arch_05b": ARCH_05B, "dtype": "float32"},
            "memcpy": mem,
            "sync": rows,
            "torch_threads_driver": torch.get_num_threads(),
            "total_seconds": time.perf_counter() - t0,
        },
    )


if __name__ == "__main__":
    main()
