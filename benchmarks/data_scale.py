"""What opening a dataset of full-CelebA size costs (scale audit, 2026-11-24).

Builds, in a temporary folder, CelebA-format folders of each `--rows` size
whose images are hard links to a few hundred copies of real `celeba_sample`
images (so 200,000 rows take megabytes), with `attributes.csv`,
`identities.csv` and a `tfface data annotate` landmark cache whose stamps
match the files. Then times, each step in a fresh process (the imports a first open
pays, TensorFlow included, timed apart), with the growth of its peak memory
(over the peak before the step, the imports', and the step's own peak over the
memory at its start):

- reading the folder (`read_celeba_folder`: label files, identities, and
  the landmark cache checked against every file);
- opening it as training and evaluation do (`open_source`);
- the same after every image's file time changed (a copy that did not keep
  times: the cache's rows are checked by hashing the files);
- `tfface data summary`'s work (`summarize_source`, image sizes from a
  sample of 2,000 headers);
- `tfface data annotate` resuming with every image cached (`annotate_folder`
  with a detector stub that finds nothing and is never called), and again
  after the file times changed (the new times are recorded: the cache is
  rewritten).

Run: python benchmarks/data_scale.py [--rows 20000,200000] [--unique-images 300] [--steps labels,annotate]
Needs the real data (`celeba_sample`); the page cache is warm after the
build, so cold storage would be slower on every step that touches files.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import parse_args
from common import positive_int
from common import positive_ints
from common import print_table
from common import run
from common import write_results

# One step, in a fresh process: prints {"seconds", "rss_growth_mb" (over the
# peak before it, the imports'), "peak_over_start_mb" (its own peak over the
# memory at its start: a step under the imports' peak shows too), "import_seconds"}.
_STEP = r"""
import json, os, resource, sys, time
started = time.perf_counter()
import tfface.landmarks.cache  # what a first open imports (TensorFlow included): timed apart
from tfface.data.celeba import read_celeba_folder
from tfface.data.sources import open_source
from tfface.data.summary import summarize_source
imports = time.perf_counter() - started

step, root = sys.argv[1], sys.argv[2]


class NoFaces:  # a detector stub: every image is cached, so it is never called
    def detect_batch(self, images):
        return [[] for _ in images]


def annotate():
    from tfface.landmarks.annotate import annotate_folder

    report = annotate_folder(paths, os.path.join(root, "landmarks_mtcnn.csv"), image_ids=image_ids, detector=NoFaces(), verbose=False)
    if report.num_new or report.no_face or report.unreadable:
        sys.exit(f"annotate detected {report.num_new} image(s): the cache should have them all")


calls = {
    "labels": lambda: read_celeba_folder(root),
    "open": lambda: open_source(root),
    "summary": lambda: summarize_source(open_source(root)),
    "annotate": annotate,
}
if step == "annotate":  # its input, as the CLI has it before annotating: not counted
    image_ids = sorted(os.listdir(os.path.join(root, "images")))
    paths = [os.path.join(root, "images", image_id) for image_id in image_ids]


def status_mb(field):  # VmRSS (now) or VmHWM (peak) of this process, Linux
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


try:  # the peak so far is the imports': reset it to now, so a step under it still shows
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start_mb = status_mb("VmRSS")
except OSError:
    start_mb = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = calls[step]()
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak = status_mb("VmHWM") - start_mb if start_mb is not None else float("nan")
print(json.dumps({"seconds": seconds, "rss_growth_mb": (after - before) / 1024, "peak_over_start_mb": peak, "import_seconds": imports}))
"""


def build_folder(root: Path, rows: int, sample: Path, unique: int) -> list:
    """A CelebA-format folder of `rows` images (hard links to `unique`
    copies of the sample's images) with a matching landmark cache; returns
    the copies (touching them changes every linked row's file time)."""
    from tfface.landmarks.cache import CACHE_COLUMNS
    from tfface.landmarks.cache import file_stamp

    images = root / "images"
    images.mkdir(parents=True)
    originals = sorted((sample / "images").iterdir())[:unique]
    copies = root.parent / f"{root.name}_originals"
    copies.mkdir()
    stamps = []
    for original in originals:
        copy = copies / original.name
        shutil.copyfile(original, copy)  # never touch the shared data's times
        stamps.append(file_stamp(copy))
    header, *attribute_rows = (sample / "attributes.csv").read_text().splitlines()
    attributes = [header]
    identities = ["image_id,identity"]
    cache = [",".join(CACHE_COLUMNS)]
    points = "70.00,112.00,108.00,112.00,89.00,134.00,73.00,152.00,105.00,152.00"
    orientation = ",1" if "exif_orientation" in CACHE_COLUMNS else ""  # caches before 0.2.1 lack it
    for i in range(rows):
        name = f"{i + 1:06d}.jpg"
        k = i % len(originals)
        os.link(copies / originals[k].name, images / name)
        labels = attribute_rows[i % len(attribute_rows)]
        attributes.append(name + labels[labels.index(","):])
        identities.append(f"{name},{i % 10177 + 1}")
        cache.append(f"{name},ok,1,218,178,40.00,60.00,100.00,120.00,0.9990,{points},{','.join(stamps[k])}{orientation}")
    (root / "attributes.csv").write_text("\n".join(attributes) + "\n")
    (root / "identities.csv").write_text("\n".join(identities) + "\n")
    (root / "landmarks_mtcnn.csv").write_text("\n".join(cache) + "\n")
    return [copies / original.name for original in originals]


_STEPS = ("labels", "open", "summary", "annotate")


def _steps(text):
    """argparse type: a comma list of step names."""
    steps = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(steps) - set(_STEPS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown}: choose from {','.join(_STEPS)}")
    return steps


def timed_step(step: str, root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", _STEP, step, str(root)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"step {step} on {root} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=positive_ints, default=[20000, 200000], help="folder sizes, comma-separated")
    parser.add_argument("--unique-images", type=positive_int, default=300)
    parser.add_argument("--work-dir", type=Path, help="where to build the folders (default: a temporary folder)")
    parser.add_argument(
        "--steps", type=_steps, default=list(_STEPS), help=f"which steps to time, comma-separated (default: all of {','.join(_STEPS)})"
    )
    args = parse_args(parser)

    from tfface.data.sources import shared_data_dir

    data = shared_data_dir()
    if data is None or not (data / "celeba_sample").is_dir():
        sys.exit("data_scale.py needs the real data (celeba_sample): see ../shared/data")
    work = Path(tempfile.mkdtemp(prefix="tfface_scale_", dir=args.work_dir))
    rows_out = []
    try:
        for rows in args.rows:
            root = work / f"celeba_{rows}"
            started = time.perf_counter()
            copies = build_folder(root, rows, data / "celeba_sample", args.unique_images)
            print(f"built {rows} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            for step, label in (
                ("labels", "read_celeba_folder (labels, identities, landmark cache)"),
                ("open", "open_source (the same, as train and evaluate open it)"),
                ("summary", "data summary"),
                ("annotate", "data annotate, every image cached (resume)"),
            ):
                if step in args.steps:
                    rows_out.append({"rows": rows, "step": label, **timed_step(step, root)})
            for copy in copies:  # as after a copy that did not keep times: same bytes, new time
                os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
            if "open" in args.steps:
                rows_out.append({"rows": rows, "step": "open_source, file times changed (hashes checked)", **timed_step("open", root)})
            if "annotate" in args.steps:  # last: it records the new times
                rows_out.append({"rows": rows, "step": "data annotate, file times changed (new times recorded)", **timed_step("annotate", root)})
            shutil.rmtree(root)
            shutil.rmtree(work / f"{root.name}_originals")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows_out, ["rows", "step", "seconds", "rss_growth_mb", "peak_over_start_mb", "import_seconds"])
    write_results("data_scale", {"unique_images": args.unique_images, "steps": args.steps, "rows": rows_out})


if __name__ == "__main__":
    run(main)
