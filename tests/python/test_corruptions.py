"""`stic corrupt` against torchvision, on PIL images as in the official STIC `generate_pref.py`.

The colour jitter draws its factors from another random generator than torch's, so the outputs are compared as
distributions: for each output, the ratio of mean HSV value to the source's (the brightness factor, less any
clipping) and the median hue change of the colourful pixels (the hue shift in 1/256 turns). Seeds are fixed, so
the test is deterministic.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import IMAGES, STIC, run_stic

SAMPLES = 300
KS_ALPHA = 0.001


def stic_corrupt(source, output, kind, seed=0):
    assert STIC.is_file(), f"{STIC} is missing: build it first (cargo build --release)"
    run_stic("corrupt", "--image", source, "--output", output, "--kind", kind, "--seed", seed, timeout=120)
    return Image.open(output).convert("RGB")


def source_image(folder, size):
    path = folder / f"source_{size[0]}x{size[1]}.png"
    Image.open(IMAGES / "chelsea.png").convert("RGB").resize(size, Image.BICUBIC).save(path)
    return path


def hsv(img):
    return np.asarray(img.convert("HSV"), dtype=np.int16)


def jitter_statistics(source, jittered):
    """(mean-value ratio, median hue shift of the pixels with saturation and value >= 64)."""
    before, after = hsv(source), hsv(jittered)
    value_ratio = after[..., 2].mean() / before[..., 2].mean()
    colourful = (before[..., 1] >= 64) & (before[..., 2] >= 64)
    hue_shift = (after[..., 0] - before[..., 0] + 128) % 256 - 128
    return value_ratio, float(np.median(hue_shift[colourful]))


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical_value(n, m, alpha=KS_ALPHA):
    return float(np.sqrt(-np.log(alpha / 2) / 2 * (n + m) / (n * m)))


def jitter_samples(tmp_path):
    """Statistics of SAMPLES torchvision and SAMPLES `stic corrupt` colour jitters of the same image."""
    source_path = source_image(tmp_path, (96, 64))
    source = Image.open(source_path).convert("RGB")
    torch.manual_seed(0)
    jitter = T.ColorJitter(brightness=0.5, hue=0.3)
    torchvision_stats = np.array([jitter_statistics(source, jitter(source)) for _ in range(SAMPLES)])

    def rust_stats(seed):
        return jitter_statistics(source, stic_corrupt(source_path, tmp_path / f"jitter_{seed}.png", "color_jitter", seed))

    with ThreadPoolExecutor(max_workers=8) as pool:
        rust = np.array(list(pool.map(rust_stats, range(SAMPLES))))
    return torchvision_stats, rust


def test_color_jitter_matches_torchvision_in_distribution(tmp_path):
    torchvision_stats, rust = jitter_samples(tmp_path)
    critical = ks_critical_value(SAMPLES, SAMPLES)
    for column, name, quantile_tolerance in [(0, "value ratio", 0.06), (1, "hue shift", 9.0)]:
        ours, theirs = rust[:, column], torchvision_stats[:, column]
        ks = ks_statistic(ours, theirs)
        assert ks < critical, f"{name}: KS statistic {ks:.3f} >= {critical:.3f}"
        gaps = np.abs(np.quantile(ours, [0.05, 0.25, 0.5, 0.75, 0.95]) - np.quantile(theirs, [0.05, 0.25, 0.5, 0.75, 0.95]))
        assert gaps.max() < quantile_tolerance, f"{name}: quantile gaps {gaps}"
    # The stated ranges: brightness factor in [0.5, 1.5], hue shift within 0.3 turn (76/255).
    assert 0.49 <= rust[:, 0].min() < 0.55 and 1.35 < rust[:, 0].max() <= 1.51, rust[:, 0]
    assert -77 <= rust[:, 1].min() < -65 and 65 < rust[:, 1].max() <= 77, rust[:, 1]


def test_color_jitter_depends_only_on_the_seed(tmp_path):
    source = source_image(tmp_path, (40, 30))
    first = np.asarray(stic_corrupt(source, tmp_path / "a.png", "color_jitter", seed=5))
    assert np.array_equal(first, np.asarray(stic_corrupt(source, tmp_path / "b.png", "color_jitter", seed=5)))
    assert not np.array_equal(first, np.asarray(stic_corrupt(source, tmp_path / "c.png", "color_jitter", seed=6)))


@pytest.mark.parametrize("size", [(96, 64), (64, 96), (50, 50), (451, 300), (30, 1000), (15, 12)])
def test_resize20_gives_torchvision_sizes(tmp_path, size):
    source = source_image(tmp_path, size)
    ours = stic_corrupt(source, tmp_path / "small.png", "resize20")
    theirs = T.Resize(20)(Image.open(source).convert("RGB"))
    assert ours.size == theirs.size
    # Bilinear with antialias, as torchvision resizes PIL images: the same bytes.
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
