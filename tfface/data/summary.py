"""What is in a source: counts, label rates, image sizes, coverage.

Backs `tfface data summary SOURCE`: a quick look at a dataset before
training on it (is a column mostly missing? are the images the size the
model expects? how many people, how many landmarks?). Image sizes come from
the file headers only, and of a large folder only from a fixed random
sample of `SIZE_SAMPLE` of them (reading all 202,599 CelebA headers took
71 s and 1.25 GB even from a warm page cache); `all_sizes=True` reads
every header.
"""

from __future__ import annotations

import collections

import numpy as np

from tfface.data.source import FaceSource
from tfface.data.sources import read_image_sizes
from tfface.schema import AGE_GROUPS, MISSING, RACES, age_to_group, get_schema

# Image headers read for the size statistics of a larger folder: a fixed
# random sample (the same rows on every run), enough to show the common
# sizes; `summarize_source(all_sizes=True)` (`--all-sizes`) reads them all.
SIZE_SAMPLE = 2000
SIZE_SAMPLE_SEED = 20240601


def _class_counts(values, names) -> dict:
    values = values[values != MISSING]
    return {name: int((values == k).sum()) for k, name in enumerate(names)}


def _column_summary(name: str, values) -> dict:
    values = np.asarray(values)
    known = values[values != MISSING]
    entry = {"labelled": int(known.size), "missing": int(values.size - known.size)}
    if name == "age":
        entry["kind"] = "age"
        entry["groups"] = _class_counts(age_to_group(values), AGE_GROUPS)
        if known.size:
            entry.update(
                mean=float(known.mean()), median=float(np.median(known)), min=int(known.min()), max=int(known.max())
            )
    elif name == "race":
        entry["kind"] = "classes"
        entry["classes"] = _class_counts(values, RACES)
    elif known.size == 0 or set(np.unique(known).tolist()) <= {0, 1}:
        entry["kind"] = "binary"
        entry["positive_rate"] = float(known.mean()) if known.size else None
    else:
        entry["kind"] = "classes"
        entry["classes"] = {str(k): int(c) for k, c in zip(*np.unique(known, return_counts=True))}
    return entry


def _task_summary(source: FaceSource, schema) -> dict:
    labels = schema.encode_labels(source.format, source.columns, len(source))
    tasks = {}
    for task in schema:
        values = labels[task.name]
        known = values[values != MISSING]
        entry = {"labelled": int(known.size)}
        if task.is_binary:
            entry["positive_rate"] = float(known.mean()) if known.size else None
        else:
            entry["classes"] = _class_counts(values.astype(np.int64), task.classes)
        tasks[task.name] = entry
    return tasks


def _size_sample_rows(source: FaceSource, all_sizes: bool):
    """The rows whose headers to read for the size statistics, or None for
    every row: all of them when asked to, when there are at most
    `SIZE_SAMPLE`, or when the sizes cost no file reads (images in memory,
    sizes recorded by the reader)."""
    if all_sizes or len(source) <= SIZE_SAMPLE or source.image_paths is None or source.image_sizes is not None:
        return None
    rng = np.random.default_rng(SIZE_SAMPLE_SEED)
    return np.sort(rng.choice(len(source), size=SIZE_SAMPLE, replace=False))


def summarize_source(source: FaceSource, schema=None, read_sizes=True, all_sizes=False) -> dict:
    """A JSON-friendly description of `source`.

    Args:
        source: any `FaceSource`.
        schema: optional schema (or preset name); adds per-task label
            counts and rates as the model will see them.
        read_sizes: read image sizes from the file headers.
        all_sizes: read every image's header; by default a folder of more
            than `SIZE_SAMPLE` images has only a fixed random sample of
            `SIZE_SAMPLE` read, and the summary says so under
            "image_sizes_sample" ({"images": read, "of": all}).
    """
    summary = {
        "name": source.name,
        "format": source.format,
        "root": source.root,
        "num_images": len(source),
        "columns": {name: _column_summary(name, values) for name, values in source.columns.items()},
    }
    if schema is not None:
        schema = get_schema(schema)
        summary["schema"] = schema.name
        summary["tasks"] = _task_summary(source, schema)
    unreadable = []
    if read_sizes and len(source):
        rows = _size_sample_rows(source, all_sizes)
        if rows is None:
            sizes = read_image_sizes(source, problems=unreadable)
        else:
            in_sample = []
            sizes = read_image_sizes(source.subset(rows), problems=in_sample)
            unreadable += [
                f"{line} (of the {len(rows)} images sampled for image sizes, out of {len(source)})" for line in in_sample
            ]
        counts = collections.Counter(f"{h}x{w}" for h, w in sizes.tolist() if h >= 0)
        summary["image_sizes"] = dict(counts.most_common())
        if rows is not None:
            summary["image_sizes_sample"] = {"images": int(len(rows)), "of": int(len(source))}
    if source.identities is None:
        summary["identities"] = None
    else:
        identities = np.asarray(source.identities)
        summary["identities"] = {
            "people": int(np.unique(identities[identities >= 0]).size),
            "unknown": int((identities < 0).sum()),
        }
    if source.landmarks is None:
        summary["landmarks"] = None
    else:
        known = int(np.isfinite(np.asarray(source.landmarks)).all(axis=(1, 2)).sum())
        summary["landmarks"] = {"known": known, "fraction": known / max(len(source), 1)}
    summary["partition"] = (
        None
        if source.partition is None
        else dict(collections.Counter(str(p) or "(none)" for p in source.partition))
    )
    summary["problems"] = list(source.problems) + unreadable
    return summary


def _counts_line(counts: dict, total: int) -> str:
    return ", ".join(f"{k}: {v} ({v / total:.1%})" if total else f"{k}: {v}" for k, v in counts.items())


def format_summary(summary: dict) -> str:
    """`summarize_source`'s dict as a readable text table."""
    lines = [
        f"source      {summary['name']} ({summary['format']})",
        f"root        {summary.get('root') or '-'}",
        f"images      {summary['num_images']}",
    ]
    if summary.get("image_sizes"):
        sizes = list(summary["image_sizes"].items())
        shown = ", ".join(f"{size} x{count}" for size, count in sizes[:5])
        more = f" (+{len(sizes) - 5} other sizes)" if len(sizes) > 5 else ""
        sample = summary.get("image_sizes_sample")
        sampled = f", from a random sample of {sample['images']} of {sample['of']} images" if sample else ""
        lines.append(f"image sizes {shown}{more} (height x width{sampled})")
    identities = summary.get("identities")
    lines.append(
        "identities  "
        + ("unknown" if identities is None else f"{identities['people']} people ({identities['unknown']} images unknown)")
    )
    landmarks = summary.get("landmarks")
    lines.append(
        "landmarks   "
        + ("none" if landmarks is None else f"{landmarks['known']} images ({landmarks['fraction']:.1%})")
    )
    if summary.get("partition"):
        lines.append(f"partition   {_counts_line(summary['partition'], summary['num_images'])}")

    binary = {k: v for k, v in summary["columns"].items() if v["kind"] == "binary"}
    other = {k: v for k, v in summary["columns"].items() if v["kind"] != "binary"}
    if binary:
        width = max(len(k) for k in binary)
        lines += ["", f"{'column':<{width}}  positive  labelled"]
        for name, entry in binary.items():
            rate = "-" if entry["positive_rate"] is None else f"{entry['positive_rate']:.3f}"
            lines.append(f"{name:<{width}}  {rate:>8}  {entry['labelled']:>8}")
    for name, entry in other.items():
        lines.append("")
        if entry["kind"] == "age":
            stats = (
                f" mean {entry['mean']:.1f}, median {entry['median']:.0f}, range {entry['min']}-{entry['max']}"
                if "mean" in entry
                else ""
            )
            lines.append(f"{name}: {entry['labelled']} labelled;{stats}")
            lines.append(f"  groups: {_counts_line(entry['groups'], entry['labelled'])}")
        else:
            lines.append(f"{name}: {entry['labelled']} labelled")
            lines.append(f"  classes: {_counts_line(entry['classes'], entry['labelled'])}")
    if summary.get("tasks"):
        lines += ["", f"tasks ({summary['schema']} schema)"]
        labelled = {k: v for k, v in summary["tasks"].items() if v["labelled"]}
        unlabelled = [k for k in summary["tasks"] if k not in labelled]
        width = max((len(k) for k in labelled), default=0)
        for name, entry in labelled.items():
            if "positive_rate" in entry:
                rate = "-" if entry["positive_rate"] is None else f"{entry['positive_rate']:.3f}"
                lines.append(f"  {name:<{width}}  positive {rate:>6}  labelled {entry['labelled']}")
            else:
                lines.append(f"  {name:<{width}}  labelled {entry['labelled']}: {_counts_line(entry['classes'], entry['labelled'])}")
        if unlabelled:
            lines.append(f"  not labelled by this source ({len(unlabelled)}): {', '.join(unlabelled)}")
    if summary.get("problems"):
        lines += ["", "problems"] + [f"  - {p}" for p in summary["problems"]]
    return "\n".join(lines)
