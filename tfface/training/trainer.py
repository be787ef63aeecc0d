"""`train(config)`: the whole training run behind `tfface train --config`.

Reads and splits the sources, builds the fused pipeline and the model named
by the config, and runs `model.fit` with the callbacks a long run needs:
a backup every epoch so a killed run resumes where it stopped (model,
optimizer and epoch restored by `keras.callbacks.BackupAndRestore`, which
keeps the previous backup too, for a kill during the write; the
best score so far and early stopping's count from `history.csv`), the
best model by validation mean balanced accuracy, TensorBoard logs, a CSV
history, early stopping and a wall-clock budget.

Everything lands in `train.output_dir`:
`config.yaml`, `model.keras` (best), `last.keras`, `history.csv`,
`logs/` (TensorBoard), `backup/` (resume state, removed after success),
`train_summary.json`. Nothing is written before the data opens, and a
folder holding a finished run, or a run with a different config, is
refused, not overwritten.

The parts it is built from live beside it: `distribution` (the
`tf.distribute` strategy and the multi-worker cluster), `resume` (resuming
a run, and refusing a folder it must not train into), `callbacks` (the
Keras callbacks of a long run) and `optimizer`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

import tfface
from tfface.atomic_files import claimed_folder
from tfface.atomic_files import closing_files_of_a_failed_write
from tfface.atomic_files import discard_leftovers
from tfface.atomic_files import save_model_atomic
from tfface.atomic_files import write_atomic
from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.data.pipeline import choose_cache
from tfface.data.pipeline import drop_undecodable_images
from tfface.data.pipeline import make_dataset
from tfface.data.pipeline import naming_undecodable_images
from tfface.data.splits import split_record
from tfface.models.backbones import local_weights_file
from tfface.models.build import build_model
from tfface.schema import get_schema
from tfface.training.callbacks import AtomicModelCheckpoint
from tfface.training.callbacks import BackupSpaceCheck
from tfface.training.callbacks import ResumedEarlyStopping
from tfface.training.callbacks import TimeBudget
from tfface.training.distribution import chief_scores
from tfface.training.distribution import cluster_members
from tfface.training.distribution import is_chief
from tfface.training.distribution import make_strategy
from tfface.training.distribution import rank_one_logs
from tfface.training.distribution import read_tf_config
from tfface.training.distribution import worker_folder
from tfface.training.optimizer import make_optimizer
from tfface.training.resume import BACKUP_METADATA
from tfface.training.resume import MONITOR
from tfface.training.resume import SPLIT_FILE
from tfface.training.resume import backup_epoch
from tfface.training.resume import check_resumable
from tfface.training.resume import is_resuming
from tfface.training.resume import monitored_history
from tfface.training.resume import restore_backup
from tfface.training.resume import settle_backup
from tfface.training.resume import trim_history

# Re-exported, not used here: these lived in this module before resuming a
# run got a module of its own, and still import from it.
from tfface.training.resume import BACKUP_WEIGHTS
from tfface.training.resume import RESUMABLE_CHANGES
from tfface.training.resume import check_run_split
from tfface.training.resume import read_split_record

# The public API of this module, as before the split: the resume names and
# the callbacks now live in resume.py and callbacks.py and are imported here
# so `tfface.training.trainer` still offers them.
__all__ = [
    "AtomicModelCheckpoint",
    "BACKUP_METADATA",
    "BACKUP_WEIGHTS",
    "BackupSpaceCheck",
    "MONITOR",
    "RESUMABLE_CHANGES",
    "ResumedEarlyStopping",
    "SPLIT_FILE",
    "TimeBudget",
    "check_backbone_weights",
    "check_mask_supervision",
    "check_resumable",
    "check_run_split",
    "load_sources",
    "make_datasets",
    "pretrain_masks",
    "read_split_record",
    "train",
    "training_labels",
]

log = logging.getLogger(__name__)


def load_sources(data_config):
    """Opens and splits every configured source: (train list, val list)."""
    from tfface.data.sources import open_source
    from tfface.data.splits import split_source

    train, val = [], []
    for source_config in data_config.sources:
        options = {"image_size": data_config.image_size, "skip_bad_rows": source_config.skip_bad_rows}
        if source_config.landmarks:
            options["landmarks_file"] = source_config.landmarks
        source = open_source(source_config.path, **options)
        if data_config.val_fraction <= 0:
            train.append(drop_undecodable_images(source) if source_config.skip_bad_images else source)
            continue
        parts = split_source(source, val_fraction=data_config.val_fraction, seed=data_config.split_seed)
        if source_config.skip_bad_images:
            # Left out after the split, which stays that of a run that stopped at them.
            parts = drop_undecodable_images(source, parts)
        for side in ("train", "val"):
            if len(parts[side]) == 0:
                raise ConfigError(
                    f"{source_config.path}: the split by person (data.val_fraction {data_config.val_fraction:g}) "
                    f"leaves no {side} images of {len(source)}; use more images or another data.val_fraction"
                )
        train.append(parts["train"])
        val.append(parts["val"])
    return train, val


def check_mask_supervision(config: ExperimentConfig, train_sources) -> Optional[list]:
    """How many training images of each source have landmarks, when the
    model learns its masks from them (None otherwise).

    The mask predictor of a mask-guided model is supervised by masks drawn
    from landmarks; without any it would stay untrained and still be used
    (or frozen after a pretraining on nothing). No landmarks at all is an
    error; some images without them is a warning naming the counts.
    """
    model = config.model
    if model.type != "mask_guided" or model.fusion == "global":
        return None
    if model.mask_loss_weight <= 0 and config.train.mask_pretrain_epochs <= 0:
        return None
    coverage = []
    for cfg, source in zip(config.data.sources, train_sources):
        with_landmarks = 0 if source.landmarks is None else int(np.isfinite(source.landmarks).all(axis=(1, 2)).sum())
        coverage.append({"path": str(cfg.path), "train_examples": len(source), "with_landmarks": with_landmarks})
    total = sum(c["train_examples"] for c in coverage)
    found = sum(c["with_landmarks"] for c in coverage)
    counts = "; ".join(f"{c['path']}: {c['with_landmarks']} of {c['train_examples']}" for c in coverage)
    if found == 0:
        raise ConfigError(
            f"the mask-guided model learns its face-part masks from landmarks, and none of the {total} training "
            f"images has any ({counts}): run `tfface data annotate FOLDER` for each source first, or give a "
            "source's landmarks file with landmarks: FILE"
        )
    if found < total:
        log.warning(
            "mask supervision: %d of %d training images have landmarks (%s); the others train without the mask loss",
            found, total, counts,
        )
    return coverage



def training_labels(schema, sources) -> dict:
    """Task name -> labels of every training example (-1 where missing)."""
    parts = [schema.encode_labels(s.format, s.columns, len(s)) for s in sources]
    return {task.name: np.concatenate([p[task.name] for p in parts]) for task in schema}


def _mixed_precision(mode):
    gpu = bool(tf.config.list_physical_devices("GPU"))
    on = mode == "on" or (mode == "auto" and gpu)
    if on and not gpu:
        log.warning("train.mixed_precision is on without a GPU: float16 on a CPU is slower than float32 ('auto' picks)")
    keras.mixed_precision.set_global_policy("mixed_float16" if on else "float32")
    return bool(on)



def make_datasets(config: ExperimentConfig, schema, train_sources, val_sources, seed=None, replicas: int = 1):
    """The training and validation streams of a run; `seed` (default
    `train.seed`) orders and augments the training stream. Over several
    `replicas` the validation stream's last batch is padded (see
    `make_dataset(pad_last_batch=)`)."""
    data = config.data
    with_masks = data.with_masks or config.model.type == "mask_guided"
    weights = [s.weight for s in data.sources] if len(train_sources) > 1 else None
    # One choice for both streams: their caches are held together.
    cache = choose_cache(data.cache, train_sources + val_sources, data.image_size)
    cache = cache if cache != "none" else False
    train_ds = make_dataset(
        train_sources,
        schema,
        data.image_size,
        batch_size=data.batch_size,
        training=True,
        weights=weights,
        augment=data.augment,
        with_masks=with_masks,
        cache=cache,
        steps_per_epoch=config.train.steps_per_epoch,
        seed=config.train.seed if seed is None else seed,
    )
    val_ds = None
    if val_sources:
        val_ds = make_dataset(
            val_sources, schema, data.image_size, batch_size=data.batch_size, with_masks=with_masks, cache=cache,
            pad_last_batch=replicas > 1,
        )
    return train_ds, val_ds


def train(config: ExperimentConfig, verbose="auto") -> dict:
    """Trains (or resumes) the run described by `config`; returns a summary."""
    config.validate()
    # Collective ops (multi-worker) must be configured before any other op.
    strategy = make_strategy(config.train.strategy, config.train.cluster_wait_minutes)
    out = worker_folder(Path(config.train.output_dir), config.train.strategy)
    # Open the data before writing anything, so a bad source leaves an
    # existing run folder as it was.
    schema = get_schema(config.data.schema)
    train_sources, val_sources = load_sources(config.data)
    landmark_coverage = check_mask_supervision(config, train_sources)
    check_backbone_weights(config.model)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out} is a file, not a folder")
    busy = (
        f"{out} is being trained by another process (a tfface train still running); wait for it "
        "to end, or choose another train.output_dir (or --output-dir)"
    )
    # Locked by the chief: a second `tfface train` into the folder is refused
    # instead of resuming the running run and mixing its files with it.
    policy = keras.mixed_precision.global_policy()
    try:
        with claimed_folder(out, busy, lock=is_chief(config.train.strategy)):
            check_resumable(out, config)
            settle_backup(out / "backup")
            return _train_in(out, config, strategy, schema, train_sources, val_sources, landmark_coverage, verbose)
    finally:
        # train.mixed_precision is the run's: layers the caller makes next get the caller's policy.
        keras.mixed_precision.set_global_policy(policy)


def check_backbone_weights(model_config) -> None:
    """A weights file the backbone would load must exist before the run
    writes anything (the network is built only after the data is prepared)."""
    try:
        local_weights_file(model_config.backbone_weights)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def _train_in(out, config, strategy, schema, train_sources, val_sources, landmark_coverage, verbose) -> dict:
    """`train` once its run folder is claimed and checked."""
    config.save(out / "config.yaml")
    write_atomic(out / SPLIT_FILE, json.dumps(split_record(config.data.val_fraction, config.data.split_seed), indent=2))
    resuming = is_resuming(out)
    # A resumed run draws its data order, augmentation and dropout from a
    # seed of its own: with the run's seed it would replay those of epoch 0
    # onwards (its weights come from the backup).
    resumed_at = max(1, backup_epoch(out / "backup" / BACKUP_METADATA) or 0) if resuming else 0
    seed = config.train.seed + resumed_at
    keras.utils.set_random_seed(seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    mixed = _mixed_precision(config.train.mixed_precision)
    train_ds, val_ds = make_datasets(
        config, schema, train_sources, val_sources, seed=seed, replicas=strategy.num_replicas_in_sync
    )
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2

    chief = is_chief(config.train.strategy)
    pretraining_file = out / "mask_pretraining.json"
    with strategy.scope():
        model = build_model(schema, config.model, training_labels(schema, train_sources))
        # A resumed run's backup holds the pretrained predictor already.
        # A corrupt image stops the pretraining as it stops training: named.
        with naming_undecodable_images(train_sources + val_sources):
            mask_pretraining = None if resuming else pretrain_masks(config, model, train_ds, val_ds, verbose)
        optimizer = _optimizer(config, train_ds)
        model.compile(optimizer=optimizer)
        if config.train.strategy == "multi_worker" and len(cluster_members(read_tf_config())) > 1:
            rank_one_logs(model)

    pretrained_seconds = mask_pretraining["seconds"] if mask_pretraining else 0.0
    if chief and mask_pretraining:
        write_atomic(pretraining_file, json.dumps(mask_pretraining, indent=2))
    elif resuming and pretraining_file.is_file():
        mask_pretraining = json.loads(pretraining_file.read_text())  # done by the call that was interrupted
    # Two backups: a kill while the newest is written leaves the one before.
    # Kept until the summary is written: a kill after the last epoch then
    # resumes with nothing left to train instead of training again.
    backup = keras.callbacks.BackupAndRestore(str(out / "backup"), double_checkpoint=True, delete_checkpoint=False)
    history_file = out / "history.csv"
    start_epoch = 0
    if resuming and chief and config.train.strategy != "multi_worker":
        with strategy.scope():  # the optimizer's variables are built here
            start_epoch = restore_backup(backup, model)
            trim_history(history_file, start_epoch)
    elif resuming and chief:
        # Every worker restores its backup in fit, together; the chief's
        # history still loses the rows of epochs its backup had not finished.
        backed_up = backup_epoch(out / "backup" / BACKUP_METADATA)
        if backed_up is not None:
            trim_history(history_file, backed_up)
    # BackupAndRestore brings back weights, optimizer and epoch only; the
    # best score so far and early stopping's count come from the history,
    # so a resumed run neither overwrites a better model.keras nor waits
    # its whole patience again.
    earlier = monitored_history(history_file) if resuming else []
    best_model = out / "model.keras"
    # A model.keras cut short (by a tfface before 0.2.6, which saved it in
    # place) must be rewritten, whatever its score.
    best_so_far = max(earlier) if earlier and zipfile.is_zipfile(best_model) else None
    callbacks = []
    if chief:
        last_model = out / "last.keras"
        for saved in (last_model, best_model):
            discard_leftovers(saved)  # the partial saves of a killed run
        # Before the backup, so every epoch the backup holds is logged and saved.
        callbacks += [
            keras.callbacks.CSVLogger(str(history_file), append=resuming),
            keras.callbacks.TensorBoard(str(out / "logs"), update_freq="epoch"),
            AtomicModelCheckpoint(last_model),
        ]
        if val_ds is not None:
            callbacks.append(AtomicModelCheckpoint(best_model, monitor=MONITOR, initial_value_threshold=best_so_far))
    callbacks += [BackupSpaceCheck(out / "backup"), backup]
    early_stopping = budget = None
    epochs = config.train.epochs
    if config.train.early_stopping_patience > 0 and val_ds is not None:
        if config.train.strategy == "multi_worker":
            # Only the chief keeps the history, and all workers must stop at
            # the same epoch: every worker replays the chief's scores.
            earlier = chief_scores(strategy, earlier, capacity=config.train.epochs)
        early_stopping = ResumedEarlyStopping(earlier, patience=config.train.early_stopping_patience)
        callbacks.append(early_stopping)
        if start_epoch and early_stopping.patience_spent():
            epochs = start_epoch  # it had stopped; the kill came before the summary
    if config.train.time_budget_minutes:
        budget = TimeBudget(config.train.time_budget_minutes, spent_seconds=pretrained_seconds)
        callbacks.append(budget)

    start = time.monotonic()
    with naming_undecodable_images(train_sources + val_sources), closing_files_of_a_failed_write():
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles
        )
    seconds = time.monotonic() - start
    if chief and val_ds is None:
        save_model_atomic(model, out / "model.keras")
    summary = {
        "name": config.name,
        "tfface_version": tfface.__version__,
        "output_dir": str(out),
        "model_path": str(out / "model.keras"),
        # All epochs of the run, also when this call resumed or continued it
        # (`history` and `train_seconds` cover this call only).
        "epochs_run": int(getattr(model, "_initial_epoch", None) or 0) + len(history.history.get("loss", [])),
        "stopped_by": (
            "time_budget" if budget is not None and budget.stopped
            else "early_stopping" if early_stopping is not None and (early_stopping.stopped_epoch > 0 or epochs < config.train.epochs)
            else "epochs"
        ),
        "train_seconds": round(seconds, 1),
        "train_examples": int(sum(len(s) for s in train_sources)),
        # What each configured source was read as: the model card takes the
        # licence terms from the format, not from the folder's name.
        "sources": [
            {
                "path": str(cfg.path), "name": source.name, "format": source.format, "train_examples": len(source),
                "problems": list(source.problems),  # what reading the source skipped
            }
            for cfg, source in zip(config.data.sources, train_sources)
        ],
        "val_examples": int(sum(len(s) for s in val_sources)),
        "mixed_precision": mixed,
        "mask_pretraining": mask_pretraining,
        # Training images per source with landmarks (mask supervision).
        "landmark_coverage": landmark_coverage,
        "parameters": int(model.count_params()),
        "history": _history_json(history),
        "config": dataclasses.asdict(config),
    }
    if chief:
        write_atomic(out / "train_summary.json", json.dumps(summary, indent=2, default=str))
    if not (budget is not None and budget.stopped):
        shutil.rmtree(out / "backup", ignore_errors=True)  # the run is over: the summary says so
    return summary


def pretrain_masks(config: ExperimentConfig, model, train_ds, val_ds, verbose, callbacks=()):
    """MGMTN's stage 1 when `train.mask_pretrain_epochs` asks for it: the mask
    predictor alone on the landmark masks, then frozen unless
    `model.mask_trainable`. Returns its epochs, time and history, or None."""
    epochs = config.train.mask_pretrain_epochs
    if not epochs:
        return None
    from tfface.models.mask_predictor import pretrain_mask_predictor

    log.info("pretraining the mask predictor for %d epoch(s) on the landmark masks", epochs)
    start = time.monotonic()
    history = pretrain_mask_predictor(
        model,
        train_ds,
        epochs=epochs,
        learning_rate=config.train.learning_rate,
        validation_data=val_ds,
        freeze=not config.model.mask_trainable,
        verbose=verbose,
        callbacks=list(callbacks),
    )
    return {
        "epochs": epochs,
        "seconds": round(time.monotonic() - start, 1),
        "frozen": not config.model.mask_trainable,
        "history": _history_json(history),
    }


def _history_json(history) -> dict:
    """Keras history as JSON values: null for NaN (a task no example labels)."""
    return {k: [float(v) if np.isfinite(v) else None for v in vals] for k, vals in history.history.items()}


def _optimizer(config, train_ds):
    train = config.train
    return make_optimizer(train, train.steps_per_epoch or int(train_ds.cardinality().numpy()))
