"""The readers on the real shared folders (skipped when absent).

Reads label files and image headers only, so the whole module stays fast.
Expected numbers come from /work/shared/data/README.md and the csv files.
"""

import numpy as np
import pytest

from tfface.data.source import DataError
from tfface.data.sources import detect_format, open_source
from tfface.data.splits import split_source
from tfface.data.summary import summarize_source

pytestmark = pytest.mark.real_data


@pytest.fixture
def data_dir(shared_data, monkeypatch):
    monkeypatch.setenv("TFFACE_DATA_DIR", str(shared_data))
    return shared_data


def _needs(data_dir, name):
    if not (data_dir / name).is_dir():
        pytest.skip(f"{data_dir / name} not present")


@pytest.mark.parametrize(
    "name, count, fmt",
    [("celeba_sample", 2100, "celeba"), ("celeba_lowres", 4900, "celeba"), ("utkface", 6845, "utkface")],
)
def test_counts_and_format(data_dir, name, count, fmt):
    _needs(data_dir, name)
    assert detect_format(data_dir / name) == fmt
    source = open_source(name)
    assert len(source) == count and source.format == fmt
    assert source.problems == []


def test_celeba_sample_labels(data_dir, tmp_path, monkeypatch):
    _needs(data_dir, "celeba_sample")
    # The folder ships no landmarks; keep this machine's annotation cache out.
    monkeypatch.setenv("TFFACE_CACHE_DIR", str(tmp_path))
    source = open_source("celeba_sample")
    assert source.columns["Male"].mean() == pytest.approx(0.423, abs=0.001)
    assert len(source.columns) == 40
    # Row of 000005.jpg in attributes.csv / identities.csv.
    i = [p.endswith("/000005.jpg") for p in source.image_paths].index(True)
    assert source.columns["Arched_Eyebrows"][i] == 1 and source.columns["Attractive"][i] == 1
    assert source.columns["Male"][i] == 0 and source.columns["Young"][i] == 1
    assert source.columns["Smiling"][i] == 0
    assert source.identities[i] == 9295 and source.partition[i] == "train"
    assert source.landmarks is None


def test_utkface_labels(data_dir):
    _needs(data_dir, "utkface")
    source = open_source("utkface")
    i = [p.endswith("/10_0_0_20161220222308131.jpg.chip.jpg") for p in source.image_paths].index(True)
    assert (source.columns["age"][i], source.columns["male"][i], source.columns["race"][i]) == (10, 1, 0)
    assert source.columns["male"].mean() == pytest.approx(0.446, abs=0.001)
    np.testing.assert_array_equal(np.bincount(source.columns["race"]), [3708, 271, 1098, 1006, 762])


def test_identity_disjoint_split_across_both_celeba_folders(data_dir):
    _needs(data_dir, "celeba_sample")
    _needs(data_dir, "celeba_lowres")
    sources = [open_source(name) for name in ("celeba_sample", "celeba_lowres")]
    shared = set(sources[0].identities.tolist()) & set(sources[1].identities.tolist())
    assert len(shared) > 500  # the same people are in both folders
    splits = [split_source(source, val_fraction=0.15) for source in sources]
    train, val = (set().union(*(s[k].identities.tolist() for s in splits)) for k in ("train", "val"))
    assert train and val and not train & val
    for source, parts in zip(sources, splits):
        assert 0.12 < len(parts["val"]) / len(source) < 0.18


def test_summary_reads_headers(data_dir):
    _needs(data_dir, "celeba_lowres")
    source = open_source("celeba_lowres")
    summary = summarize_source(source)
    # A folder of more than 2,000 images: sizes from a fixed sample of its headers.
    assert summary["image_sizes"] == {"109x89": 2000}
    assert summary["image_sizes_sample"] == {"images": 2000, "of": 4900}
    assert summarize_source(source, all_sizes=True)["image_sizes"] == {"109x89": 4900}
    assert summary["columns"]["Male"]["positive_rate"] == pytest.approx(0.420, abs=0.001)


def test_bad_copy_of_real_labels_names_line(data_dir, tmp_path):
    """A real label file with one corrupted row fails on that row."""
    _needs(data_dir, "celeba_sample")
    lines = (data_dir / "celeba_sample" / "attributes.csv").read_text().splitlines()
    lines[10] = lines[10].replace(",0,", ",7,", 1)
    (tmp_path / "images").symlink_to(data_dir / "celeba_sample" / "images")
    (tmp_path / "attributes.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"attributes\.csv, line 11: column .* is '7'"):
        open_source(tmp_path)


@pytest.mark.parametrize("config_name", ["gated_real.yaml", "mask_guided_real.yaml"])
def test_shipped_real_configs_open_their_sources(data_dir, config_name):
    """What `tfface train --config configs/*_real.yaml` does before the first
    step: every source opens with the options training passes, and splits."""
    from pathlib import Path

    from tfface.config import ExperimentConfig
    from tfface.training.trainer import load_sources

    config = ExperimentConfig.load(Path(__file__).resolve().parents[1] / "configs" / config_name)
    for source in config.data.sources:
        _needs(data_dir, source.path)
    train, val = load_sources(config.data)
    assert [s.format for s in train] == ["celeba", "celeba", "utkface"]
    assert sum(map(len, train)) + sum(map(len, val)) == 2100 + 4900 + 6845
