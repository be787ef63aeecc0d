"""Reader for UTKFace-format folders.

UTKFace labels live in the file names, `age_gender_race_datetime.jpg` (the
aligned-and-cropped release adds `.chip.jpg`), with gender 0 = male,
1 = female and race 0..4 = White, Black, Asian, Indian, Others. A
`labels.csv` (image_id, age, gender, race, ...), as in the shared copy, is
used instead when present. Some original UTKFace names have only three
fields; such names are skipped and reported, never dropped silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tfface.data.source import DataError, FaceSource
from tfface.data.sources import (
    UTKFACE_NAME,
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
    read_landmarks,
    unique_image_ids,
    validate_images,
    wrong_column_count,
)
from tfface.schema import RACES, UTKFACE

LABELS_CSV = "labels.csv"
MAX_AGE = 120
REQUIRED_COLUMNS = ("image_id", "age", "gender", "race")


def read_utkface_folder(root, skip_bad_rows=False, check_images=False, landmarks_file=None) -> FaceSource:
    """Reads a UTKFace-format folder (`images/` or the images in `root`).

    Args:
        root: the folder.
        skip_bad_rows: skip rows or file names whose values are out of range
            (or whose image is missing) instead of raising `DataError`;
            they are counted in `problems` and logged.
        check_images: decode every image now, as training will, so a file
            training cannot decode fails here, naming the file.
        landmarks_file: landmark file to use instead of the ones in `root`.

    Returns:
        a `FaceSource` with format "utkface" and raw columns `age` (years),
        `male` (1 when UTKFace gender is 0) and `race` (0..4).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"UTKFace folder not found: {root}")
    image_root = images_dir(root)
    problems: list = []
    bad = BadRows(skip_bad_rows)
    if (root / LABELS_CSV).is_file():
        image_ids, values = _read_labels_csv(root / LABELS_CSV, image_root, bad, problems)
    else:
        image_ids, values = _read_file_names(image_root, bad, problems)
    bad.report(problems)
    if not image_ids:
        raise DataError(f"{root}: no usable UTKFace images or label rows")
    values = np.asarray(values, np.int32).reshape(-1, 3)
    age, gender, race = values[:, 0], values[:, 1], values[:, 2]
    source = FaceSource(
        name=os.path.basename(os.path.abspath(root)),
        format=UTKFACE,
        columns={"age": age, "male": (gender == 0).astype(np.int32), "race": race},
        image_paths=image_paths_under(image_root, image_ids),
        landmarks=read_landmarks(root, image_ids, landmarks_file, skip_bad_rows, problems),
        root=str(root),
        problems=problems,
    )
    if check_images:
        validate_images(source)
    return source


def _range_error(age, gender, race) -> str | None:
    if age is None:
        return f"age must be an integer 0..{MAX_AGE}"
    if gender is None:
        return "gender must be 0 (male) or 1 (female)"
    if race is None:
        return f"race must be 0..{len(RACES) - 1} ({', '.join(RACES)})"
    return None


def _parse_values(age: str, gender: str, race: str):
    return (
        parse_int(age, 0, MAX_AGE),
        parse_int(gender, 0, 1),
        parse_int(race, 0, len(RACES) - 1),
    )


def _race_name_key(cell: str) -> str:
    return cell.strip().lower()


def _values_from_columns(columns: list, position: dict, image_root: Path, present: set):
    """The fast path of `_read_labels_csv`: (image ids, (N, 3) values) from
    whole columns, or None when any row would be bad (the row loop then
    reports it at its line)."""
    image_ids = unique_image_ids(columns[position["image_id"]])
    if image_ids is None:
        return None
    limits = {"age": MAX_AGE, "gender": 1, "race": len(RACES) - 1}
    values = [parse_column(columns[position[c]], lambda cell, high=limits[c]: parse_int(cell, 0, high), np.int32) for c in limits]
    if any(v is None for v in values):
        return None
    if "male" in position:
        male = parse_column(columns[position["male"]], {"0": 0, "1": 1}.get, np.int32)
        if male is None or not np.array_equal(male, values[1] == 0):
            return None
    if "race_name" in position:
        names = [_race_name_key(cell) for cell in columns[position["race_name"]]]
        if names != [RACES[r].lower() for r in values[2]]:
            return None
    if not all(i in present or (image_root / i).is_file() for i in image_ids):
        return None
    return image_ids, np.stack(values, axis=1)


def _read_labels_csv(path: Path, image_root: Path, bad: BadRows, problems: list):
    # Fast path (whole columns), else row by row: see celeba._read_attribute_csv.
    table = csv_table(path)
    rows = csv_rows(path) if table is None else iter(())
    _, header = (1, table[0]) if table is not None else next(rows, (None, []))
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}, line 1: header lacks columns {missing} (found {header})")
    position = {c: header.index(c) for c in header}
    present = image_file_names(image_root)
    image_ids, values, seen, listed = [], [], set(), set()
    fast = _values_from_columns(table[1], position, image_root, present) if table is not None else None
    if fast is not None:
        image_ids, values = fast
        listed = set(image_ids)
    elif table is not None:
        rows = csv_rows(path)
        next(rows, None)  # the header
    for line, fields in rows:
        if len(fields) > position["image_id"]:
            listed.add(fields[position["image_id"]])  # a skipped row's image is reported with the row only
        if len(fields) != len(header):
            bad.bad(path, line, wrong_column_count(len(header), len(fields)))
            continue
        image_id = fields[position["image_id"]]
        cells = [fields[position[c]] for c in ("age", "gender", "race")]
        parsed = _parse_values(*cells)
        error = _range_error(*parsed)
        if error is not None:
            bad.bad(path, line, f"{error}; got age={cells[0]!r} gender={cells[1]!r} race={cells[2]!r}")
            continue
        if "male" in position and fields[position["male"]] != str(int(parsed[1] == 0)):
            bad.bad(path, line, f"male={fields[position['male']]!r} contradicts gender={cells[1]!r} (male = 1 when gender is 0)")
            continue
        if "race_name" in position and _race_name_key(fields[position["race_name"]]) != RACES[parsed[2]].lower():
            bad.bad(
                path, line, f"race_name={fields[position['race_name']]!r} contradicts race={cells[2]!r} ({RACES[parsed[2]]})"
            )
            continue
        key = image_file_keys([image_id])[0]
        if not image_id or key in seen:
            bad.bad(path, line, f"image {image_id!r} is empty or listed twice")
            continue
        if image_id not in present and not (image_root / image_id).is_file():
            bad.bad(path, line, f"image file not found: {image_root / image_id}")
            continue
        seen.add(key)
        image_ids.append(image_id)
        values.append(parsed)
    unlisted = sum(1 for name in present.difference(listed) if is_image_name(name))
    if unlisted:
        note(problems, f"{image_root}: {unlisted} image(s) have no row in {path.name} (ignored)")
    return image_ids, values


def _read_file_names(image_root: Path, bad: BadRows, problems: list):
    image_ids, values, malformed = [], [], []
    for name in sorted(image_file_names(image_root)):
        if not is_image_name(name):
            continue
        match = UTKFACE_NAME.match(name)
        if match is None:
            malformed.append(name)
            continue
        parsed = _parse_values(*match.groups()[:3])
        error = _range_error(*parsed)
        if error is not None:
            bad.bad(image_root, None, f"{name}: file name label out of range: {error}")
            continue
        image_ids.append(name)
        values.append(parsed)
    if malformed:
        note(
            problems,
            f"{image_root}: skipped {len(malformed)} image(s) whose names are not "
            f"age_gender_race_datetime.jpg, e.g. {malformed[:3]}",
        )
    return image_ids, values
