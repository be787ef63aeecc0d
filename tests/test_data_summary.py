"""`tfface data summary` of a larger folder: image sizes from a fixed sample
of the headers unless `--all-sizes`; a tiny folder stands in for CelebA with
`SIZE_SAMPLE` turned down."""

import numpy as np
import pytest

from tfface.data.source import FaceSource
from tfface.schema import SYNTHETIC_ATTRIBUTES


@pytest.fixture
def folder(tmp_path):
    from tfface.data.synthetic import write_synthetic_folder

    rng = np.random.default_rng(0)
    n = 7
    columns = {a: rng.integers(0, 2, n).astype(np.int32) for a in SYNTHETIC_ATTRIBUTES}
    columns["age"] = rng.integers(0, 90, n).astype(np.int32)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    source = FaceSource(name="faces", format="synthetic", columns=columns, images=images)
    return write_synthetic_folder(source, tmp_path / "faces")


@pytest.fixture
def header_reads(monkeypatch):
    """The paths whose image header the summary reads, in order of reading."""
    import tfface.data.sources as sources

    read, real = [], sources._image_size

    def counting(path):
        read.append(str(path))
        return real(path)

    monkeypatch.setattr(sources, "_image_size", counting)
    return read


def test_summary_reads_the_sizes_of_a_fixed_sample_of_a_larger_folder(folder, header_reads, monkeypatch, capsys):
    import tfface.data.summary as summary_lib
    from tfface.cli import main as cli_main
    from tfface.data.sources import open_source

    monkeypatch.setattr(summary_lib, "SIZE_SAMPLE", 3)
    summary = summary_lib.summarize_source(open_source(str(folder)))
    assert len(header_reads) == 3
    assert summary["image_sizes"] == {"32x32": 3}
    assert summary["image_sizes_sample"] == {"images": 3, "of": 7}
    assert summary["num_images"] == 7  # the counts are still of every image
    first = sorted(header_reads)
    header_reads.clear()
    assert cli_main(["data", "summary", str(folder)]) == 0
    assert sorted(header_reads) == first  # the same sample on every run
    assert "image sizes 32x32 x3 (height x width, from a random sample of 3 of 7 images)" in capsys.readouterr().out

    header_reads.clear()
    assert cli_main(["data", "summary", str(folder), "--all-sizes", "--json"]) == 0
    assert len(header_reads) == 7
    assert '"image_sizes_sample"' not in capsys.readouterr().out


def test_summary_at_or_below_the_sample_size_reads_every_header_and_says_nothing_of_a_sample(
    folder, header_reads, monkeypatch
):
    import tfface.data.summary as summary_lib
    from tfface.data.sources import open_source

    monkeypatch.setattr(summary_lib, "SIZE_SAMPLE", 7)
    summary = summary_lib.summarize_source(open_source(str(folder)))
    assert len(header_reads) == 7
    assert summary["image_sizes"] == {"32x32": 7} and "image_sizes_sample" not in summary
    assert "image sizes 32x32 x7 (height x width)\n" in summary_lib.format_summary(summary)


def test_check_images_still_decodes_every_image_when_sizes_are_sampled(folder, monkeypatch, capsys):
    import tfface.data.summary as summary_lib
    from tfface.cli import main as cli_main
    from tfface.data.sources import open_source

    monkeypatch.setattr(summary_lib, "SIZE_SAMPLE", 3)
    source = open_source(str(folder))
    sampled = set(summary_lib._size_sample_rows(source, all_sizes=False).tolist())
    victim = next(p for i, p in enumerate(source.image_paths) if i not in sampled)
    with open(victim, "r+b") as f:
        f.truncate(60)  # a cut file outside the sample
    assert cli_main(["data", "summary", str(folder), "--check-images"]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) do not decode" in out and str(victim).rsplit("/", 1)[-1] in out
