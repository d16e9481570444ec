"""--plot: a PNG or SVG when matplotlib is there; a clear install hint when it is not."""

from __future__ import annotations

import builtins
import importlib.util
from pathlib import Path

import pytest

from bnaudit.errors import UsageError
from bnaudit.report.plot import check_plot_target
from tests.conftest import bn_state, call_main, save_ranks

CHANNELS = {"stem": 4, "layer1": 8}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def ranks(tmp_path, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    states = [bn_state(CHANNELS, rng, shift=2.0 * r) for r in range(3)]
    return [p.name for p in save_ranks(tmp_path, states)]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs the plot extra (matplotlib)")
@pytest.mark.parametrize(("name", "magic"), [("plot.png", b"\x89PNG\r\n\x1a\n"), ("plot.svg", b"<?xml")])
def test_plot_is_written(capsys, tmp_path, ranks, name, magic):
    code, _, err = call_main(capsys, "compare", *ranks, "--plot", name)
    assert code == 1 and f"plot written to {name}" in err
    data = (tmp_path / name).read_bytes()
    assert data.startswith(magic)
    if name.endswith(".svg"):
        text = data.decode()
        assert "<svg" in text and "stem.bn" in text and "layer1.bn" in text


def test_without_matplotlib_says_how_to_install(capsys, tmp_path, ranks, monkeypatch):
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else object()
    )
    code, out, err = call_main(capsys, "compare", *ranks, "--plot", "plot.png")
    assert code == 2 and out == "" and "pip install 'bnaudit[plot]'" in err
    assert not (tmp_path / "plot.png").exists()


def test_plot_needs_png_or_svg(capsys, ranks):
    code, _, err = call_main(capsys, "compare", *ranks, "--plot", "plot.pdf")
    assert code == 2 and "must end in .png or .svg" in err


def test_a_bad_plot_target_names_the_file_the_option_and_the_suffix():
    with pytest.raises(UsageError) as exc:
        check_plot_target(Path("out.jpg"))
    assert (exc.value.fields.path, exc.value.fields.where, exc.value.fields.found) == (
        "out.jpg",
        "--plot",
        "'.jpg'",
    )
