"""Reader for CelebA-format folders.

A CelebA-format folder holds `images/` (or the official `img_align_celeba/`)
and its labels either as the official `list_attr_celeba.txt` (-1/1 values)
or as `attributes.csv` (0/1 values, as in the shared `celeba_sample`). Any
subset of the 40 CelebA attributes may be present, plus an integer `age`
column (the synthetic generator writes one), so the same reader serves real
CelebA copies and generated folders. Identities, landmarks and the official
partition are read when their files are there.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from tfface.data.source import DataError, FaceSource
from tfface.data.sources import (
    BadRows,
    csv_rows,
    csv_table,
    image_file_keys,
    image_file_names,
    image_paths_under,
    images_dir,
    is_image_name,
    note,
    parse_column,
    parse_int,
    read_identities,
    read_landmarks,
    text_rows,
    unique_image_ids,
    validate_images,
    wrong_column_count,
)
from tfface.schema import CELEBA, CELEBA_ATTRIBUTES, MISSING

ATTRIBUTE_CSV = "attributes.csv"
ATTRIBUTE_TXT = "list_attr_celeba.txt"
IDENTITY_FILES = ("identities.csv", "identity_CelebA.txt")
PARTITION_TXT = "list_eval_partition.txt"
PARTITION_NAMES = {
    "0": "train",
    "1": "val",
    "2": "test",
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
MAX_AGE = 120


@dataclasses.dataclass
class _Labels:
    """Parsed label rows, before the image files are checked."""

    path: Path
    image_ids: list
    lines: list
    columns: dict
    partition: Optional[list] = None
    identities: Optional[list] = None
    # Every image a row names, skipped rows included: their images are
    # reported with the row, not again as "no label row".
    listed: set = dataclasses.field(default_factory=set)


def read_celeba_folder(root, skip_bad_rows=False, check_images=False, landmarks_file=None) -> FaceSource:
    """Reads a CelebA-format folder.

    Args:
        root: the folder.
        skip_bad_rows: skip label rows that are malformed, out of range or
            point at a missing image (counted in `problems` and logged)
            instead of raising `DataError`.
        check_images: decode every image now, as training will (slow on
            big folders), so a file training cannot decode fails here,
            naming the file.
        landmarks_file: landmark file to use instead of the ones in `root`.

    Returns:
        a `FaceSource` with format "celeba"; raw columns are the attribute
        names (0/1, -1 where a csv cell is empty) and `age` if present.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA folder not found: {root}")
    problems: list = []
    bad = BadRows(skip_bad_rows)
    if (root / ATTRIBUTE_CSV).is_file():
        labels = _read_attribute_csv(root / ATTRIBUTE_CSV, bad, problems)
    elif (root / ATTRIBUTE_TXT).is_file():
        labels = _read_attribute_txt(root / ATTRIBUTE_TXT, bad, problems)
    else:
        raise DataError(f"{root}: no CelebA labels found (expected {ATTRIBUTE_CSV} or {ATTRIBUTE_TXT})")

    image_root = images_dir(root)
    present = image_file_names(image_root)  # listed once: a full CelebA folder holds 202,599 files
    keep = _rows_with_images(labels, image_root, present, bad)
    bad.report(problems)
    if not keep:
        raise DataError(f"{labels.path}: no usable label rows")
    unlabelled = sum(1 for n in present.difference(labels.listed) if is_image_name(n))
    if unlabelled:
        note(problems, f"{image_root}: {unlabelled} image(s) have no label row in {labels.path.name} (ignored)")

    image_ids = [labels.image_ids[i] for i in keep]
    keep = np.asarray(keep, np.intp)
    columns = {name: np.asarray(values, np.int32)[keep] for name, values in labels.columns.items()}
    partition = (
        np.asarray(labels.partition, dtype=object)[keep].astype(str)
        if labels.partition is not None
        else _read_partition_file(root / PARTITION_TXT, image_ids, skip_bad_rows, problems)
    )
    if labels.identities is not None:
        identities = np.asarray(labels.identities, np.int64)[keep]
    else:
        identity_path = next((root / n for n in IDENTITY_FILES if (root / n).is_file()), None)
        identities = (
            read_identities(identity_path, image_ids, skip_bad_rows, problems)
            if identity_path is not None
            else None
        )
    landmarks = read_landmarks(root, image_ids, landmarks_file, skip_bad_rows, problems)
    source = FaceSource(
        name=os.path.basename(os.path.abspath(root)),
        format=CELEBA,
        columns=columns,
        image_paths=image_paths_under(image_root, image_ids),
        identities=identities,
        landmarks=landmarks,
        partition=partition,
        root=str(root),
        problems=problems,
    )
    if check_images:
        validate_images(source)
    return source


def _check_header(path: Path, names, problems) -> None:
    unknown = [n for n in names if n not in CELEBA_ATTRIBUTES]
    if unknown:
        note(problems, f"{path}: ignored columns that are not CelebA attributes: {unknown}")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate columns {duplicates}")


def _parse_attribute(cell: str):
    return MISSING if cell == "" else parse_int(cell, 0, 1)


def _parse_age(cell: str):
    return MISSING if cell == "" else parse_int(cell, 0, MAX_AGE)


def _parse_partition(cell: str):
    return PARTITION_NAMES.get(cell.lower(), "" if cell == "" else None)


def _parse_identity(cell: str):
    return MISSING if cell == "" else parse_int(cell, 0, 2**62)


def _read_attribute_csv(path: Path, bad: BadRows, problems) -> _Labels:
    # Fast path: whole columns at once (200,000 rows x 40 attributes took
    # 12 s row by row). Any bad value, or a file that is not plain one row
    # per line, falls back to the row-by-row loop, which names it.
    table = csv_table(path)
    rows = csv_rows(path) if table is None else iter(())
    _, header = (1, table[0]) if table is not None else next(rows, (None, []))
    if "image_id" not in header:
        raise DataError(f"{path}, line 1: header needs an 'image_id' column, found {header[:5]}...")
    extra = {"image_id", "age", "partition", "identity"}
    _check_header(path, [c for c in header if c not in extra], problems)
    attributes = [c for c in header if c in CELEBA_ATTRIBUTES]
    if not attributes and "age" not in header:
        raise DataError(f"{path}: no CelebA attribute columns and no 'age' column in the header")
    position = {c: header.index(c) for c in header}
    labels = _Labels(
        path=path,
        image_ids=[],
        lines=[],
        columns={c: [] for c in attributes + (["age"] if "age" in header else [])},
        partition=[] if "partition" in header else None,
        identities=[] if "identity" in header else None,
    )
    if table is not None:
        if _labels_from_columns(labels, table[1], position):
            return labels
        rows = csv_rows(path)
        next(rows, None)  # the header
    seen: set = set()
    for line, fields in rows:
        if len(fields) > position["image_id"]:
            labels.listed.add(fields[position["image_id"]])  # a skipped row's image is reported with the row only
        if len(fields) != len(header):
            bad.bad(path, line, wrong_column_count(len(header), len(fields)))
            continue
        row = {}
        error = None
        for name in attributes:
            cell = fields[position[name]]
            row[name] = _parse_attribute(cell)
            if row[name] is None:
                error = f"column {name!r} is {cell!r}; expected 0 or 1 (empty for unknown)"
                break
        if error is None and "age" in header:
            cell = fields[position["age"]]
            row["age"] = _parse_age(cell)
            if row["age"] is None:
                error = f"age is {cell!r}; expected an integer 0..{MAX_AGE} (empty for unknown)"
        if error is None and labels.partition is not None:
            cell = fields[position["partition"]]
            partition = _parse_partition(cell)
            if partition is None:
                error = f"partition is {cell!r}; expected train/val/test or 0/1/2"
        if error is None and labels.identities is not None:
            cell = fields[position["identity"]]
            identity = _parse_identity(cell)
            if identity is None:
                error = f"identity is {cell!r}; expected a non-negative integer"
        image_id = fields[position["image_id"]]
        if error is None and not image_id:
            error = "empty image_id"
        key = image_file_keys([image_id])[0]
        if error is None and key in seen:
            error = f"image {image_id!r} is listed twice"
        if error is not None:
            bad.bad(path, line, error)
            continue
        seen.add(key)
        labels.image_ids.append(image_id)
        labels.lines.append(line)
        for name, value in row.items():
            labels.columns[name].append(value)
        if labels.partition is not None:
            labels.partition.append(partition)
        if labels.identities is not None:
            labels.identities.append(identity)
    return labels


def _labels_from_columns(labels: _Labels, columns: list, position: dict) -> bool:
    """The fast path of `_read_attribute_csv`: fills `labels` from whole
    columns of cells, as the row loop would; False (`labels` untouched) when
    any row would be bad, for the row loop to report it."""
    image_ids = unique_image_ids(columns[position["image_id"]])
    if image_ids is None:
        return False
    values = {}
    for name in labels.columns:
        values[name] = parse_column(columns[position[name]], _parse_age if name == "age" else _parse_attribute, np.int32)
        if values[name] is None:
            return False
    partition = identities = None
    if labels.partition is not None:
        partition = parse_column(columns[position["partition"]], _parse_partition)
        if partition is None:
            return False
    if labels.identities is not None:
        identities = parse_column(columns[position["identity"]], _parse_identity, np.int64)
        if identities is None:
            return False
    labels.image_ids = image_ids
    labels.lines = list(range(2, len(image_ids) + 2))  # one row per line after the header
    labels.columns = values
    labels.partition = partition
    labels.identities = identities
    labels.listed = set(image_ids)
    return True


def _read_attribute_txt(path: Path, bad: BadRows, problems) -> _Labels:
    """The official format: a count line, a names line, then
    `000001.jpg  -1  1 ...` rows with -1/1 values (mapped to 0/1)."""
    table = _attribute_txt_lines(path)  # fast path, as in `_read_attribute_csv`
    rows = text_rows(path) if table is None else iter(table[0])
    count_line, count = next(rows, (1, []))
    if len(count) != 1 or parse_int(count[0], 0, 10**9) is None:
        raise DataError(f"{path}, line {count_line}: expected the number of images, found {' '.join(count)[:60]!r}")
    _, names = next(rows, (2, []))
    if not names:
        raise DataError(f"{path}, line 2: expected the attribute names")
    _check_header(path, names, problems)
    used = [(j, n) for j, n in enumerate(names) if n in CELEBA_ATTRIBUTES]
    labels = _Labels(path=path, image_ids=[], lines=[], columns={n: [] for _, n in used})
    seen: set = set()
    read = 0
    if table is not None:
        if _labels_from_txt_lines(labels, table[1], names, used):
            read = len(table[1])
        else:
            rows = text_rows(path)
            next(rows, None)  # the count
            next(rows, None)  # the names
    for line, fields in rows:
        read += 1
        labels.listed.add(fields[0])
        if len(fields) != len(names) + 1:
            bad.bad(path, line, f"expected an image name and {len(names)} values, found {len(fields)} fields")
            continue
        values = fields[1:]
        wrong = next((names[j] for j, v in enumerate(values) if v not in ("-1", "1")), None)
        if wrong is not None:
            bad.bad(path, line, f"column {wrong!r} is {values[names.index(wrong)]!r}; expected -1 or 1")
            continue
        if fields[0] in seen:
            bad.bad(path, line, f"image {fields[0]!r} is listed twice")
            continue
        seen.add(fields[0])
        labels.image_ids.append(fields[0])
        labels.lines.append(line)
        for j, name in used:
            labels.columns[name].append(1 if values[j] == "1" else 0)
    if read != int(count[0]):
        note(problems, f"{path}: line 1 announces {count[0]} images but the file has {read} rows")
    return labels


def _attribute_txt_lines(path: Path):
    """The fast path of `text_rows` for `list_attr_celeba.txt`: (the count
    and names rows as `text_rows` gives them, the other lines, line 3 on),
    or None when the file does not read or starts with a blank line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        return None
    lines = text.split("\n")  # the lines `text_rows` numbers (universal newlines)
    if lines[-1] == "":
        lines.pop()
    if len(lines) < 2 or not lines[0].split() or not lines[1].split():
        return None
    return [(1, lines[0].split()), (2, lines[1].split())], lines[2:]


def _labels_from_txt_lines(labels: _Labels, lines: list, names: list, used: list) -> bool:
    """The fast path of `_read_attribute_txt`, as `_labels_from_columns`:
    every line must be an image name and len(names) values -1/1 separated by
    spaces or tabs (anything else goes to the row loop)."""
    row = re.compile(r"\S+(?:[ \t]+-?1){%d}[ \t]*" % len(names))
    if not all(map(row.fullmatch, lines)):
        return False
    text = "\n".join(lines)
    image_ids = re.findall(r"^\S+", text, re.MULTILINE)
    if len(set(image_ids)) != len(image_ids):
        return False
    # Only "-1" and "1" are left after the names: one "0"/"1" character each.
    values = re.sub(r"^\S+", "", text, flags=re.MULTILINE).replace("-1", "0").translate({9: None, 10: None, 32: None})
    matrix = (np.frombuffer(values.encode("ascii"), np.uint8) - ord("0")).reshape(len(image_ids), len(names))
    labels.columns = {name: matrix[:, j].astype(np.int32) for j, name in used}
    labels.image_ids = image_ids
    labels.lines = list(range(3, len(image_ids) + 3))
    labels.listed = set(image_ids)
    return True


def _rows_with_images(labels: _Labels, image_root: Path, present: set, bad: BadRows) -> list:
    if present.issuperset(labels.image_ids) and "/" not in "".join(labels.image_ids):
        return list(range(len(labels.image_ids)))
    keep = []
    for i, (image_id, line) in enumerate(zip(labels.image_ids, labels.lines)):
        found = image_id in present if "/" not in image_id else (image_root / image_id).is_file()
        if not found:
            bad.bad(labels.path, line, f"image file not found: {image_root / image_id}")
            continue
        keep.append(i)
    return keep


def _read_partition_file(path: Path, image_ids, skip_bad_rows, problems) -> Optional[np.ndarray]:
    """`list_eval_partition.txt` rows `000001.jpg 0` (0/1/2 = train/val/test)."""
    if not path.is_file():
        return None
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    partition = np.full((len(index),), "", dtype=object)
    bad = BadRows(skip_bad_rows)
    for line, fields in text_rows(path):
        if len(fields) != 2:
            bad.bad(path, line, f"expected an image name and a partition, found {len(fields)} fields")
            continue
        name = PARTITION_NAMES.get(fields[1].lower())
        if name is None:
            bad.bad(path, line, f"partition is {fields[1]!r}; expected 0, 1 or 2")
            continue
        i = index.get(fields[0])
        if i is not None:
            partition[i] = name
    bad.report(problems)
    unknown = int((partition == "").sum())
    if unknown:
        note(problems, f"{path}: {unknown} image(s) have no partition")
    return partition.astype(str)
