"""Peak memory of chunked vs naive token log-probabilities (forward + backward) on CPU, fp32.

Each (implementation, sequence length, repeat) runs in a fresh subprocess: the child allocates the
inputs (hidden ``[S, H]``, LM head ``[V, H]``, targets), reads its resident set size, resets the
kernel's high-water mark (``/proc/self/clear_refs`` = 5), runs forward + backward with gradients for
both hidden and weight, and reports ``VmHWM - baseline``: the extra memory the computation needed.

The full sweep at the real hidden size (6,144) is out of reach on a 2-core CPU (a 16K forward +
backward is ~120 TFLOP). The logits, the part the chunking is about, do not depend on the hidden
size, so the sweep runs at ``--hidden`` (default 64) and the JSON also gives a projection to H=6,144
that adds the terms that scale with H (fp32 grad of the weight ``V*H*4`` and of hidden ``S*H*4``).
``--real-hidden-check`` additionally measures both implementations once at S=1K, H=6,144.

    python benchmarks/logprob_memory.py --out benchmarks/results/logprob_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median, write_json

VOCAB = 153_600
REAL_HIDDEN = 6_144


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(impl: str, seq: int, hidden_size: int, vocab: int, chunk: int, threads: int) -> None:
    """Run one measurement in this (fresh) process and print one JSON line."""
    import torch

    from kexaone_align.algorithms.logprobs import chunked_token_logprobs, naive_token_logprobs

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seq)
    hidden = torch.randn(seq, hidden_size, generator=gen).mul_(0.1).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).mul_(0.02).requires_grad_()
    targets = torch.randint(0, vocab, (seq,), generator=gen)
    baseline_kb = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    # A sampling thread as a second opinion (and the only one where clear_refs is not allowed).
    sampled = [baseline_kb]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled[0] = max(sampled[0], _status_kb("VmRSS"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if impl == "chunked":
        out = chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk)
    else:
        out = naive_token_logprobs(hidden, weight, targets)
    out.sum().backward()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    hwm_kb = _status_kb("VmHWM") if reset else sampled[0]
    print(
        json.dumps(
            {
                "peak_extra_bytes": (hwm_kb - baseline_kb) * 1024,
                "sampled_extra_bytes": (sampled[0] - baseline_kb) * 1024,
                "hwm_reset": reset,
                "seconds": seconds,
                "finite": bool(torch.isfinite(out).all() and torch.isfinite(weight.grad).all()),
            }
        )
    )


def run_point(impl: str, seq: int, hidden: int, vocab: int, chunk: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        str(seq),
        str(hidden),
        str(vocab),
        str(chunk),
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {impl} S={seq} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep(
    impl: str,
    seqs: list[int],
    hidden: int,
    vocab: int,
    chunk: int,
    threads: int,
    repeats: int,
    max_seq_full: int,
    large_repeats: int,
):
    rows = []
    for seq in seqs:
        n = repeats if seq <= max_seq_full else large_repeats
        runs = [run_point(impl, seq, hidden, vocab, chunk, threads) for _ in range(n)]
        peaks = [r["peak_extra_bytes"] for r in runs]
        row = {
            "impl": impl,
            "seq": seq,
            "hidden": hidden,
            "peak_extra_bytes_median": median(peaks),
            "peak_extra_bytes_runs": peaks,
            "sampled_extra_bytes_runs": [r["sampled_extra_bytes"] for r in runs],
            "seconds_median": median([r["seconds"] for r in runs]),
            "all_finite": all(r["finite"] for r in runs),
        }
        rows.append(row)
        print(
            f"{impl:8s} S={seq:6d} H={hidden}: peak extra {row['peak_extra_bytes_median'] / 1e9:.3f} GB "
            f"({row['seconds_median']:.1f}s)",
            flush=True,
        )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, seq, hidden, vocab, chunk, threads = sys.argv[2:8]
        child(impl, int(seq), int(hidden), int(vocab), int(chunk), int(threads))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/logprob_memory.json")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the sweep (see module doc)")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--chunked-seqs", default="1024,2048,4096,8192,16384")
    ap.add_argument("--naive-seqs", default="1024,2048,4096", help="only where naive fits in memory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--large-repeats",
        type=int,
        default=1,
        help="repeats above --max-seq-full-repeats (a 16K run takes minutes on 2 shared cores)",
    )
    ap.add_argument("--max-seq-full-repeats", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real-hidden-check", action="store_true", help="also one run each at S=1K, H=6144")
    ap.add_argument(
        "--real-hidden-only",
        action="store_true",
        help="only the S=1K, H=6144 check (each implementation once), with its own JSON",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    info = machine_info()
    if args.real_hidden_only:
        check = {}
        for impl in ("chunked", "naive"):
            check[impl] = run_point(impl, 1024, REAL_HIDDEN, args.vocab, args.chunk_size, args.threads)
            print(
                f"{impl} S=1024 H={REAL_HIDDEN}: peak extra {check[impl]['peak_extra_bytes'] / 1e9:.3f} GB "
                f"({check[impl]['seconds']:.0f}s)",
                flush=True,
            )
        write_json(
            args.out,
            {
                "benchmark": "logprob_memory_real_hidden",
                "command": command_line(),
                "machine": info,
                "settings": {
                    "seq": 1024,
                    "hidden": REAL_HIDDEN,
                    "vocab": args.vocab,
                    "chunk_size": args.chunk_size,
                    "repeats": 1,
                },
                "runs": check,
                "total_seconds": time.perf_counter() - t0,
            },
        )
        return
    chunked_seqs = [int(s) for s in args.chunked_seqs.split(",")]
    naive_seqs = [int(s) for s in args.naive_seqs.split(",")]
    shared = (args.hidden, args.vocab, args.chunk_size, args.threads, args.repeats,
              args.max_seq_full_repeats, args.large_repeats)  # fmt: skip
    chunked = sweep("chunked", chunked_seqs, *shared)
    naive = sweep("naive", naive_seqs, *shared)

    # Naive extra memory ~ k * S * V * 4 bytes (+ small terms); k fitted from the measured points.
    logit_bytes = {s: s * args.vocab * 4 for s in naive_seqs}
    ks = [r["peak_extra_bytes_median"] / logit_bytes[r["seq"]] for r in naive]
    k = median(ks)
    h_extra = REAL_HIDDEN - args.hidden
    chunked_by_seq = {r["seq"]: r["peak_extra_bytes_median"] for r in chunked}
    naive_by_seq = {r["seq"]: r["peak_extra_bytes_median"] for r in naive}
    table = []
    for seq in chunked_seqs:
        naive_meas = naive_by_seq.get(seq)
        naive_val = naive_meas if naive_meas is not None else k * seq * args.vocab * 4
        # Terms that grow with H and are the same for both implementations: grad of weight and hidden.
        h_terms = h_extra * (args.vocab + seq) * 4
        table.append(
            {
                "seq": seq,
                "chunked_gb": chunked_by_seq[seq] / 1e9,
                "naive_gb": naive_val / 1e9,
                "naive_source": "measured" if naive_meas is not None else f"extrapolated k={k:.2f}",
                "ratio_naive_over_chunked": naive_val / chunked_by_seq[seq],
                "chunked_gb_projected_h6144": (chunked_by_seq[seq] + h_terms) / 1e9,
                "naive_gb_projected_h6144": (naive_val + h_terms) / 1e9,
                "ratio_projected_h6144": (naive_val + h_terms) / (chunked_by_seq[seq] + h_terms),
            }
        )
    real_check = None
    if args.real_hidden_check:
        real_check = {
            impl: run_point(impl, 1024, REAL_HIDDEN, args.vocab, args.chunk_size, args.threads)
            for impl in ("chunked", "naive")
        }
    payload = {
        "benchmark": "logprob_memory",
        "command": command_line(),
        "machine": info,
        "settings": {
            "vocab": args.vocab,
            "hidden": args.hidden,
            "chunk_size": args.chunk_size,
            "repeats": args.repeats,
            "large_repeats": args.large_repeats,
            "max_seq_full_repeats": args.max_seq_full_repeats,
            "threads": args.threads,
            "dtype": "float32",
            "measure": "VmHWM after clear_refs reset minus VmRSS after inputs allocated, forward+backward",
        },
        "naive_k_per_point": ks,
        "naive_k": k,
        "chunked": chunked,
        "naive": naive,
        "table": table,
        "real_hidden_check_s1024": real_check,
        "total_seconds": time.perf_counter() - t0,
    }
    for row in table:
        print(
            f"S={row['seq']:6d} chunked {row['chunked_gb']:.3f} GB naive {row['naive_gb']:.3f} GB "
            f"({row['naive_source']}) ratio {row['ratio_naive_over_chunked']:.1f}x; "
            f"projected H=6144 ratio {row['ratio_projected_h6144']:.2f}x"
        )
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
