"""Finding verifiers: @register_verifier, entry points, module:attr and path/file.py:attr references."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from kexaone_align.verifiers import (
    Sample,
    VerifyResult,
    get_verifier,
    loading,
    register_verifier,
    registered_names,
    resolve_verifier,
)

from kexaone_align.errors import KexaoneError

SAMPLE = Sample(prompt="p", response="hello", reference="hello", task="echo")


def test_builtins_and_aliases_are_registered() -> None:
    names = set(registered_names())
    assert {"math", "ifeval", "instruction_following", "format", "choice", "stem"} <= names
    assert type(get_verifier("stem")) is type(get_verifier("choice"))


def test_register_function_and_class(tmp_path: Path) -> None:
    @register_verifier("test_loading_fn")
    def exact(sample: Sample) -> float:
        return float(sample.response == sample.reference)

    @register_verifier("test_loading_cls")
    class Half:
        name = "test_loading_cls"

        def verify(self, sample: Sample) -> VerifyResult:
            return VerifyResult(0.5, {"why": "half"})

    assert get_verifier("test_loading_fn").verify(SAMPLE).reward == 1.0
    assert get_verifier("test_loading_cls").verify(SAMPLE).details == {"why": "half"}
    with pytest.raises(KexaoneError, match="already registered"):
        register_verifier("test_loading_fn")(exact)


def _write_plugin(root: Path, dist: str, module: str, entry_points: str, body: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kexaone_align.verifiers]\n" + entry_points)


def test_entry_point_plugins_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_plugin(
        tmp_path,
        "kx_demo_plugin",
        "kx_demo_plugin_mod",
        "kx_shout = kx_demo_plugin_mod:shout\nkx_self_registering = kx_demo_plugin_mod:Registered\n"
        "kx_broken = kx_demo_plugin_missing:nothing\n",
        """
        from kexaone_align.verifiers import register_verifier, VerifyResult

        def shout(sample):
            return float(sample.response.isupper())

        @register_verifier("kx_self_registering")
        class Registered:
            name = "kx_self_registering"
            def verify(self, sample):
                return VerifyResult(1.0, {"plugin": True})
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loading.discover_entry_points(refresh=True)
    names = registered_names()
    assert {"kx_shout", "kx_self_registering", "kx_broken"} <= set(names)
    assert get_verifier("kx_shout").verify(Sample(prompt="p", response="HEY")).reward == 1.0
    # A plugin that registers itself with the decorator on import does not clash with its entry point.
    assert get_verifier("kx_self_registering").verify(SAMPLE).details == {"plugin": True}
    with pytest.raises(KexaoneError, match=r"kx_broken.*failed to load"):
        get_verifier("kx_broken")


def test_module_attr_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = """
        from kexaone_align.verifiers import VerifyResult

        class Box:
            class Inner:
                def verify(self, sample):
                    return VerifyResult(0.75)

        def fn(sample):
            return 0.25
        """
    (tmp_path / "kx_refmod.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_verifier("kx_refmod:fn").verify(SAMPLE).reward == 0.25
    nested = resolve_verifier("kx_refmod:Box.Inner")
    assert nested.verify(SAMPLE).reward == 0.75 and nested.name == "Inner"
    with pytest.raises(KexaoneError, match="cannot import module 'kx_nope_mod'"):
        resolve_verifier("kx_nope_mod:fn")
    with pytest.raises(KexaoneError, match="has no attribute 'missing'"):
        resolve_verifier("kx_refmod:missing")


def test_file_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = tmp_path / "my rewards" / "reward.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "from kexaone_align.verifiers import register_verifier\n"
        "@register_verifier('kx_file_registered')\n"
        "def length_reward(sample):\n    return min(1.0, len(sample.response) / 10)\n"
        "NOT_A_VERIFIER = 3\n"
    )
    v = resolve_verifier(f"{plugin}:length_reward")
    assert v.verify(SAMPLE).reward == 0.5
    # Relative to a recipe's folder, and loading twice does not re-run the file's registrations.
    again = resolve_verifier("my rewards/reward.py:length_reward", base_dir=tmp_path)
    assert again.verify(SAMPLE).reward == 0.5
    monkeypatch.chdir(tmp_path)
    assert resolve_verifier("my rewards/reward.py:length_reward").name == "length_reward"
    with pytest.raises(KexaoneError, match="not a verifier"):
        resolve_verifier(f"{plugin}:NOT_A_VERIFIER")
    with pytest.raises(KexaoneError, match="does not exist"):
        resolve_verifier(f"{tmp_path}/nope.py:fn")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('plugin exploded')\n")
    with pytest.raises(KexaoneError, match="plugin exploded"):
        resolve_verifier(f"{bad}:fn")


def test_bad_names_give_clear_errors() -> None:
    with pytest.raises(KexaoneError, match=r"no verifier named 'nope'.*known:.*math"):
        resolve_verifier("nope")
    with pytest.raises(KexaoneError, match="must look like"):
        resolve_verifier("module:")
    with pytest.raises(KexaoneError, match="empty"):
        resolve_verifier("  ")
    assert "kexaone_align" in sys.modules
