"""The `tfface` command line: one entry point, one subcommand per job.

Heavy imports (TensorFlow, Keras) happen inside each command, so
`tfface --help` answers at once. User errors (missing files, bad configs,
bad data) print one clear line and exit with status 2, never a traceback;
`tfface query` exits 1 when the server fails or refuses a call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys

from tfface import __version__

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gRPC core logs every failed TLS handshake at INFO level; tfface says what failed in one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# What TensorFlow's C++ library prints while it loads, before its logging can
# be configured (TF_CPP_MIN_LOG_LEVEL does not reach these lines): notices
# about the build, the same on every run. The CLI drops them (`-v` keeps
# them); any other line printed while TensorFlow loads is passed on.
_TENSORFLOW_LOAD_NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)
_NO_CUDA_DRIVER = "Could not find cuda drivers on your machine, GPU will not be used"


def _tensorflow_load_notice(line: str, printed: str) -> bool:
    """Whether a line TensorFlow printed while loading is a notice to drop.
    Without a CUDA driver, the driver line and cuInit's failure are expected
    (a CPU machine); with one, a cuInit failure is news and is kept."""
    if any(notice in line for notice in _TENSORFLOW_LOAD_NOTICES):
        return True
    return _NO_CUDA_DRIVER in printed and (_NO_CUDA_DRIVER in line or "failed call to cuInit" in line)


class _QuietTensorFlowLoad:
    """A `sys.meta_path` finder that lets TensorFlow be imported as usual
    (only by the commands that need it, so `tfface data summary` stays fast)
    but filters what its C++ library writes to stderr while it loads."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once; also keeps find_spec below from coming back here
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            load = spec.loader.exec_module

            def exec_module(module):
                with _filtered_native_stderr(_tensorflow_load_notice):
                    load(module)
                    module.config.list_physical_devices("GPU")  # cuInit's lines come now, not at the first op

            spec.loader.exec_module = exec_module
        return spec


@contextlib.contextmanager
def _filtered_native_stderr(is_notice):
    """Holds file descriptor 2 (where C++ code writes) in a temporary file
    for the block, then writes back each line for which `is_notice(line,
    everything printed)` is false (every line, if the block failed)."""
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to filter
        yield
        return
    failed = True
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            printed = held.read().decode("utf-8", "replace")
            for line in printed.splitlines(keepends=True):
                if failed or not is_notice(line, printed):
                    sys.stderr.write(line)
            sys.stderr.flush()


# The library's defaults (tfface.export / tfface.serving), here without
# importing them: they load TensorFlow, and `tfface --help` must not.
DEFAULT_MAX_IMAGE_SIDE = 4096
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# OSError covers missing files and folders, a file where a folder belongs
# (and back), permissions and a full disk: all name the path.
USER_ERRORS = (OSError, ValueError, KeyError)


def _error_text(error) -> str:
    """The error's message; for a folder that cannot be made because a file
    is in its way, which file: mkdir says only "[Errno 17] File exists:
    'x'" or "[Errno 20] Not a directory: 'x/y/z'"."""
    import errno
    from pathlib import Path

    if isinstance(error, OSError) and error.errno in (errno.EEXIST, errno.ENOTDIR) and error.filename:
        path = Path(os.fsdecode(error.filename))
        blocking = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            if blocking == path:
                return f"{path} is a file, where a folder is needed"
            return f"cannot make the folder for {path}: {blocking} is a file, not a folder"
    return str(error)


def _user_errors():
    """USER_ERRORS plus the package's own run-time failures that name their cause."""
    errors = list(USER_ERRORS)
    # Only a module already loaded can have raised its error: importing one
    # here would load TensorFlow just to print a missing config file's name.
    for module, name in (("tfface.export.saved_model", "ExportError"), ("tfface.tuning.config", "TuningError")):
        if sys.modules.get(module) is not None:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


# Import name -> the name pip installs it by, where they differ.
_PIP_NAMES = {
    "grpc": "grpcio", "keras_tuner": "keras-tuner", "PIL": "pillow", "tensorflow_datasets": "tensorflow-datasets",
    "tensorflow_serving": "tensorflow-serving-api", "yaml": "pyyaml",
}


def _missing_package(module: str) -> str:
    top = module.split(".")[0]
    package = _PIP_NAMES.get(top, top)
    return (
        f"the Python package {package!r} (module {top!r}) is not installed, and this command needs it; "
        f"`pip install {package}`, or reinstall tfface with its dependencies"
    )


def _positive_int(text):
    """argparse type: counts and batch sizes, where 0 or less means nothing."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _in_range(text, kind, low, high, expected: str, unit: str = ""):
    """An argparse value parsed by `kind` and checked to lie in low..high."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not low <= value <= high:  # also refuses NaN
        show = (lambda x: f"{x:g}") if kind is float else str
        raise argparse.ArgumentTypeError(f"must be in {show(low)}..{show(high)}{unit}, got {text}")
    return value


def _batch_timeout(text):
    """argparse type: milliseconds a batch waits; NaN or infinity would stall every request."""
    from tfface.serving.server import MAX_BATCH_TIMEOUT_MS

    return _in_range(text, float, 0.0, MAX_BATCH_TIMEOUT_MS, "milliseconds", " ms")


def _port(text):
    """argparse type: a TCP port (gRPC would silently wrap 99999 to 34463)."""
    return _in_range(text, int, 0, 65535, "a port number")


def _version_label(text):
    """argparse type: [MODEL:]LABEL=VERSION, as (model or None, label, version)."""
    from tfface.export.saved_model import MAX_VERSION

    label, sep, version = text.partition("=")
    model, colon, label = label.rpartition(":")
    if (
        not sep or not label.strip() or not version.strip().isdigit() or not 1 <= int(version) <= MAX_VERSION
        or (colon and not model.strip())
    ):
        raise argparse.ArgumentTypeError(
            f"expected [MODEL:]LABEL=VERSION with VERSION a positive integer, e.g. stable=1 or faces:stable=1; got {text!r}"
        )
    return model.strip() or None, label.strip(), int(version)


def _model_version(text):
    """argparse type: a model version, which TF Serving reads as an int64 above 0."""
    from tfface.export.saved_model import MAX_VERSION

    return _in_range(text, int, 1, MAX_VERSION, "a whole number", " (TF Serving reads versions as int64)")


def _message_bytes(text):
    """argparse type: a gRPC message limit, which gRPC holds in a 32-bit int."""
    return _in_range(text, int, 4096, 2**31 - 1, "a whole number", " bytes (gRPC's int32)")


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _cmd_data_summary(args):
    from tfface.data.sources import open_source
    from tfface.data.summary import format_summary
    from tfface.data.summary import summarize_source

    source = open_source(args.source, skip_bad_rows=args.skip_bad_rows)
    if args.check_images:
        from tfface.data.pipeline import undecodable_images
        from tfface.data.sources import note

        bad = undecodable_images([source], limit=len(source))
        if bad:
            note(source.problems, f"{len(bad)} image(s) do not decode (train and evaluate stop at them unless told to skip them: skip_bad_images, --skip-bad-images): {'; '.join(bad[:3])}")
    summary = summarize_source(source, all_sizes=args.all_sizes)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))


def _cmd_data_generate(args):
    from tfface.data.synthetic import check_new_dataset_folder
    from tfface.data.synthetic import generate_synthetic_faces
    from tfface.data.synthetic import write_synthetic_folder

    check_new_dataset_folder(args.out)
    source = generate_synthetic_faces(args.num_images, image_size=args.image_size, seed=args.seed)
    write_synthetic_folder(source, args.out)
    print(f"wrote {len(source)} synthetic faces to {args.out}")


def _cmd_data_annotate(args):
    from pathlib import Path

    from tfface.data.sources import MTCNN_CACHE_FILE
    from tfface.data.sources import folder_landmark_file
    from tfface.data.sources import open_source
    from tfface.data.sources import source_image_ids
    from tfface.landmarks.annotate import annotate_folder
    from tfface.landmarks.cache import default_landmark_cache

    source = open_source(args.source)
    if source.image_paths is None:
        raise ValueError(f"{args.source} is generated in memory and already has landmarks")
    own = folder_landmark_file(Path(source.root))
    if own is not None and own.name != MTCNN_CACHE_FILE and not args.cache:
        raise ValueError(
            f"{source.root} has its own landmarks in {own.name}, which training and evaluation read instead of "
            "detected ones; pass --cache FILE to detect anyway (a config source then reads it with landmarks: FILE)"
        )
    default = default_landmark_cache(source.root)
    cache = Path(args.cache) if args.cache else default
    result = annotate_folder(list(source.image_paths), cache, image_ids=source_image_ids(source), limit=args.limit)
    print(f"landmarks cached in {cache}")
    if cache.resolve() != default.resolve():
        print(f"(not where {args.source} is read from: a config source reads it with landmarks: {cache})")
    return result


def _cmd_data_masks(args):
    import numpy as np

    from tfface.data.sources import open_source
    from tfface.landmarks.group_masks import overlay_masks_png

    source = open_source(args.source)
    if source.landmarks is None:
        raise ValueError(f"{args.source} has no landmarks: run `tfface data annotate {args.source}` first")
    known = np.flatnonzero(np.isfinite(source.landmarks).all(axis=(1, 2)))
    if not known.size:
        raise ValueError(
            f"{args.source}: none of its {len(source)} images has landmarks: run `tfface data annotate {args.source}`"
        )
    from PIL import Image

    from tfface.data.image_ops import read_upright_rgb

    images, landmarks = [], []
    for i in known[: args.count]:
        if source.images is not None:
            image = source.images[i]
        else:
            try:
                image = read_upright_rgb(str(source.image_paths[i]))[0]  # landmarks are upright
            except Exception as e:
                raise ValueError(f"{source.image_paths[i]}: cannot read image ({type(e).__name__}: {e})") from None
        points = source.landmarks[i]
        if images and image.shape != images[0].shape:
            # One picture holds faces of one size, the first's: the others are scaled to it.
            height, width = images[0].shape[:2]
            points = points * np.array([width / image.shape[1], height / image.shape[0]], np.float32)
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        images.append(image)
        landmarks.append(points)
    overlay_masks_png(np.stack(images), np.stack(landmarks), args.out)
    shape = images[0].shape
    print(f"wrote {args.out} ({len(images)} faces at {shape[1]}x{shape[0]} pixels)")


def _cmd_train(args):
    from tfface.config import ExperimentConfig

    config = ExperimentConfig.load(args.config)  # a bad config is named before TensorFlow loads
    from tfface.training.trainer import train

    if args.output_dir is not None:
        if not args.output_dir.strip():
            raise ValueError("--output-dir is empty: give a folder (or leave the option out for train.output_dir)")
        config.train.output_dir = args.output_dir
    if args.epochs is not None:
        config.train.epochs = args.epochs
    summary = train(config)
    this_call = len(summary["history"].get("loss", []))
    total = "" if this_call == summary["epochs_run"] else f" ({summary['epochs_run']} in the whole run)"
    print(f"trained {this_call} epochs in {summary['train_seconds']} s{total}; model: {summary['model_path']}")


def _cmd_evaluate(args):
    from tfface.data.sources import open_source
    from tfface.evaluation.evaluate import check_evaluation_folder
    from tfface.evaluation.evaluate import evaluate_model
    from tfface.evaluation.evaluate import print_metrics
    from tfface.models.saving import load_model

    check_evaluation_folder(args.out)  # before the model loads and the calibration runs
    if args.calibrate:
        _check_new_model_file(args.calibrate, args.model)
    model = load_model(args.model)
    data = open_source(args.data, image_size=model.image_size, skip_bad_rows=args.skip_bad_rows)
    split_options = {}
    if args.split or args.calibrate:
        # Only then does the run's config.yaml beside the model matter.
        split = _training_split(args.model)
        split_options = {"val_fraction": split["val_fraction"], "split_seed": split["split_seed"]}
        print(f"split: val_fraction {split['val_fraction']}, seed {split['split_seed']} ({split['from']})")
    if args.calibrate:
        from tfface.evaluation.calibration import calibrate_model
        from tfface.evaluation.evaluate import open_sources

        val_sources = open_sources(data, split="val", **split_options)
        on = "the validation split"
        if args.limit:
            from tfface.evaluation.evaluate import limit_sources

            # The same seeded choice as the scoring below, so the two stay
            # consistent and a limited run stays short.
            val_sources, _, chosen = limit_sources(val_sources, args.limit)
            on = f"{chosen['n_images_scored']} of the {chosen['n_images_available']} validation images (--limit)"
        if args.skip_bad_images:
            from tfface.data.pipeline import drop_undecodable_images

            val_sources = [drop_undecodable_images(source) for source in val_sources]
        thresholds = calibrate_model(model, val_sources)
        print(f"calibrated {len(thresholds)} thresholds on {on}")
    with _terminate_unwinds():
        metrics = evaluate_model(
            model, data, args.out, batch_size=args.batch_size, split=args.split, model_path=args.model,
            limit=args.limit, skip_bad_images=args.skip_bad_images, **split_options,
        )
    print_metrics(metrics)
    print(f"wrote {args.out}/metrics.json and report.md")
    if args.calibrate:
        from tfface.atomic_files import save_model_atomic

        # Saved last and whole: a failed evaluation leaves no new model.
        save_model_atomic(model, args.calibrate)
        print(f"saved the calibrated model to {args.calibrate}")


def _training_split(model_path) -> dict:
    """The split settings of the run that trained the model (its config.yaml
    sits beside model.keras), so --split and --calibrate take the same
    validation images as training; the defaults for a model on its own."""
    from pathlib import Path

    from tfface.config import ConfigError
    from tfface.config import DataConfig
    from tfface.config import read_structured_file

    defaults = DataConfig()
    path = Path(model_path)
    config_file = (path if path.is_dir() else path.parent) / "config.yaml"
    if not config_file.is_file():
        return {"val_fraction": defaults.val_fraction, "split_seed": defaults.split_seed, "from": "defaults"}
    # Only the two split keys: the rest of the run's config (e.g. a schema
    # file relative to another folder) need not load here.
    raw = read_structured_file(config_file, "run config")
    data = raw.get("data") if isinstance(raw, dict) else None
    data = data if isinstance(data, dict) else {}
    split = {"val_fraction": data.get("val_fraction", defaults.val_fraction),
             "split_seed": data.get("split_seed", defaults.split_seed), "from": str(config_file)}
    if not isinstance(split["val_fraction"], (int, float)) or not isinstance(split["split_seed"], int):
        raise ConfigError(f"{config_file}: data.val_fraction and data.split_seed must be numbers")
    from tfface.training.resume import check_run_split

    check_run_split(
        config_file.parent, "its validation images would include images the model trained on: evaluate on "
        "held-out data without --split (or retrain with this tfface)"
    )
    return split


def _check_new_model_file(path, source_model):
    """The calibrated model is a .keras file other than the model being
    evaluated (a repeated calibration may replace its own earlier output)."""
    from pathlib import Path

    path, source = Path(path), Path(source_model)
    if path.suffix != ".keras":
        raise ValueError(f"--calibrate {path}: the calibrated model is a .keras file")
    if path.exists() and path.resolve() in (source.resolve(), (source / "model.keras").resolve()):
        raise FileExistsError(f"--calibrate {path} is the model being evaluated; save the calibrated model elsewhere")
    if path.is_dir():
        raise IsADirectoryError(f"--calibrate {path} is a folder; name the .keras file to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"--calibrate {path}: {path.parent} is a file, not a folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--calibrate {path}: folder {path.parent} not found")
    # Checked before the calibration and evaluation, which the write comes after.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--calibrate {path}: cannot write in {path.parent} (read-only or not yours)")


def _cmd_export(args):
    from tfface.export.saved_model import export_saved_model
    from tfface.models.saving import load_model

    model = load_model(args.model)
    with _terminate_unwinds():
        path = export_saved_model(
            model, args.export_root, args.name, version=args.version, max_image_side=args.max_image_side
        )
    print(f"exported to {path}")


@contextlib.contextmanager
def _terminate_unwinds():
    """A SIGTERM (kill, a CI timeout) unwinds the block like Ctrl+C, so a
    half-written output folder is removed instead of left behind."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    except RuntimeError as e:
        # Raised inside TensorFlow's C++ code, the interrupt comes back
        # wrapped by pybind11 ("... REPLACED BY KeyboardInterrupt").
        if "KeyboardInterrupt" in str(e):
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _cmd_serve(args):
    from tfface.serving.server import serve_main

    return serve_main(args)


def _cmd_query(args):
    from tfface.serving.client import query_main

    return query_main(args)


def _cmd_predict(args):
    from tfface.predict import predict_main

    return predict_main(args)


def _cmd_tune(args):
    from tfface.tuning.search import tune_main

    return tune_main(args)


def _cmd_demo(args):
    from tfface.demo import run_demo

    run_demo(workdir=args.workdir, num_images=args.num_images, epochs=args.epochs)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless it has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default == argparse.SUPPRESS
        if hidden or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """An argument parser (and, as `add_subparsers` reuses its class, every
    subcommand's) that shows defaults in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tfface",
        description="Multi-task face attribute recognition: data tools, training, evaluation, "
        "export to TF Serving, a local gRPC server and client, KerasTuner search, prediction on photos.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    parser.add_argument("--version", action="version", version=f"tfface {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="inspect, generate and annotate datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser(
        "summary",
        help="counts, label rates, image sizes and problems of a source",
        description="SOURCE is a folder (CelebA or UTKFace format, detected from its contents) "
        "or a named source: synthetic[:N], celeba_sample, celeba_lowres, utkface.",
    )
    p.add_argument("source", help="folder or named source")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed label rows and report how many")
    p.add_argument(
        "--check-images", action="store_true",
        help="decode every image (slow) and list those that do not decode, e.g. truncated files",
    )
    p.add_argument(
        "--all-sizes", action="store_true",
        help="read every image's header for the image-size counts (by default a folder of more than "
        "2000 images has a fixed random sample of 2000 read, and the summary says so)",
    )
    p.set_defaults(func=_cmd_data_summary)
    p = data_sub.add_parser("generate", help="write synthetic faces as a CelebA-format folder")
    p.add_argument("--out", required=True, help="folder to create (must not hold files)")
    p.add_argument("--num-images", type=_positive_int, default=1000, help="faces to generate")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images, pixels")
    p.add_argument("--seed", type=int, default=0, help="same seed, same faces")
    p.set_defaults(func=_cmd_data_generate)
    p = data_sub.add_parser(
        "annotate",
        help="detect five landmarks with MTCNN once and cache them",
        description="Detect five landmarks with MTCNN and cache them. Run it again after changing the folder: "
        "only new images, images whose file changed (size, time and hash are recorded) and images that could "
        "not be read are detected; training leaves out the landmarks of a changed image until then. Images "
        "whose time changed but not their bytes (copied without keeping times) keep their landmarks, and their "
        "new times are recorded. Landmarks are detected on the upright image (EXIF rotation applied).",
    )
    p.add_argument("source", help="folder or named source")
    p.add_argument(
        "--cache",
        help="cache file (default: landmarks_mtcnn.csv in the data folder when it exists, or when the folder "
        "is writable and not shared data, else under ~/.cache/tfface, or $TFFACE_CACHE_DIR when set)",
    )
    p.add_argument("--limit", type=_positive_int, help="only the first N images")
    p.set_defaults(func=_cmd_data_annotate)
    p = data_sub.add_parser("masks", help="draw the eight group masks over sample faces (PNG)")
    p.add_argument("source", help="folder or named source")
    p.add_argument("--out", default="group_masks.png", help="PNG file to write")
    p.add_argument("--count", type=_positive_int, default=8, help="faces to draw")
    p.set_defaults(func=_cmd_data_masks)

    p = sub.add_parser("train", help="train a model from a config file (resumes an interrupted run)")
    p.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    p.add_argument("--output-dir", help="override train.output_dir")
    p.add_argument("--epochs", type=_positive_int, help="override train.epochs")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics.json, plots and a report on a labelled source")
    p.add_argument("--model", required=True, help=".keras file or a training output dir")
    p.add_argument("--data", required=True, help="SOURCE (folder or named source)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass")
    p.add_argument(
        "--split",
        choices=["train", "val"],
        help="evaluate only this part of the training split: the same identity-disjoint split as `train`, "
        "with val_fraction and split_seed from the run's config.yaml beside the model (else the defaults)",
    )
    p.add_argument(
        "--calibrate",
        metavar="OUT.keras",
        help="first calibrate per-attribute thresholds on the val split (max balanced accuracy; on --limit N of its images when given); the calibrated model is saved to this .keras file (not the evaluated one) after the evaluation",
    )
    p.add_argument(
        "--skip-bad-rows", action="store_true",
        help="skip malformed label rows and missing images instead of stopping; metrics.json lists what was skipped",
    )
    p.add_argument(
        "--skip-bad-images", action="store_true",
        help="decode every image once first and leave out those that do not decode (corrupt, cut short, an "
        "unsupported kind) instead of stopping at them; metrics.json lists them",
    )
    p.add_argument(
        "--limit", type=_positive_int, metavar="N",
        help="score only N images of the data (of the --split part when given): the same N on every run, chosen "
        "by a seeded hash of the image file names (of the pixels for generated sources), not the first N; metrics.json and report.md record the limit "
        "(default: every image)",
    )
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="write a TF Serving SavedModel to saved_models/NAME/VERSION")
    p.add_argument("--model", required=True, help=".keras file or a training output dir")
    p.add_argument("--name", required=True, help="model name, as TF Serving's config names it")
    p.add_argument(
        "--version", type=_model_version, help="version number, never an existing one (default: the next free number)"
    )
    p.add_argument("--export-root", default="saved_models", help="folder holding NAME/VERSION")
    p.add_argument(
        "--max-image-side", type=_positive_int, default=DEFAULT_MAX_IMAGE_SIDE,
        help="serving_default refuses images with a longer side (INVALID_ARGUMENT; default %(default)s)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="local gRPC server with TF Serving's API (development, tests)")
    p.add_argument("--model-dir", required=True, help="saved_models/NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=_port, default=8500, help="gRPC port (0: any free port)")
    p.add_argument("--max-batch-size", type=_positive_int, default=32, help="most images the model runs at once; a request with more is refused")
    p.add_argument(
        "--batch-timeout-ms", type=_batch_timeout, default=0.0,
        help="wait for company, 0..60000 (default 0: batch what queues while the model runs)"
    )
    p.add_argument("--no-batching", action="store_true", help="run each request alone")
    p.add_argument("--versions", default="latest", help='"latest" or "all" exported versions')
    p.add_argument(
        "--version-label",
        dest="version_labels",
        type=_version_label,
        action="append",
        metavar="[MODEL:]LABEL=VERSION",
        help="serve VERSION under LABEL too, as TF Serving's version_labels (repeatable); stable=1 labels every "
        "model served, faces:stable=1 only the model 'faces'",
    )
    p.add_argument(
        "--max-image-side", type=_positive_int, default=DEFAULT_MAX_IMAGE_SIDE, help="reject larger images (INVALID_ARGUMENT)"
    )
    p.add_argument(
        "--max-message-bytes", type=_message_bytes, default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC request and answer; a larger one is refused (RESOURCE_EXHAUSTED)",
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("query", help="send images to a TF Serving (or local) server over gRPC")
    p.add_argument("images", nargs="+", help="face crops (JPEG, PNG, WebP, BMP or GIF files)")
    p.add_argument("--host", default="localhost:8500", help="HOST:PORT (HOST alone: port 8500)")
    p.add_argument("--model", required=True, help="model name on the server")
    p.add_argument("--signature", default="serving_default", help="signature that takes encoded images")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds per attempt of each call")
    p.add_argument(
        "--retries",
        type=int,
        help="attempts after UNAVAILABLE, waiting about 0.25 s, 0.5 s, ... up to 4 s between them, +-20%% (default 8: rides out "
        "a server restart of about 15 s; 0: fail at once)",
    )
    p.add_argument("--tls", action="store_true", help="connect over TLS")
    p.add_argument("--root-certificates", help="PEM file for TLS")
    p.add_argument("--version", type=_model_version, help="model version (default: latest)")
    p.add_argument("--version-label", help="model version label, e.g. stable")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per request")
    p.add_argument(
        "--max-message-bytes", type=_message_bytes, default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC request and answer: requests are split to stay under it (match the server's limit)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("predict", help="detect, align and analyse every face in photos")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--model", required=True, help=".keras file or a training output dir")
    p.add_argument("--draw", help="folder for annotated PNGs")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="faces per forward pass")
    p.add_argument("--out", help="JSON lines file (default: stdout)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("tune", help="KerasTuner search over gates and loss weights")
    p.add_argument("--config", required=True, help="tuning config (see tuning/)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser(
        "demo",
        help="the main job on synthetic data: generate, train, evaluate, export, serve, query",
    )
    p.add_argument("--workdir", default="runs/demo", help="folder for the run (train/), evaluation (eval/) and SavedModels (saved_models/): an earlier demo's run and evaluation are replaced, each export adds a version")
    p.add_argument("--num-images", type=_positive_int, default=4000, help="synthetic faces to generate")
    p.add_argument("--epochs", type=_positive_int, default=12, help="training epochs")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before parsing: checking --version loads TensorFlow (for TF Serving's limit).
    if "tensorflow" not in sys.modules and not {"-v", "--verbose"} & set(argv):
        sys.meta_path.insert(0, _QuietTensorFlowLoad())
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for library in ("tensorflow", "jax", "absl"):  # "Assets written to ...", "Unable to initialize backend 'tpu'"
            logging.getLogger(library).setLevel(logging.WARNING)
    try:
        code = args.func(args)
    except _user_errors() as e:
        if os.environ.get("TFFACE_DEBUG"):
            raise
        print(f"tfface {args.command}: error: {_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if os.environ.get("TFFACE_DEBUG") or not e.name or e.name.split(".")[0] == "tfface":
            raise
        print(f"tfface {args.command}: error: {_missing_package(e.name)}", file=sys.stderr)
        return 2
    except MemoryError as e:
        if os.environ.get("TFFACE_DEBUG"):
            raise
        print(f"tfface {args.command}: error: out of memory ({e or 'no detail'}); ask for fewer or smaller images "
              "or a smaller batch", file=sys.stderr)
        return 2
    except Exception as e:
        # Data errors raised inside TensorFlow (e.g. a corrupt image met
        # during training) carry their message; show it, not a traceback.
        if type(e).__module__.startswith("tensorflow") and not os.environ.get("TFFACE_DEBUG"):
            from tfface.tf_errors import tensorflow_error_text

            print(f"tfface {args.command}: error: {tensorflow_error_text(e)}", file=sys.stderr)
            return 2
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
