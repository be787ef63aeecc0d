"""The main job, end to end on the embedded synthetic faces (no download).

generate data -> train the gated model -> evaluate (prints metrics) ->
export a SavedModel -> start the local gRPC server -> query it with a few
images -> print the per-face results -> stop the server.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tfface.data.image_ops import encode_png


def _remove_earlier_demo_run(run_dir: Path) -> None:
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    import yaml

    config = run_dir / "config.yaml"
    try:
        is_demo = yaml.safe_load(config.read_text()).get("name") == "demo"
    except (OSError, AttributeError, yaml.YAMLError):
        is_demo = False
    if not is_demo:
        raise FileExistsError(f"{run_dir} exists and is not an earlier demo's run; choose another --workdir")
    shutil.rmtree(run_dir)


def _against_ground_truth(results, schema, faces) -> str:
    """Per queried face: how many of its labelled tasks the answer gets
    right, naming the ones it gets wrong (the weakest attributes of a short
    demo run, as the evaluation lists them)."""
    labels = schema.encode_labels(faces.format, faces.columns, len(faces))
    lines = ["      against the ground truth:"]
    for i, result in enumerate(results):
        known = [task for task in schema if task.name in result and labels[task.name][i] >= 0]
        wrong = [
            f"{task.name} (true: {task.classes[int(labels[task.name][i])]})"
            for task in known
            if result[task.name]["label"] != task.classes[int(labels[task.name][i])]
        ]
        line = f"      face {i}: {len(known) - len(wrong)} of {len(known)} tasks right"
        lines.append(line + (f"; wrong: {', '.join(wrong)}" if wrong else ""))
    return "\n".join(lines)


def run_demo(workdir="runs/demo", num_images=4000, epochs=12, image_size=64, query_count=4) -> dict:
    from tfface.config import DataConfig
    from tfface.config import ExperimentConfig
    from tfface.config import ModelConfig
    from tfface.config import SourceConfig
    from tfface.config import TrainConfig
    from tfface.data.synthetic import generate_synthetic_faces
    from tfface.evaluation.evaluate import evaluate_model
    from tfface.evaluation.evaluate import print_metrics
    from tfface.export.saved_model import export_saved_model
    from tfface.serving.client import ServingClient
    from tfface.serving.client import format_results
    from tfface.serving.server import LocalModelServer
    from tfface.models.saving import load_model
    from tfface.training.trainer import train

    workdir = Path(workdir)
    timings = {}
    start = time.monotonic()

    print(f"[1/6] training a gated multi-task model on {num_images} synthetic faces ({epochs} epochs)")
    config = ExperimentConfig(
        name="demo",
        data=DataConfig(
            sources=[SourceConfig(f"synthetic:{num_images}")],
            schema="synthetic",
            image_size=image_size,
            batch_size=32,
        ),
        model=ModelConfig(image_size=image_size, gate="static", embedding_dim=64),
        train=TrainConfig(epochs=epochs, learning_rate=3e-3, output_dir=str(workdir / "train")),
    )
    # A new demo (perhaps with other --epochs) replaces an earlier demo's
    # run instead of being refused as a different config; anything else in
    # that folder is left alone.
    _remove_earlier_demo_run(Path(config.train.output_dir))
    summary = train(config, verbose=2)
    timings["train_s"] = summary["train_seconds"]

    print("[2/6] evaluating on held-out synthetic faces (a different seed)")
    held_out = generate_synthetic_faces(500, image_size=image_size, seed=12345)
    metrics = evaluate_model(summary["model_path"], [held_out], workdir / "eval")
    print_metrics(metrics)

    print("[3/6] exporting a SavedModel for TF Serving")
    model = load_model(summary["model_path"])
    export_path = export_saved_model(model, workdir / "saved_models", "tfface_demo")
    print(f"      {export_path}")

    print("[4/6] starting the local gRPC server (TF Serving API) on 127.0.0.1")
    server = LocalModelServer(export_path.parent, host="127.0.0.1", port=0)
    port = server.start()
    try:
        print(f"[5/6] querying {query_count} faces over gRPC at 127.0.0.1:{port}")
        client = ServingClient(f"127.0.0.1:{port}", model_name="tfface_demo", timeout_s=30.0)
        images = [encode_png(held_out.images[i]) for i in range(query_count)]
        results = client.predict(images)
        print("[6/6] per-face results")
        print(format_results(results, names=[f"face {i}" for i in range(query_count)]))
        print(_against_ground_truth(results, model.schema, held_out))
    finally:
        server.stop()
        print("      server stopped")
    timings["total_s"] = round(time.monotonic() - start, 1)
    print(f"done in {timings['total_s']} s")
    return {"metrics": metrics, "export_path": str(export_path), "results": results, "timings": timings}
