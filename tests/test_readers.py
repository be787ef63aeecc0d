"""Folder readers, format detection, `open_source`, summaries and TFDS builders,
on tiny fixture folders the tests write themselves."""

import csv
import logging
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import rle8_bmp
from tfface.data.celeba import read_celeba_folder
from tfface.data.source import DataError
from tfface.data.sources import detect_format, open_source, read_image_sizes, validate_images
from tfface.data.summary import format_summary, summarize_source
from tfface.data.utkface import read_utkface_folder

LANDMARK_HEADER = [
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x",
    "nose_y", "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
]  # fmt: skip


def write_jpeg(path, value=100, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, "JPEG")


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture
def celeba_csv(tmp_path):
    """attributes.csv with a subset of attributes, age and partition."""
    root = tmp_path / "celeba_csv"
    ids = [f"{i:06d}.jpg" for i in range(1, 6)]
    for k, image_id in enumerate(ids):
        write_jpeg(root / "images" / image_id, value=40 * k, size=(12 + k % 2, 10))
    write_csv(
        root / "attributes.csv",
        [
            ["image_id", "Male", "Smiling", "Eyeglasses", "age", "partition"],
            [ids[0], 1, 0, 0, 25, "train"],
            [ids[1], 0, 1, "", 3, "train"],
            [ids[2], 1, 1, 1, "", "val"],
            [ids[3], 0, 0, 0, 71, "test"],
            [ids[4], 1, 0, 1, 40, "train"],
        ],
    )
    write_csv(root / "identities.csv", [["image_id", "identity"]] + [[i, 7 + n // 2] for n, i in enumerate(ids)])
    write_csv(
        root / "landmarks.csv",
        [["image_id", *LANDMARK_HEADER]]
        + [[i, *range(n, n + 10)] for n, i in enumerate(ids[:4])]
        + [[ids[4], *[""] * 10]],
    )
    return root


def write_official_txt(root, ids, names, values):
    lines = [str(len(ids)), " ".join(names)]
    lines += [f"{i}  " + "  ".join(f"{v:2d}" for v in row) for i, row in zip(ids, values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def celeba_txt(tmp_path):
    """The official txt files and img_align_celeba/."""
    root = tmp_path / "celeba_txt"
    ids = ["000001.jpg", "000002.jpg", "000003.jpg"]
    for image_id in ids:
        write_jpeg(root / "img_align_celeba" / image_id)
    write_official_txt(root, ids, ["Bald", "Male", "Young"], [[-1, 1, 1], [1, -1, -1], [-1, -1, 1]])
    (root / "identity_CelebA.txt").write_text("000001.jpg 2880\n000002.jpg 2937\n000003.jpg 2880\n000099.jpg 1\n")
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n000003.jpg 2\n")
    (root / "list_landmarks_align_celeba.txt").write_text(
        "3\n" + " ".join(LANDMARK_HEADER) + "\n"
        "000001.jpg 69 109 106 113 77 142 73 152 108 154\n"
        "000002.jpg 69 110 107 112 81 135 70 151 108 153\n"
    )
    return root


UTK_GOOD = [
    "25_0_0_20170116174525125.jpg.chip.jpg",
    "1_1_2_20161219140623097.jpg.chip.jpg",
    "80_1_4_20170103200329407.jpg",
]
UTK_MALFORMED = ["39_1_20170116174525125.jpg.chip.jpg", "notes_about_faces.jpg"]


@pytest.fixture
def utk_names(tmp_path):
    root = tmp_path / "utk_names"
    for name in UTK_GOOD + UTK_MALFORMED:
        write_jpeg(root / "images" / name)
    (root / "images" / "README.txt").write_text("not an image")
    return root


@pytest.fixture
def utk_csv(tmp_path):
    root = tmp_path / "utk_csv"
    header = ["image_id", "age", "gender", "race", "race_name", "male", "datetime"]
    rows = [["a.jpg", 30, 1, 3, "Indian", 0, 1], ["b.jpg", 64, 0, 0, "White", 1, 2]]
    for row in rows:
        write_jpeg(root / "images" / row[0])
    write_csv(root / "labels.csv", [header] + rows)
    return root


def test_skips_and_unlisted_images_are_reported_once_and_in_one_line(celeba_csv, utk_csv, tmp_path):
    # A row skipped for a bad value is reported with its row, not again as an
    # image without a label row.
    attributes = celeba_csv / "attributes.csv"
    attributes.write_text(attributes.read_text().replace("000002.jpg,0,1,,3,train", "000002.jpg,0,7,,3,train"))
    source = read_celeba_folder(celeba_csv, skip_bad_rows=True)
    assert len(source) == 4
    assert [p for p in source.problems if "no label row" in p] == []
    assert any("skipped 1 bad row(s)" in p for p in source.problems)
    # The same for a row with a cell too few, in both formats.
    attributes.write_text(attributes.read_text().replace("000002.jpg,0,7,,3,train", "000002.jpg,0,1,,3"))
    source = read_celeba_folder(celeba_csv, skip_bad_rows=True)
    assert [p for p in source.problems if "no label row" in p] == []
    labels = utk_csv / "labels.csv"
    labels.write_text(labels.read_text().replace("b.jpg,64,0,0,White,1,2", "b.jpg,64,0,0,White,1"))
    source = read_utkface_folder(utk_csv, skip_bad_rows=True)
    assert len(source) == 1 and [p for p in source.problems if "no row in" in p] == []
    labels.write_text(labels.read_text().replace("b.jpg,64,0,0,White,1\n", "b.jpg,64,0,0,White,1,2\n"))

    # UTKFace labels.csv: an image it does not list is named, as in CelebA folders.
    write_jpeg(utk_csv / "images" / "c.jpg")
    assert "1 image(s) have no row in labels.csv (ignored)" in " ".join(read_utkface_folder(utk_csv).problems)

    # UTKFace file names: out-of-range names make one line, not one per file;
    # a WebP face is read like the others.
    root = tmp_path / "utk_bad_names"
    for name in ["200_0_0_1.jpg", "30_2_0_2.jpg", "31_1_5_3.jpg", "25_0_0_4.jpg"]:
        write_jpeg(root / "images" / name)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "images" / "40_1_2_5.webp", "WEBP")
    source = read_utkface_folder(root, skip_bad_rows=True)
    assert sorted(Path(p).name for p in source.image_paths) == ["25_0_0_4.jpg", "40_1_2_5.webp"]
    [line] = [p for p in source.problems if "bad row" in p]
    assert line.startswith(f"{root / 'images'}: skipped 3 bad row(s), e.g. 200_0_0_1.jpg: file name label out of range")


# --- CelebA format ------------------------------------------------------------------


def test_celeba_csv_columns_identities_landmarks(celeba_csv):
    source = read_celeba_folder(celeba_csv)
    assert source.format == "celeba" and len(source) == 5
    assert sorted(source.columns) == ["Eyeglasses", "Male", "Smiling", "age"]
    np.testing.assert_array_equal(source.columns["Male"], [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(source.columns["Eyeglasses"], [0, -1, 1, 0, 1])  # empty cell -> missing
    np.testing.assert_array_equal(source.columns["age"], [25, 3, -1, 71, 40])
    assert source.partition.tolist() == ["train", "train", "val", "test", "train"]
    np.testing.assert_array_equal(source.identities, [7, 7, 8, 8, 9])
    assert source.landmarks.shape == (5, 5, 2) and source.landmarks.dtype == np.float32
    np.testing.assert_array_equal(source.landmarks[1, 0], [1, 2])  # left eye of row 2
    np.testing.assert_array_equal(source.landmarks[1, 4], [9, 10])  # right mouth corner
    assert np.isnan(source.landmarks[4]).all()
    assert source.image_paths[0].endswith("images/000001.jpg")
    assert source.problems == []


def test_celeba_official_txt_files(celeba_txt):
    source = read_celeba_folder(celeba_txt)
    np.testing.assert_array_equal(source.columns["Bald"], [0, 1, 0])  # -1/1 -> 0/1
    np.testing.assert_array_equal(source.columns["Young"], [1, 0, 1])
    assert source.partition.tolist() == ["train", "val", "test"]
    np.testing.assert_array_equal(source.identities, [2880, 2937, 2880])
    np.testing.assert_array_equal(source.landmarks[0].reshape(-1), [69, 109, 106, 113, 77, 142, 73, 152, 108, 154])
    assert np.isnan(source.landmarks[2]).all()
    assert "img_align_celeba" in source.image_paths[0]


def test_celeba_official_txt_count_mismatch_is_reported(celeba_txt):
    text = (celeba_txt / "list_attr_celeba.txt").read_text().replace("3\n", "202599\n", 1)
    (celeba_txt / "list_attr_celeba.txt").write_text(text)
    source = read_celeba_folder(celeba_txt)
    assert any("announces 202599" in p for p in source.problems)


def test_mtcnn_landmark_cache(celeba_csv):
    (celeba_csv / "landmarks.csv").unlink()
    header = ["image_id", "box_x", "box_y", "box_w", "box_h", "confidence", *LANDMARK_HEADER]
    rows = [["000001.jpg", 1, 2, 8, 8, 0.99, *np.arange(10) / 2], ["000002.jpg", *[""] * 15]]
    write_csv(celeba_csv / "landmarks_mtcnn.csv", [header] + rows)
    source = read_celeba_folder(celeba_csv)
    np.testing.assert_allclose(source.landmarks[0, 2], [2.0, 2.5])  # nose
    assert np.isnan(source.landmarks[1:]).all()


def test_wrong_column_count_names_file_and_line(celeba_csv):
    with open(celeba_csv / "attributes.csv", "a") as f:
        f.write("000006.jpg,1,0\n")
    with pytest.raises(DataError, match=r"attributes\.csv, line 7: expected 6 columns \(as many as the header on line 1 names\), found 3"):
        read_celeba_folder(celeba_csv)


def test_an_image_given_two_identities_is_refused(celeba_csv):
    # The last row won silently, moving the image to another person in the split.
    with open(celeba_csv / "identities.csv", "a") as f:
        f.write("000003.jpg,999\n")
    with pytest.raises(DataError, match=r"identities\.csv, line 7: image '000003\.jpg' is listed twice \(first on line 4\)"):
        read_celeba_folder(celeba_csv)
    source = read_celeba_folder(celeba_csv, skip_bad_rows=True)
    assert source.identities[2] == 8


@pytest.mark.parametrize("labels", ["attributes.csv", "list_attr_celeba.txt"])
def test_label_file_that_is_not_utf8_is_named(celeba_csv, celeba_txt, labels):
    root = celeba_csv if labels.endswith(".csv") else celeba_txt
    (root / labels).write_bytes(b"\xff\xfe" + (root / labels).read_bytes())
    with pytest.raises(DataError, match=f"{labels}: not UTF-8 text"):
        read_celeba_folder(root)


def test_out_of_range_attribute_names_file_line_and_column(celeba_csv):
    text = (celeba_csv / "attributes.csv").read_text().replace("000003.jpg,1,1,1", "000003.jpg,1,2,1")
    (celeba_csv / "attributes.csv").write_text(text)
    with pytest.raises(DataError, match=r"attributes\.csv, line 4: column 'Smiling' is '2'"):
        read_celeba_folder(celeba_csv)


def test_out_of_range_age_and_official_zero_value(celeba_csv, celeba_txt):
    text = (celeba_csv / "attributes.csv").read_text().replace(",71,", ",130,")
    (celeba_csv / "attributes.csv").write_text(text)
    with pytest.raises(DataError, match=r"line 5: age is '130'"):
        read_celeba_folder(celeba_csv)
    text = (celeba_txt / "list_attr_celeba.txt").read_text().replace("000002.jpg   1", "000002.jpg   0")
    (celeba_txt / "list_attr_celeba.txt").write_text(text)
    with pytest.raises(DataError, match=r"list_attr_celeba\.txt, line 4: column 'Bald' is '0'; expected -1 or 1"):
        read_celeba_folder(celeba_txt)


def test_missing_image_names_file_and_line(celeba_csv):
    (celeba_csv / "images" / "000004.jpg").unlink()
    with pytest.raises(DataError, match=r"attributes\.csv, line 5: image file not found: .*000004\.jpg"):
        read_celeba_folder(celeba_csv)


@pytest.mark.parametrize("spelling", ["000001.jpg", "./000001.jpg"])  # one file either way
def test_duplicate_row_names_line(celeba_csv, spelling):
    with open(celeba_csv / "attributes.csv", "a") as f:
        f.write(f"{spelling},1,0,0,20,train\n")
    with pytest.raises(DataError, match=rf"line 7: image '{re.escape(spelling)}' is listed twice"):
        read_celeba_folder(celeba_csv)
    assert len(read_celeba_folder(celeba_csv, skip_bad_rows=True)) == 5


def test_skip_bad_rows_counts_and_warns(celeba_csv, caplog):
    with open(celeba_csv / "attributes.csv", "a") as f:
        f.write("000006.jpg,1,0\n")  # wrong column count
        f.write("000007.jpg,1,5,0,20,train\n")  # out of range
        f.write("000008.jpg,1,0,0,20,train\n")  # no image file
    with caplog.at_level(logging.WARNING):
        source = read_celeba_folder(celeba_csv, skip_bad_rows=True)
    assert len(source) == 5
    assert any("skipped 3 bad row(s)" in p and "line 7" in p for p in source.problems)
    assert "skipped 3 bad row(s)" in caplog.text


def test_unknown_columns_and_unlabelled_images_are_reported(celeba_csv):
    text = (celeba_csv / "attributes.csv").read_text().replace("Eyeglasses", "Eyeglases")
    (celeba_csv / "attributes.csv").write_text(text)
    write_jpeg(celeba_csv / "images" / "000099.jpg")
    source = read_celeba_folder(celeba_csv)
    assert "Eyeglases" not in source.columns
    assert any("Eyeglases" in p for p in source.problems)
    assert any("1 image(s) have no label row" in p for p in source.problems)


# --- UTKFace format -----------------------------------------------------------------


def test_utkface_names_parsed_and_malformed_reported(utk_names, caplog):
    with caplog.at_level(logging.WARNING):
        source = read_utkface_folder(utk_names)
    assert source.format == "utkface" and len(source) == 3
    by_name = {p.split("/")[-1]: i for i, p in enumerate(source.image_paths)}
    i = by_name["25_0_0_20170116174525125.jpg.chip.jpg"]
    assert (source.columns["age"][i], source.columns["male"][i], source.columns["race"][i]) == (25, 1, 0)
    i = by_name["1_1_2_20161219140623097.jpg.chip.jpg"]
    assert (source.columns["age"][i], source.columns["male"][i], source.columns["race"][i]) == (1, 0, 2)
    (note,) = [p for p in source.problems if "skipped 2 image(s)" in p]
    assert "39_1_20170116174525125.jpg.chip.jpg" in note
    assert "skipped 2 image(s)" in caplog.text


def test_utkface_out_of_range_name(utk_names):
    write_jpeg(utk_names / "images" / "30_0_7_20170116174525125.jpg.chip.jpg")
    with pytest.raises(DataError, match=r"30_0_7_20170116174525125\.jpg\.chip\.jpg: .*race must be 0\.\.4"):
        read_utkface_folder(utk_names)
    source = read_utkface_folder(utk_names, skip_bad_rows=True)
    assert len(source) == 3 and any("skipped 1 bad row(s)" in p for p in source.problems)


def test_utkface_labels_csv(utk_csv):
    source = read_utkface_folder(utk_csv)
    np.testing.assert_array_equal(source.columns["age"], [30, 64])
    np.testing.assert_array_equal(source.columns["male"], [0, 1])
    np.testing.assert_array_equal(source.columns["race"], [3, 0])
    assert source.identities is None and source.landmarks is None


@pytest.mark.parametrize(
    "row, message",
    [
        ("c.jpg,130,0,0,White,1,3", r"line 4: age must be an integer 0\.\.120"),
        ("c.jpg,30,2,0,White,1,3", r"line 4: gender must be 0 \(male\) or 1"),
        ("c.jpg,30,0,0,White,0,3", r"line 4: male='0' contradicts gender='0'"),
        ("c.jpg,30,0", r"line 4: expected 7 columns \(as many as the header on line 1 names\), found 3"),
        ("missing.jpg,30,0,0,White,1,3", r"line 4: image file not found: .*missing\.jpg"),
        ("c.jpg,30,0,1,White,1,3", r"line 4: race_name='White' contradicts race='1' \(Black\)"),
        ("./a.jpg,30,1,3,Indian,0,1", r"line 4: image './a\.jpg' is empty or listed twice"),
    ],
)
def test_utkface_labels_csv_errors(utk_csv, row, message):
    write_jpeg(utk_csv / "images" / "c.jpg")
    with open(utk_csv / "labels.csv", "a") as f:
        f.write(row + "\n")
    with pytest.raises(DataError, match=r"labels\.csv, " + message):
        read_utkface_folder(utk_csv)
    assert len(read_utkface_folder(utk_csv, skip_bad_rows=True)) == 2


# --- images -------------------------------------------------------------------------


def test_corrupt_jpeg_is_named(celeba_csv):
    path = celeba_csv / "images" / "000003.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    read_celeba_folder(celeba_csv)  # labels alone do not decode images
    with pytest.raises(DataError, match=r"corrupt or truncated image file: \S*000003\.jpg"):
        read_celeba_folder(celeba_csv, check_images=True)
    source = validate_images(read_celeba_folder(celeba_csv), drop_bad=True)
    assert len(source) == 4 and any("dropped 1 unreadable" in p for p in source.problems)


def test_checking_images_refuses_what_training_cannot_decode(celeba_csv):
    # PIL decodes a run-length-encoded BMP, TensorFlow does not: checked with
    # PIL, the folder passed check_images and training then stopped at it.
    (celeba_csv / "images" / "000004.jpg").write_bytes(rle8_bmp())
    with pytest.raises(DataError, match=r"1 unreadable image\(s\): image file TensorFlow cannot decode .*000004\.jpg"):
        read_celeba_folder(celeba_csv, check_images=True)
    kept = validate_images(read_celeba_folder(celeba_csv), drop_bad=True)
    assert [Path(p).name for p in kept.image_paths] == ["000001.jpg", "000002.jpg", "000003.jpg", "000005.jpg"]


def test_image_sizes_from_headers(celeba_csv):
    sizes = read_image_sizes(read_celeba_folder(celeba_csv))
    np.testing.assert_array_equal(sizes[:2], [[10, 12], [10, 13]])


# --- detection and open_source ---------------------------------------------------------


def test_format_detection(celeba_csv, celeba_txt, utk_names, utk_csv, tmp_path):
    assert detect_format(celeba_csv) == "celeba"
    assert detect_format(celeba_txt) == "celeba"
    assert detect_format(utk_names) == "utkface"
    assert detect_format(utk_csv) == "utkface"
    assert open_source(str(utk_names)).format == "utkface"
    assert len(open_source(celeba_txt)) == 3
    # Training passes one option set to every source; folders drop the
    # synthetic-only options instead of failing on them.
    assert len(open_source(celeba_txt, image_size=64, seed=3, skip_bad_rows=False)) == 3
    assert open_source(str(utk_names), image_size=64).format == "utkface"
    other = tmp_path / "holiday_photos"
    write_jpeg(other / "beach.jpg")
    with pytest.raises(DataError, match=r"cannot tell the format.*attributes\.csv or list_attr_celeba\.txt.*labels\.csv"):
        open_source(other)
    for name in ["30_0_1_1.jpg", "31_1_0_2.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]:
        write_jpeg(other / name)
    with pytest.raises(DataError, match=r"at least half the images.*; 2 of the first 6 images have such names"):
        open_source(other)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        open_source(tmp_path / "no_such_folder")
    # The label file instead of its folder.
    with pytest.raises(NotADirectoryError, match=r"attributes\.csv is a file; give the folder that holds it"):
        open_source(celeba_csv / "attributes.csv")


def test_named_sources_resolve_under_data_dir(monkeypatch, tmp_path, utk_csv):
    utk_csv.rename(tmp_path / "utkface")
    monkeypatch.setenv("TFFACE_DATA_DIR", str(tmp_path))
    assert len(open_source("utkface")) == 2
    with pytest.raises(FileNotFoundError, match=r"celeba_sample.*not found"):
        open_source("celeba_sample")


def test_synthetic_specs():
    source = open_source("synthetic:6", image_size=32, seed=1)
    assert source.format == "synthetic" and source.images.shape == (6, 32, 32, 3)
    with pytest.raises(ValueError, match="synthetic:N"):
        open_source("synthetic:many")
    with pytest.raises(ValueError, match="only 'tfds:celeb_a'"):
        open_source("tfds:mnist")


# --- summary --------------------------------------------------------------------------


def test_summary_counts_rates_and_table(celeba_csv):
    source = read_celeba_folder(celeba_csv)
    summary = summarize_source(source, schema="synthetic")
    assert summary["num_images"] == 5
    assert summary["columns"]["Male"]["positive_rate"] == pytest.approx(0.6)
    assert summary["columns"]["Eyeglasses"] == {"labelled": 4, "missing": 1, "kind": "binary", "positive_rate": 0.5}
    assert summary["columns"]["age"]["groups"]["3-9"] == 1 and summary["columns"]["age"]["groups"]["70+"] == 1
    assert summary["image_sizes"] == {"10x12": 3, "10x13": 2}
    assert summary["identities"] == {"people": 3, "unknown": 0}
    assert summary["landmarks"]["known"] == 4
    assert summary["partition"] == {"train": 3, "val": 1, "test": 1}
    assert summary["tasks"]["gender"]["positive_rate"] == pytest.approx(0.6)
    text = format_summary(summary)
    assert "Male" in text and "0.600" in text and "10x12 x3" in text and "3 people" in text


def test_summary_lists_files_training_cannot_read_instead_of_stopping(celeba_csv, capsys):
    from tfface.cli import main as cli_main

    images = celeba_csv / "images"
    (images / "000002.jpg").write_bytes(b"")  # empty
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(images / "000003.jpg", "TIFF")  # TIFF named .jpg
    noise = np.random.default_rng(0).integers(0, 256, (100, 130, 3)).astype(np.uint8)
    Image.fromarray(noise).save(images / "000004.jpg", "JPEG")  # much scan data: cut it, keep the header
    (images / "000004.jpg").write_bytes((images / "000004.jpg").read_bytes()[:-2000])
    summary = summarize_source(read_celeba_folder(celeba_csv))
    assert summary["image_sizes"] == {"10x12": 2, "100x130": 1}  # the truncated one has its header
    [line] = [p for p in summary["problems"] if "cannot be read" in p]
    assert line.startswith("2 image file(s) cannot be read, e.g. ")
    assert "000002.jpg: empty image file" in line
    assert "000003.jpg: not an image format the pipeline decodes" in line
    with pytest.raises(DataError, match="000002.jpg: empty image file"):
        read_image_sizes(read_celeba_folder(celeba_csv))

    assert cli_main(["data", "summary", str(celeba_csv), "--check-images"]) == 0
    out = capsys.readouterr().out
    assert "3 image(s) do not decode (train and evaluate stop at them unless told to skip them: skip_bad_images, --skip-bad-images)" in out
    assert "000004.jpg" in out


# --- TFDS -------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_tfds_celeba_folder_builder_roundtrip(celeba_csv, tmp_path, no_network):
    import tensorflow_datasets as tfds

    from tfface.data import tfds_builders

    from PIL import Image, ImageOps

    # A photo stored on its side with an EXIF rotation goes in as shown.
    rotated = celeba_csv / "images" / "000005.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), np.uint8)).save(rotated, "JPEG", exif=exif)
    with Image.open(rotated) as stored:
        shown = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    assert shown.shape == (10, 12, 3)
    builder = tfds.builder("celeba_folder", root=str(celeba_csv), data_dir=str(tmp_path / "tfds"))
    assert isinstance(builder, tfds_builders.CelebaFolder)
    builder.download_and_prepare()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "val": 1, "test": 1}
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    by_id = {e["image_id"].decode(): e for e in examples}
    first = by_id["000001.jpg"]
    assert first["image"].shape == (10, 12, 3)
    assert first["labels"]["Male"] == 1 and first["labels"]["age"] == 25 and first["identity"] == 7
    np.testing.assert_array_equal(first["landmarks"][0], [0, 1])
    assert np.isnan(by_id["000005.jpg"]["landmarks"]).all()
    np.testing.assert_array_equal(by_id["000005.jpg"]["image"], shown)
    assert by_id["000002.jpg"]["labels"]["Eyeglasses"] == -1


def test_tfds_synthetic_builder_splits_by_identity(tmp_path, no_network):
    from tfface.data.tfds_builders import SyntheticFaces

    builder = SyntheticFaces(num_images=12, image_size=32, val_fraction=0.3, data_dir=str(tmp_path))
    builder.download_and_prepare()
    import tensorflow_datasets as tfds

    ids = {
        split: {int(e["identity"]) for e in tfds.as_numpy(builder.as_dataset(split=split))}
        for split in ("train", "val")
    }
    assert ids["train"] and ids["val"] and not ids["train"] & ids["val"]
    assert builder.info.splits["train"].num_examples + builder.info.splits["val"].num_examples == 12


def test_official_celeb_a_is_never_downloaded(tmp_path, no_network):
    from tfface.data.tfds_builders import load_official_celeb_a

    with pytest.raises(FileNotFoundError, match=r"not prepared in .*tfds build celeb_a"):
        load_official_celeb_a(tmp_path)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        open_source("tfds:celeb_a", data_dir=str(tmp_path))


def test_official_celeb_a_read_when_prepared(tmp_path, no_network):
    """A stand-in prepared `celeb_a` (same builder, 3 fake examples)."""
    import io

    from tensorflow_datasets.datasets.celeb_a import celeb_a_dataset_builder as official

    from tfface.data.tfds_builders import load_official_celeb_a, offline_download_config

    def jpeg(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((218, 178, 3), value, np.uint8)).save(buffer, "JPEG")
        return buffer.getvalue()

    class FakeCelebA(official.Builder, skip_registration=True):
        name = "celeb_a"
        __module__ = official.Builder.__module__  # reads the real package metadata

        def _split_generators(self, dl_manager):
            return {"train": self._fake(1), "validation": self._fake(2), "test": self._fake(1)}

        def _fake(self, n):
            for i in range(n):
                yield str(i), {
                    "image": jpeg(10 * i),
                    "landmarks": {k: i + 60 for k in official.LANDMARK_HEADINGS},
                    "attributes": {k: bool(i % 2) for k in official.ATTR_HEADINGS},
                    "identity": {"Identity_No": 100 + i},
                }

    FakeCelebA(data_dir=str(tmp_path)).download_and_prepare(download_config=offline_download_config())
    source = load_official_celeb_a(tmp_path, split="val")
    assert source.images.shape == (2, 218, 178, 3) and source.format == "celeba"
    assert sorted(source.identities.tolist()) == [100, 101]
    assert sorted(source.columns["Male"].tolist()) == [0, 1] and len(source.columns) == 40
    assert source.partition.tolist() == ["val", "val"]
    assert np.isin(source.landmarks, [60, 61]).all()


def test_prepare_builder_detects_format_and_reuses(utk_csv, tmp_path, no_network):
    from tfface.data.tfds_builders import UtkfaceFolder, prepare_builder

    builder = prepare_builder(str(utk_csv), data_dir=str(tmp_path / "tfds"), val_fraction=0.5)
    assert isinstance(builder, UtkfaceFolder)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 1, "val": 1}
    again = prepare_builder(str(utk_csv), data_dir=str(tmp_path / "tfds"), val_fraction=0.5)
    assert again.data_dir == builder.data_dir  # same folder and settings: built once
    image = next(p for p in utk_csv.rglob("*.jpg"))
    write_jpeg(image, size=(24, 24))  # an image replaced below the top level
    changed = prepare_builder(str(utk_csv), data_dir=str(tmp_path / "tfds"), val_fraction=0.5)
    assert changed.data_dir != builder.data_dir


@pytest.mark.parametrize("cache_dir", ["TFFACE_CACHE_DIR", "in the data folder"])
def test_folder_sources_pick_up_the_annotation_cache(utk_csv, tmp_path, monkeypatch, cache_dir):
    from tfface.landmarks.detector import Detection
    from tfface.landmarks.detector import annotate_folder
    from tfface.landmarks.detector import default_landmark_cache

    class OneFaceDetector:
        def detect_batch(self, images):
            points = np.array([[5, 6], [9, 6], [7, 8], [5, 10], [9, 10]], np.float32)
            return [[Detection(box=(1, 1, 10, 10), confidence=0.99, landmarks=points)] for _ in images]

    if cache_dir == "TFFACE_CACHE_DIR":
        monkeypatch.setenv("TFFACE_CACHE_DIR", str(tmp_path / "cache"))
    else:  # a writable folder keeps its own cache, landmarks_mtcnn.csv
        monkeypatch.delenv("TFFACE_CACHE_DIR", raising=False)
    before = open_source(utk_csv)
    for path in before.image_paths:  # big enough for the detector
        write_jpeg(Path(path), size=(32, 32))
    assert before.landmarks is None
    cache = default_landmark_cache(before.root)
    annotate_folder(list(before.image_paths), cache, detector=OneFaceDetector(), verbose=False)
    assert (cache.parent == utk_csv) == (cache_dir != "TFFACE_CACHE_DIR")
    after = open_source(utk_csv)
    assert after.landmarks.shape == (len(after), 5, 2)
    np.testing.assert_allclose(after.landmarks[0, 2], [7, 8])
    # The same cache named as a source's landmarks file reads the same.
    named = open_source(utk_csv, landmarks_file=str(cache))
    np.testing.assert_array_equal(named.landmarks, after.landmarks)
    # So does the TFDS builder of the folder, wherever the cache lives.
    from tfface.data.tfds_builders import prepare_builder

    builder = prepare_builder(str(utk_csv), data_dir=str(tmp_path / "tfds"), val_fraction=0.5)
    assert np.isfinite(builder.source.landmarks).all()
    # An image replaced since has no landmarks until annotated again, and is named.
    write_jpeg(Path(after.image_paths[0]), value=7, size=(40, 40))
    changed = open_source(utk_csv)
    assert np.isnan(changed.landmarks[0]).all() and np.isfinite(changed.landmarks[1]).all()
    assert any("1 image(s) changed since their landmarks were detected (first: a.jpg)" in p for p in changed.problems)


# --- fast (column-wise) label parsing ----------------------------------------------


def _row_by_row(monkeypatch):
    """Makes the readers skip their column-wise fast path."""
    import tfface.data.celeba as celeba
    import tfface.data.sources as sources
    import tfface.data.utkface as utkface

    for module in (celeba, sources, utkface):
        monkeypatch.setattr(module, "csv_table", lambda path: None, raising=False)
    monkeypatch.setattr(celeba, "_attribute_txt_lines", lambda path: None)
    monkeypatch.setattr(sources, "text_table", lambda path, skip=0: None)


def _assert_same_source(a, b):
    assert (a.name, a.format, a.root, a.problems) == (b.name, b.format, b.root, b.problems)
    assert list(a.columns) == list(b.columns)
    for name in a.columns:
        assert a.columns[name].dtype == b.columns[name].dtype
        np.testing.assert_array_equal(a.columns[name], b.columns[name])
    for field in ("image_paths", "identities", "landmarks", "partition"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype, field
            np.testing.assert_array_equal(x, y)


def test_fast_and_row_by_row_label_parsing_agree(celeba_csv, celeba_txt, utk_csv, monkeypatch):
    # Empty cells (unknown), partitions spelled three ways, age 0 and 120,
    # CRLF line ends, official -1/1 values and identities for unlisted images.
    write_csv(
        celeba_csv / "attributes.csv",
        [
            ["image_id", "Male", "Smiling", "Eyeglasses", "age", "partition"],
            ["000001.jpg", 1, 0, "", 0, "train"],
            ["000002.jpg", "", 1, 0, 120, "VAL"],
            ["000003.jpg", 0, "", 1, "", "2"],
            ["000004.jpg", 1, 1, 1, 71, ""],
            ["000005.jpg", 0, 0, 0, 40, "validation"],
        ],
    )
    import tfface.data.celeba as celeba
    import tfface.data.sources as sources
    import tfface.data.utkface as utkface

    used = []  # the fast paths taken, so the comparison below compares two paths
    for module, name in [
        (celeba, "_labels_from_columns"),
        (celeba, "_labels_from_txt_lines"),
        (sources, "_identities_from_columns"),
        (utkface, "_values_from_columns"),
    ]:
        monkeypatch.setattr(module, name, lambda *a, _f=getattr(module, name), _n=name: used.append((_n, _f(*a))) or used[-1][1])
    fast = [read_celeba_folder(celeba_csv), read_celeba_folder(celeba_txt), read_utkface_folder(utk_csv)]
    assert sorted(n for n, result in used if result is not None and result is not False) == [
        "_identities_from_columns", "_identities_from_columns", "_labels_from_columns",
        "_labels_from_txt_lines", "_values_from_columns",
    ]  # fmt: skip
    monkeypatch.undo()
    np.testing.assert_array_equal(fast[0].columns["Eyeglasses"], [-1, 0, 1, 1, 0])
    assert fast[0].partition.tolist() == ["train", "val", "test", "", "val"]
    np.testing.assert_array_equal(fast[1].columns["Bald"], [0, 1, 0])  # -1 -> 0
    _row_by_row(monkeypatch)
    slow = [read_celeba_folder(celeba_csv), read_celeba_folder(celeba_txt), read_utkface_folder(utk_csv)]
    for a, b in zip(fast, slow):
        _assert_same_source(a, b)


def _many_rows(root, count):
    """`count` images (hard links to one JPEG) named 000001.jpg..."""
    write_jpeg(root / "images" / "000001.jpg")
    ids = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    for image_id in ids[1:]:
        (root / "images" / image_id).hardlink_to(root / "images" / "000001.jpg")
    return ids


def test_bad_value_deep_in_a_big_label_file_names_its_line(tmp_path):
    root = tmp_path / "big"
    ids = _many_rows(root, 3000)
    rows = [["image_id", "Male", "Smiling", "age"]] + [[i, k % 2, 1 - k % 2, k % 90] for k, i in enumerate(ids)]
    rows[2500][2] = "2"  # line 2501
    write_csv(root / "attributes.csv", rows)
    with pytest.raises(DataError, match=r"attributes\.csv, line 2501: column 'Smiling' is '2'"):
        read_celeba_folder(root)
    source = read_celeba_folder(root, skip_bad_rows=True)
    assert len(source) == 2999 and any("skipped 1 bad row(s), e.g. line 2501" in p for p in source.problems)

    rows[2500][2] = 1
    write_csv(root / "attributes.csv", rows)
    write_csv(root / "identities.csv", [["image_id", "identity"]] + [[i, 7] for i in ids[:2000]] + [[ids[2000], "x7"]])
    with pytest.raises(DataError, match=r"identities\.csv, line 2002: identity must be a non-negative integer, got 'x7'"):
        read_celeba_folder(root)

    lines = ["3000", "Male Smiling"] + [f"{i} {' -1' if k % 2 else '  1'}  1" for k, i in enumerate(ids)]
    lines[1999] = lines[1999][:-2] + " 0"  # line 2000
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "attributes.csv").unlink()
    (root / "identities.csv").unlink()
    with pytest.raises(DataError, match=r"list_attr_celeba\.txt, line 2000: column 'Smiling' is '0'; expected -1 or 1"):
        read_celeba_folder(root)

    utk = tmp_path / "utk_big"
    ids = _many_rows(utk, 3000)
    rows = [["image_id", "age", "gender", "race", "male"]] + [[i, 30, k % 2, k % 5, 1 - k % 2] for k, i in enumerate(ids)]
    rows[2800][1] = "3o"  # line 2801
    write_csv(utk / "labels.csv", rows)
    with pytest.raises(DataError, match=r"labels\.csv, line 2801: age must be an integer 0\.\.120; got age='3o'"):
        read_utkface_folder(utk)
