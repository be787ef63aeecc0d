"""Losses that skip missing labels (-1), so fused datasets can train together.

Each returns the mean over *labelled* entries only, and 0 when a batch has
none (a source that does not label a task contributes nothing to it).
"""

from keras import ops


def masked_binary_crossentropy(labels, logits):
    """labels (B,) in {0, 1, -1}; logits (B,)."""
    labels = ops.reshape(labels, (-1, 1))
    logits = ops.reshape(logits, (-1, 1))
    return masked_binary_crossentropy_columns(labels, logits)[0]


def masked_binary_crossentropy_columns(labels, logits):
    """Per-column means of `masked_binary_crossentropy`: labels and logits
    (B, N), one binary task per column; returns (N,). One op chain for all
    binary tasks: a chain per task made the training step's graph (and its
    trace, ~20 s for 40 attributes) grow with the number of attributes."""
    labels = ops.cast(labels, "float32")
    logits = ops.cast(logits, "float32")
    mask = ops.cast(labels >= 0, "float32")
    safe = ops.where(labels >= 0, labels, 0.0)
    # Stable BCE from logits.
    per_example = ops.maximum(logits, 0.0) - logits * safe + ops.log1p(ops.exp(-ops.abs(logits)))
    return ops.sum(per_example * mask, axis=0) / ops.maximum(ops.sum(mask, axis=0), 1.0)


def masked_sparse_categorical_crossentropy(labels, logits):
    """labels (B,) int class ids or -1; logits (B, C)."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    logits = ops.cast(logits, "float32")
    mask = ops.cast(labels >= 0, "float32")
    safe = ops.maximum(labels, 0)
    log_probs = ops.log_softmax(logits, axis=-1)
    picked = ops.take_along_axis(log_probs, ops.expand_dims(safe, -1), axis=-1)[:, 0]
    return ops.sum(-picked * mask) / ops.maximum(ops.sum(mask), 1.0)


def masked_bce_dice(masks_true, masks_pred, valid, smooth=1.0):
    """Per-pixel BCE + soft Dice for group masks, over examples with `valid`=1.

    masks_true, masks_pred: (B, H, W, G) in [0, 1]; valid: (B,).
    """
    masks_true = ops.cast(masks_true, "float32")
    masks_pred = ops.clip(ops.cast(masks_pred, "float32"), 1e-6, 1.0 - 1e-6)
    valid = ops.cast(ops.reshape(valid, (-1,)), "float32")
    bce = -(masks_true * ops.log(masks_pred) + (1.0 - masks_true) * ops.log(1.0 - masks_pred))
    bce = ops.mean(bce, axis=(1, 2, 3))
    intersection = ops.sum(masks_true * masks_pred, axis=(1, 2))
    union = ops.sum(masks_true, axis=(1, 2)) + ops.sum(masks_pred, axis=(1, 2))
    dice = 1.0 - ops.mean((2.0 * intersection + smooth) / (union + smooth), axis=-1)
    return ops.sum((bce + dice) * valid) / ops.maximum(ops.sum(valid), 1.0)
