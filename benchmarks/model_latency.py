"""Inference latency of the full multi-task models against the bare backbone.

One forward pass serves every task, so the full model should cost little
more than its backbone: targets at batch 32 are gated <= 1.05x and
mask-guided <= 1.6x the backbone's time, measured in one run. Variants are
timed in interleaved rounds; each ratio comes with a 95% interval from
resampling the rounds, so a pass or a miss is told apart from noise.

Run: python benchmarks/model_latency.py [--image-size 64] [--batch 32]
Runs under any Keras backend (KERAS_BACKEND=jax for the GPU machine).
"""

import argparse

import numpy as np
from common import parse_args
from common import positive_int
from common import positive_ints
from common import print_table
from common import run
from common import time_call
from common import write_results


def tf_function(model):
    """The model's forward pass, compiled (tf.function, jax.jit), without
    Keras's per-call predict overhead."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: model(x, training=False))
        return lambda x: _block(fn(x))
    if keras.backend.backend() == "jax":
        # Eager JAX runs layer by layer: that would time Python dispatch
        # (more layers, more time), not the model. One compiled call instead.
        import jax

        jitted = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]
        return lambda x: _block(jitted(trainable, frozen, x))
    return lambda x: _block(model(x, training=False))


def _block(outputs):
    """Waits for the result (asynchronous backends) by reading one value."""
    import keras

    first = outputs if not isinstance(outputs, dict) else next(iter(outputs.values()))
    keras.ops.convert_to_numpy(first)
    return outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=30, help="interleaved rounds; every variant runs once per round")
    parser.add_argument("--bootstrap", type=positive_int, default=2000, help="resamples of the rounds for the ratios' 95%% intervals")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--schema", default="fused")
    parser.add_argument(
        "--embedding-dim", type=positive_int, default=64, help="per-task embedding of the gated variants (64 in configs/)"
    )
    parser.add_argument(
        "--extra-embedding-dims", type=positive_ints, default=[], help="comma list: full gated model again at these embedding sizes"
    )
    parser.add_argument(
        "--gate-bottlenecks", type=positive_ints, default=[], help="comma list: full gated model again, gating a bottleneck of this width"
    )
    args = parse_args(parser)

    import keras

    from tfface.config import ModelConfig
    from tfface.models.backbones import build_backbone
    from tfface.schema import get_schema
    from tfface.models.build import build_model

    schema = get_schema(args.schema)
    images = np.random.default_rng(0).uniform(0, 255, (args.batch, args.image_size, args.image_size, 3)).astype("float32")
    variants = {
        "backbone only": None,
        "gated, no gate": dict(type="gated", gate="none", correlation=False),
        "gated, static gate": dict(type="gated", gate="static", correlation=False),
        "gated, input-conditioned gate": dict(type="gated", gate="input_conditioned", correlation=False),
        "gated, static + correlation (full)": dict(type="gated", gate="static", correlation=True),
        "gated, mixture of 4 experts + correlation (full)": dict(
            type="gated", gate="mixture_of_experts", num_experts=4, correlation=True
        ),
        "gated, mixture of 8 experts + correlation (full)": dict(
            type="gated", gate="mixture_of_experts", num_experts=8, correlation=True
        ),
        "mask-guided, group-global (full)": dict(type="mask_guided", fusion="group_global"),
    }
    for dim in args.extra_embedding_dims:
        variants[f"gated, full, embedding {dim}"] = dict(type="gated", gate="static", correlation=True, embedding_dim=dim)
    for width in args.gate_bottlenecks:
        variants[f"gated, full, gate bottleneck {width}"] = dict(
            type="gated", gate="static", correlation=True, gate_bottleneck=width
        )
    # Build every variant first, then time them in interleaved rounds so a
    # change in machine load hits all variants alike.
    built = {}
    rows = []
    for label, overrides in variants.items():
        overrides_with_dim = {"embedding_dim": args.embedding_dim, **(overrides or {})}
        config = ModelConfig(image_size=args.image_size, backbone=args.backbone, **overrides_with_dim)
        try:
            model = build_backbone(config) if overrides is None else build_model(schema, config)
        except ImportError as e:
            rows.append({"model": label, "error": str(e)})
            continue
        inputs = images if overrides is None else {"image": images}
        call = tf_function(model)
        for _ in range(3):
            call(inputs)  # trace and warm up
        built[label] = (model, call, inputs)
    samples = {label: [] for label in built}
    labels = list(built)
    for round_index in range(args.repeats):
        # Alternate the order so no variant always runs right after another.
        for label in labels if round_index % 2 == 0 else labels[::-1]:
            _, call, inputs = built[label]
            samples[label].append(time_call(lambda: call(inputs), repeats=1, warmup=0)["median_s"])
    times = {label: np.asarray(samples[label]) for label in built}
    base_label = labels[0]
    # Resample whole rounds (paired: one round times every variant) for a
    # 95% interval of each ratio of medians.
    rng = np.random.default_rng(0)
    rounds = rng.integers(0, args.repeats, (args.bootstrap, args.repeats))
    base_medians = np.median(times[base_label][rounds], axis=1)
    for label, (model, _, _) in built.items():
        ratios = np.median(times[label][rounds], axis=1) / base_medians
        low, high = np.percentile(ratios, [2.5, 97.5])
        rows.append({
            "model": label, "params": model.count_params(), "median_ms": float(np.median(times[label])) * 1000,
            "vs_backbone": float(np.median(times[label]) / np.median(times[base_label])),
            "ci95_low": float(low), "ci95_high": float(high),
        })
    print(
        f"backend {keras.backend.backend()}; {args.backbone} at {args.image_size}px; batch {args.batch}; "
        f"{len(schema)} tasks; embedding {args.embedding_dim}"
    )
    print_table(rows, ["model", "params", "median_ms", "vs_backbone", "ci95_low", "ci95_high", "error"])
    suffix = "" if args.backbone == "small_cnn" else f"_{args.backbone}"
    write_results(
        f"model_latency_{keras.backend.backend()}_{args.image_size}{suffix}",
        {"image_size": args.image_size, "batch": args.batch, "backbone": args.backbone,
         "embedding_dim": args.embedding_dim, "repeats": args.repeats, "bootstrap": args.bootstrap, "rows": rows,
         "targets": {"gated": 1.05, "mask_guided": 1.6}},
    )


if __name__ == "__main__":
    run(main)
