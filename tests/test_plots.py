"""Tests of stage1core.plots: each figure lands on disk as a sane PNG and no figure is left open."""

from __future__ import annotations

import struct

import matplotlib.pyplot as plt
import numpy as np
import pytest

from stage1core.metrics import risk_coverage_curve
from stage1core.plots import plot_fnr_fpr, plot_reliability, plot_risk_coverage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n=800, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 1.5, -1.5), 1.2)))
    return y, p


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 300 <= width <= 2000 and 200 <= height <= 2000
    assert 5_000 < len(data) < 2_000_000
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.fixture(autouse=True)
def _no_open_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def test_plot_fnr_fpr(tmp_path):
    y, p = _data()
    out = plot_fnr_fpr(y, p, tmp_path / "sub" / "fnr_fpr.png", threshold=0.31, alpha=0.02)
    assert out == tmp_path / "sub" / "fnr_fpr.png"
    _assert_png(out)


def test_plot_fnr_fpr_without_markers_and_overwrite(tmp_path):
    y, p = _data()
    path = tmp_path / "fnr_fpr.png"
    plot_fnr_fpr(y, p, path)
    first = path.read_bytes()
    plot_fnr_fpr(y, p, str(path), threshold=0.5)
    _assert_png(path)
    assert path.read_bytes() != first


def test_plot_reliability(tmp_path):
    y, p = _data()
    overconfident = np.clip((p - 0.5) * 1.8 + 0.5, 0, 1)
    out = plot_reliability(y, {"before": overconfident, "after": p}, tmp_path / "rel.png")
    _assert_png(out)
    with pytest.raises(ValueError, match="empty"):
        plot_reliability(y, {}, tmp_path / "none.png")


def test_plot_risk_coverage(tmp_path):
    y, p = _data()
    pred = (p >= 0.5).astype(int)
    curves = {
        "max-prob": risk_coverage_curve(y, pred, np.maximum(p, 1 - p))[:2],
        "random": risk_coverage_curve(y, pred, np.random.default_rng(1).random(y.size))[:2],
    }
    _assert_png(plot_risk_coverage(curves, tmp_path / "rc.png"))
    with pytest.raises(ValueError, match="shape"):
        plot_risk_coverage({"bad": ([0.5, 1.0], [0.1])}, tmp_path / "bad.png")
