"""The optimizer and learning-rate schedule of a training run.

Apart from the trainer so that code without TensorFlow (training under JAX
on a machine without it: benchmarks/capacity_jax.py) builds the same one.
"""

import keras


def make_optimizer(train, steps_per_epoch: int):
    """`train.optimizer` (a `TrainConfig`) with a warm-up then cosine decay
    over `train.epochs` epochs of `steps_per_epoch` steps."""
    steps = max(1, steps_per_epoch)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=train.learning_rate if train.warmup_epochs <= 0 else 0.0,
        decay_steps=max(1, train.epochs * steps),
        warmup_target=train.learning_rate if train.warmup_epochs > 0 else None,
        warmup_steps=int(train.warmup_epochs * steps),
        alpha=0.05,
    )
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=schedule)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
