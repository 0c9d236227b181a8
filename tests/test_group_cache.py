"""The on-disk GROUPER group cache: exact round trips, truncation to a checkpoint's position, torn
records never read back, and a refresh generation that starts clean."""

from __future__ import annotations

import pytest

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.group_cache import DATA_FILE, CachedGroup, CachePosition, GroupCache
from kexaone_align.runtime.rollout.base import RolloutSample


def group(key: str, g: int = 3, version: int = 0, n: int = 4) -> CachedGroup:
    prompt = [5, 6, 7, len(key)]
    samples = []
    for i in range(g):
        sample = RolloutSample(
            request_id=f"s0-{i}-{key}", sample_index=i, prompt_token_ids=list(prompt),
            token_ids=[100 + i + t for t in range(n + i)],
            logprobs=[-0.125 * (t + 1) - i for t in range(n + i)],  # exact in float32
            finish_reason="stop" if i % 2 else "length", policy_version=version, metadata={"row": i},
        )  # fmt: skip
        samples.append(sample)
    return CachedGroup(key, samples, [0.25 * i for i in range(g)])


def test_round_trip_keeps_every_sample_field(tmp_path):
    odd = group("odd", version=7)
    odd.samples[0].logprobs[0] = -0.1  # not a float32 value: stored wide, still exact
    odd.samples[1].token_ids.append(153_599)
    odd.samples[1].logprobs.append(-1e-30)
    wanted = [group("a"), odd, group("b", g=2, n=0)]  # an empty response is a valid sample too
    with GroupCache(tmp_path / "cache") as cache:
        cache.append(wanted)
        assert len(cache) == 3 and "odd" in cache and "c" not in cache
        assert cache.load(["odd", "a", "odd"]) == [wanted[1], wanted[0], wanted[1]]
        position = cache.position()
    with GroupCache(tmp_path / "cache", position) as reopened:
        assert reopened.keys() == ["a", "odd", "b"]
        got = reopened.load(["a", "odd", "b"])
    assert got == wanted
    assert got[1].samples[0].logprobs[0] == -0.1 and got[1].samples[0].policy_version == 7
    assert got[1].samples[1].finish_reason == "stop" and got[1].samples[1].metadata == {"row": 1}


def test_reopening_at_a_position_drops_what_was_written_after_it(tmp_path):
    root = tmp_path / "cache"
    cache = GroupCache(root)
    cache.append([group("a"), group("b")])
    checkpoint = CachePosition.from_dict(cache.position().as_dict())  # through the trainer state
    cache.append([group("c")])
    cache.start_generation(1)  # a refresh after the checkpoint, then a crash
    cache.append([group("x")])
    cache.close()
    with GroupCache(root, checkpoint) as resumed:
        assert resumed.keys() == ["a", "b"] and resumed.generation == 0
        assert (root / "gen_000000" / DATA_FILE).stat().st_size == checkpoint.nbytes
        assert not (root / "gen_000001").exists()
        with pytest.raises(KexaoneError, match="no group for prompt"):
            resumed.load(["c"])
        resumed.append([group("c", version=3)])  # sampled again, as the uninterrupted run did
        assert resumed.load(["c"])[0].samples[0].policy_version == 3


def test_torn_record_after_the_position_is_never_read(tmp_path):
    root = tmp_path / "cache"
    with GroupCache(root) as cache:
        cache.append([group("a")])
        position = cache.position()
    with GroupCache(tmp_path / "scratch") as scratch:
        scratch.append([group("b")])
        record = (scratch.root / "gen_000000" / DATA_FILE).read_bytes()
    with open(root / "gen_000000" / DATA_FILE, "ab") as fh:  # a crash half-way through appending "b"
        fh.write(record[: len(record) // 2])
    with GroupCache(root, position) as resumed:
        assert resumed.keys() == ["a"]
        resumed.append([group("b")])
        assert resumed.load(["a", "b"]) == [group("a"), group("b")]


def test_a_failed_append_is_overwritten_not_read(tmp_path):
    with GroupCache(tmp_path / "cache") as cache:
        cache.append([group("a")])
        with open(cache.root / "gen_000000" / DATA_FILE, "ab") as fh:  # bytes of an append that failed
            fh.write(b"half a record")
        cache.append([group("b")])
        position = cache.position()
    with GroupCache(tmp_path / "cache", position) as reopened:
        assert reopened.load(["a", "b"]) == [group("a"), group("b")]


def test_refresh_generation_starts_clean_and_fresh_run_wipes(tmp_path):
    root = tmp_path / "cache"
    with GroupCache(root) as cache:
        cache.append([group("a"), group("b")])
        cache.start_generation(1)
        assert len(cache) == 0 and "a" not in cache and cache.position() == CachePosition(1, 0, 0)
        cache.append([group("a", version=4)])
        assert cache.load(["a"])[0].samples[0].policy_version == 4
        with pytest.raises(KexaoneError, match="not newer"):
            cache.start_generation(1)
        position = cache.position()
    with GroupCache(root, position) as resumed:
        assert resumed.keys() == ["a"] and resumed.load(["a"])[0].samples[0].policy_version == 4
    with GroupCache(root) as fresh:  # a fresh run (no checkpoint) starts with nothing
        assert len(fresh) == 0 and sorted(p.name for p in root.iterdir()) == ["gen_000000"]


def test_bad_input_and_damaged_files_are_clear_errors(tmp_path):
    root = tmp_path / "cache"
    with GroupCache(root) as cache:
        cache.append([group("a")])
        with pytest.raises(KexaoneError, match="already holds"):
            cache.append([group("a")])
        mixed = group("m")
        mixed.samples[1].prompt_token_ids = [1]
        with pytest.raises(KexaoneError, match="share one prompt"):
            cache.append([mixed])
        short = group("s")
        short.rewards.pop()
        with pytest.raises(KexaoneError, match="rewards"):
            cache.append([short])
        position = cache.position()
    data = root / "gen_000000" / DATA_FILE
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 0xFF  # a flipped bit inside the record
    data.write_bytes(bytes(blob))
    with GroupCache(root, position) as damaged, pytest.raises(KexaoneError, match="corrupt"):
        damaged.load(["a"])
    with pytest.raises(KexaoneError, match="ends inside a record"):
        GroupCache(root, CachePosition(0, 1, 10))
    with pytest.raises(KexaoneError, match="fewer than"):
        GroupCache(root, position)
    with pytest.raises(KexaoneError, match="holds 0 group"):
        GroupCache(root, CachePosition(0, 1, 0))
    with pytest.raises(KexaoneError, match="missing"):
        GroupCache(root, CachePosition(5, 0, 0))
    with pytest.raises(KexaoneError, match="malformed"):
        CachePosition.from_dict({"generation": 0})
