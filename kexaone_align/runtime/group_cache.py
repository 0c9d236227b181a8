"""GROUPER's sampled groups on disk: append-only, indexed, and cut back to a checkpoint on resume.

GROUPER samples G responses per prompt once (from pi_init, or once per refresh generation) and reuses
them whenever the prompt comes round. At 236B that is e.g. 100k prompts x 8 responses x up to 32K
tokens, hundreds of GB: too much for the driver's memory and far too much to pickle into every
checkpoint. So the groups live in ``<run_dir>/group_cache/gen_<g>/groups.bin``, one record per prompt,
written once and fsynced before they count; an in-memory index (prompt id -> offset, rebuilt from the
record headers on open) lets a step read only the groups it trains on. A checkpoint stores only
:meth:`GroupCache.position` (generation, groups, bytes). Opening the cache at that position truncates
whatever a crashed run wrote after it, so a resumed run reads exactly the groups the uninterrupted one
did, and a record torn by a crash is never read back.

Record layout (little-endian): magic ``KXG1``, crc32 of key and payload (u32), key length (u32),
payload length (u64), the key (prompt id, utf-8), then the payload: a JSON header (u32 length first),
the prompt's token ids (int32, stored once per group: every sample of a group shares its prompt), every
sample's token ids (int32), and every sample's log-probs (float32, or float64 when float32 would round
them, so the round trip is exact).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.checkpoint import fsync_path
from kexaone_align.runtime.rollout.base import RolloutSample

MAGIC = b"KXG1"
_HEADER = struct.Struct("<4sIIQ")  # magic, crc32, key length, payload length
_U32 = struct.Struct("<I")
DATA_FILE = "groups.bin"
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class CachePosition:
    """Where the cache stands: the refresh generation and how much of its file is committed."""

    generation: int = 0
    groups: int = 0
    nbytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"generation": self.generation, "groups": self.groups, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CachePosition:
        """Read what ``as_dict`` wrote (a checkpoint's trainer state)."""
        try:
            position = cls(int(data["generation"]), int(data["groups"]), int(data["nbytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KexaoneError(f"group cache position {data!r} is malformed ({exc})") from None
        if min(position.generation, position.groups, position.nbytes) < 0:
            raise KexaoneError(f"group cache position {data!r} has a negative field")
        return position


@dataclass
class CachedGroup:
    """One prompt's G samples and their rewards, in sample order."""

    key: str
    samples: list[RolloutSample]
    rewards: list[float]


class GroupCache:
    """The groups of the current refresh generation, on disk under ``root``.

    ``GroupCache(root)`` starts clean (a fresh run: anything under ``root`` is removed);
    ``GroupCache(root, position)`` resumes at a checkpoint's position: generations after it are removed
    and its own file is truncated to ``position.nbytes``. Earlier generations stay on disk so that an
    older checkpoint can still be resumed from; they are never read by a later generation.
    """

    def __init__(self, root: str | Path, position: CachePosition | None = None) -> None:
        self.root = Path(root)
        self._index: dict[str, tuple[int, int]] = {}  # key -> (offset, record size)
        self._file: BinaryIO | None = None
        self._end = 0
        if position is None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.generation = 0
            self._create(0)
            return
        self.generation = position.generation
        for gen in self._generations_on_disk():
            if gen > position.generation:
                shutil.rmtree(self._dir(gen))
        path = self._dir(position.generation) / DATA_FILE
        if not path.is_file():
            raise KexaoneError(
                f"group cache: {path} is missing, but the checkpoint needs {position.groups} group(s) of "
                f"generation {position.generation} from it"
            )
        size = path.stat().st_size
        if size < position.nbytes:
            raise KexaoneError(
                f"group cache: {path} has {size} bytes, fewer than the {position.nbytes} the checkpoint "
                "committed; the cache was truncated or replaced after the checkpoint was written"
            )
        self._file = open(path, "r+b")  # held open until close()
        self._file.truncate(position.nbytes)
        self._fsync()
        self._end = position.nbytes
        self._scan()
        if len(self._index) != position.groups:
            raise KexaoneError(
                f"group cache: {path} holds {len(self._index)} group(s) in its first {position.nbytes} "
                f"bytes, the checkpoint recorded {position.groups}"
            )

    # ----------------------------------------------------------------------------------- layout
    def _dir(self, generation: int) -> Path:
        return self.root / f"gen_{generation:06d}"

    def _generations_on_disk(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name[4:]) for p in self.root.iterdir() if p.name.startswith("gen_") and p.name[4:].isdigit()
        )

    def _create(self, generation: int) -> None:
        directory = self._dir(generation)
        shutil.rmtree(directory, ignore_errors=True)  # left over by a run that crashed before a checkpoint
        directory.mkdir(parents=True)
        self._file = open(directory / DATA_FILE, "w+b")
        self._fsync()
        fsync_path(directory)
        fsync_path(self.root)
        self._index, self._end = {}, 0

    def _scan(self) -> None:
        """Index the records of the committed range ``[0, _end)`` from their headers alone."""
        fh = self._require_file()
        offset = 0
        while offset < self._end:
            fh.seek(offset)
            head = fh.read(_HEADER.size)
            if len(head) < _HEADER.size:
                break
            magic, _, key_len, payload_len = _HEADER.unpack(head)
            size = _HEADER.size + key_len + payload_len
            if magic != MAGIC or offset + size > self._end:
                break
            key = fh.read(key_len).decode("utf-8")
            self._index[key] = (offset, size)
            offset += size
        if offset != self._end:
            raise KexaoneError(
                f"group cache: the committed part of {fh.name} ends inside a record (byte {offset} of "
                f"{self._end}); the file was changed after the checkpoint"
            )

    def _require_file(self) -> BinaryIO:
        if self._file is None:
            raise KexaoneError("group cache is closed")
        return self._file

    def _fsync(self) -> None:
        fh = self._require_file()
        fh.flush()
        os.fsync(fh.fileno())

    # --------------------------------------------------------------------------------------- API
    def start_generation(self, generation: int) -> None:
        """Begin refresh generation ``generation`` (newer than the current one) with an empty cache."""
        if generation <= self.generation:
            raise KexaoneError(
                f"group cache: generation {generation} is not newer than the current {self.generation}"
            )
        self.close()
        self.generation = generation
        self._create(generation)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        """Prompt ids in the order their groups were written."""
        return list(self._index)

    def append(self, groups: Iterable[CachedGroup]) -> None:
        """Write ``groups`` after the last committed record and fsync; only then do they count.

        Writing always starts at the end of the last good record, so bytes of an append that failed
        half-way are overwritten rather than read back.
        """
        records: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for group in groups:
            if group.key in self._index or group.key in seen:
                raise KexaoneError(f"group cache already holds a group for prompt {group.key!r}")
            seen.add(group.key)
            records.append((group.key, _encode(group)))
        if not records:
            return
        fh = self._require_file()
        fh.seek(self._end)
        fh.truncate()
        fh.write(b"".join(blob for _, blob in records))
        self._fsync()
        for key, blob in records:
            self._index[key] = (self._end, len(blob))
            self._end += len(blob)

    def load(self, keys: Sequence[str]) -> list[CachedGroup]:
        """The groups of ``keys``, in that order, read from disk (a key may repeat)."""
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise KexaoneError(
                f"group cache (generation {self.generation}) has no group for prompt(s) {missing[:5]}"
            )
        fh = self._require_file()
        out = []
        for key in keys:
            offset, size = self._index[key]
            fh.seek(offset)
            out.append(_decode(fh.read(size), key))
        return out

    def position(self) -> CachePosition:
        """What a checkpoint records: everything up to here is durable on disk."""
        return CachePosition(self.generation, len(self._index), self._end)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> GroupCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ records
def _encode(group: CachedGroup) -> bytes:
    samples = group.samples
    if not samples:
        raise KexaoneError(f"group cache: the group of prompt {group.key!r} has no samples")
    if len(group.rewards) != len(samples):
        raise KexaoneError(
            f"group cache: prompt {group.key!r} has {len(samples)} samples but {len(group.rewards)} rewards"
        )
    prompt = [int(t) for t in samples[0].prompt_token_ids]
    if any([int(t) for t in s.prompt_token_ids] != prompt for s in samples[1:]):
        raise KexaoneError(f"group cache: the samples of prompt {group.key!r} do not share one prompt")
    ids = np.asarray(prompt + [int(t) for s in samples for t in s.token_ids], dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > _INT32_MAX):
        raise KexaoneError(f"group cache: prompt {group.key!r} has token ids outside int32")
    logprobs = np.asarray([float(x) for s in samples for x in s.logprobs], dtype=np.float64)
    narrow = logprobs.astype(np.float32)
    wide = not np.array_equal(narrow.astype(np.float64), logprobs, equal_nan=True)
    header = {
        "prompt_tokens": len(prompt),
        "logprob_bytes": 8 if wide else 4,
        "rewards": [float(r) for r in group.rewards],
        "samples": [
            {
                "request_id": s.request_id,
                "sample_index": int(s.sample_index),
                "tokens": len(s.token_ids),
                "logprobs": len(s.logprobs),
                "finish_reason": s.finish_reason,
                "policy_version": int(s.policy_version),
                "metadata": s.metadata,
                **({"policy_mask": [int(m) for m in s.policy_mask]} if s.policy_mask is not None else {}),
            }
            for s in samples
        ],
    }
    try:
        meta = json.dumps(header, separators=(",", ":")).encode("utf-8")
    except TypeError as exc:
        raise KexaoneError(
            f"group cache: sample metadata of prompt {group.key!r} is not JSON ({exc})"
        ) from None
    stored = logprobs.astype("<f8") if wide else narrow.astype("<f4")
    payload = b"".join([_U32.pack(len(meta)), meta, ids.astype("<i4").tobytes(), stored.tobytes()])
    key = group.key.encode("utf-8")
    return _HEADER.pack(MAGIC, zlib.crc32(key + payload), len(key), len(payload)) + key + payload


def _decode(record: bytes, key: str) -> CachedGroup:
    magic, crc, key_len, payload_len = _HEADER.unpack_from(record)
    body = record[_HEADER.size :]
    if magic != MAGIC or len(body) != key_len + payload_len or zlib.crc32(body) != crc:
        raise KexaoneError(f"group cache: the record of prompt {key!r} is corrupt (checksum mismatch)")
    payload = body[key_len:]
    (meta_len,) = _U32.unpack_from(payload)
    header = json.loads(payload[_U32.size : _U32.size + meta_len])
    rest = payload[_U32.size + meta_len :]
    specs = header["samples"]
    n_ids = header["prompt_tokens"] + sum(s["tokens"] for s in specs)
    ids = np.frombuffer(rest, dtype="<i4", count=n_ids).tolist()
    lp_type = "<f8" if header["logprob_bytes"] == 8 else "<f4"
    logprobs = np.frombuffer(rest, dtype=lp_type, offset=4 * n_ids).astype(np.float64).tolist()
    prompt, pos, lp_pos = ids[: header["prompt_tokens"]], header["prompt_tokens"], 0
    samples = []
    for spec in specs:
        samples.append(
            RolloutSample(
                request_id=spec["request_id"],
                sample_index=spec["sample_index"],
                prompt_token_ids=list(prompt),
                token_ids=ids[pos : pos + spec["tokens"]],
                logprobs=logprobs[lp_pos : lp_pos + spec["logprobs"]],
                finish_reason=spec["finish_reason"],
                policy_version=spec["policy_version"],
                metadata=spec["metadata"],
                policy_mask=spec.get("policy_mask"),
            )
        )
        pos += spec["tokens"]
        lp_pos += spec["logprobs"]
    return CachedGroup(key, samples, [float(r) for r in header["rewards"]])
