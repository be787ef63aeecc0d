"""What a search leaves for a person to read and train from.

The oracle's trials become plain records, and the records become the
files read after a search: best_config.yaml (ready for `tfface train`),
summary.md, objective.png and results.json. Kept apart from the search so
that they depend only on the records, not on a running tuner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Optional

from tfface.atomic_files import atomic_path
from tfface.atomic_files import write_atomic
from tfface.config import ExperimentConfig
from tfface.tuning.config import OBJECTIVE
from tfface.tuning.config import TuningConfig
from tfface.tuning.config import TuningError
from tfface.tuning.search_space import SearchSpace

log = logging.getLogger(__name__)


def trial_records(oracle, space: SearchSpace, cut_by_budget: Optional[dict] = None) -> list[dict]:
    """One plain dict per trial, in trial order; `cut_by_budget` ({trial id:
    epochs trained}) marks the trials the time budget ended early."""
    cut_by_budget = cut_by_budget or {}
    records = []
    for trial_id, trial in sorted(oracle.trials.items(), key=lambda kv: int(kv[0])):
        hp = trial.hyperparameters
        values = {}
        for name in space.names:
            if name in hp.values and hp.is_active(name):
                values[name] = _plain(hp.values[name])
        score = trial.score
        if score is not None and (isinstance(score, float) and math.isnan(score)):
            score = None
        record = {
            "trial_id": str(trial_id),
            "status": str(trial.status),
            "score": None if score is None else float(score),
            "values": values,
            "message": trial.message or None,
        }
        if "tuner/epochs" in hp.values:
            record["epochs"] = int(hp.values["tuner/epochs"])
        if str(trial_id) in cut_by_budget:
            record["cut_by_budget_after_epochs"] = int(cut_by_budget[str(trial_id)])
        records.append(record)
    return records


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def _first_error(message: str) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no message)"


def write_results(project_dir: Path, tuning: TuningConfig, base: ExperimentConfig, space: SearchSpace,
                  records: list[dict], stopped_by_budget: bool = False) -> dict:
    """Writes summary.md, objective.png, results.json and best_config.yaml;
    raises TuningError when no trial completed. A best_config.yaml edited
    since the search wrote it is kept: the new one goes beside it."""
    project_dir.mkdir(parents=True, exist_ok=True)
    completed = [r for r in records if r["status"] == "COMPLETED" and r["score"] is not None]
    full = [r for r in completed if "cut_by_budget_after_epochs" not in r]
    best = max(full, key=lambda r: r["score"]) if full else None
    paths = {
        "summary": str(project_dir / "summary.md"),
        "plot": str(project_dir / "objective.png"),
        "results": str(project_dir / "results.json"),
        "best_config": None,
    }
    written_hash = None
    if best is not None:
        best_config = space.apply(base, best["values"])
        best_config.name = f"{base.name}_tuned"
        best_config.train.output_dir = f"runs/{tuning.project}_best"
        paths["best_config"] = str(_best_config_path(project_dir, Path(paths["results"])))
        written_hash = write_best_config(best_config, paths["best_config"], tuning, best, len(records))
    best_file = Path(paths["best_config"]).name if paths["best_config"] else None
    write_atomic(paths["summary"], summary_markdown(tuning, space, records, best, stopped_by_budget, best_file))
    plot_objective(records, paths["plot"], title=f"{tuning.project}: {OBJECTIVE} per trial")
    results = {
        "project": tuning.project,
        "tuner": tuning.tuner,
        "objective": {"name": OBJECTIVE, "direction": "max"},
        "search_space": space.source,
        "stopped_by_budget": bool(stopped_by_budget),
        "trials": records,
        "best": best,
        **paths,
        "best_config_sha256": written_hash,
    }
    write_atomic(paths["results"], json.dumps(results, indent=2, default=str))
    if not records:
        raise TuningError(f"search {tuning.project}: no trial ran (see {project_dir})")
    if best is None and completed:
        raise TuningError(
            f"search {tuning.project}: the time budget ended all {len(completed)} completed trial(s) before their "
            f"last epoch, so none is comparable enough to call best; run it again with a larger "
            f"time_budget_minutes (see {paths['summary']})"
        )
    if best is None:
        first = records[0]
        raise TuningError(
            f"search {tuning.project}: all {len(records)} trials failed; first error "
            f"(trial {first['trial_id']}, {first['status']}):\n{first['message'] or '(no message)'}"
        )
    failed = [r for r in records if r["status"] != "COMPLETED"]
    if failed:
        log.warning("%d of %d trials did not complete; see %s", len(failed), len(records), paths["summary"])
    return {"trials": records, "best": best, **paths}


def _best_config_path(project_dir: Path, results_file: Path) -> Path:
    """best_config.yaml, unless the user edited it since the search wrote it
    (its hash differs from the one results.json recorded): then the new one
    goes to best_config.new.yaml and the edited file is kept."""
    path = project_dir / "best_config.yaml"
    if not path.is_file():
        return path
    try:
        recorded = json.loads(results_file.read_text()).get("best_config_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded is None or hashlib.sha256(path.read_bytes()).hexdigest() == recorded:
        return path
    log.warning("%s was changed since the search wrote it: kept it; the best config goes to best_config.new.yaml", path)
    return project_dir / "best_config.new.yaml"


def write_best_config(config: ExperimentConfig, path, tuning: TuningConfig, best: dict, num_trials: int) -> str:
    """Writes the config; returns the SHA-256 of what it wrote."""
    import yaml

    from tfface.config import _plain as plain_config

    header = (
        f"# Best of {num_trials} trials of tuning project '{tuning.project}' ({tuning.tuner} search):\n"
        f"# trial {best['trial_id']}, {OBJECTIVE} = {best['score']:.4f}.\n"
        f"# Train it: tfface train --config {path}\n"
    )
    body = yaml.safe_dump(plain_config(config.to_dict()), sort_keys=False)
    text = header + body
    write_atomic(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _format(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_markdown(
    tuning: TuningConfig, space: SearchSpace, records: list[dict], best: Optional[dict], stopped_by_budget=False,
    best_file="best_config.yaml",
) -> str:
    """Markdown: the search, its best trial, and a table of every trial."""
    statuses = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    lines = [
        f"# Tuning results: {tuning.project}",
        "",
        f"- tuner: {tuning.tuner}; objective: {OBJECTIVE} (max)",
        f"- trials: {len(records)} ({', '.join(f'{n} {s.lower()}' for s, n in sorted(statuses.items())) or 'none'})",
    ]
    if stopped_by_budget:
        lines.append(f"- the time budget ({tuning.time_budget_minutes:g} min) stopped this run of the search")
    cut = [r for r in records if "cut_by_budget_after_epochs" in r]
    if cut:
        lines.append(
            f"- {len(cut)} trial(s) cut short by the time budget (status `completed, cut`): "
            "scored on fewer epochs, so never the best"
        )
    if best is not None:
        lines.append(f"- best: trial {best['trial_id']}, {OBJECTIVE} = {best['score']:.4f} -> {best_file}")
    lines += ["", "## Trials", ""]
    names = space.names
    with_epochs = any("epochs" in r for r in records)
    header = ["trial", "status", OBJECTIVE] + (["epochs"] if with_epochs else []) + names
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" if h in (OBJECTIVE, "epochs") else "---" for h in header) + "|")
    for r in records:
        status = r["status"].lower()
        if "cut_by_budget_after_epochs" in r:
            status += f", cut after {r['cut_by_budget_after_epochs']} epoch(s)"
        row = [r["trial_id"], status, _format(r["score"])]
        if with_epochs:
            row.append(_format(r.get("epochs")))
        row += [_format(r["values"].get(n)) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    failed = [r for r in records if r["status"] != "COMPLETED" and r["message"]]
    if failed:
        lines += ["", "## Errors", ""]
        lines += [f"- trial {r['trial_id']}: `{_first_error(r['message'])}`" for r in failed]
    lines += ["", "## Search space", "", space.to_markdown(), ""]
    return "\n".join(lines)


def plot_objective(records: list[dict], path, title: str) -> None:
    """PNG of the objective against trial number, with the best so far."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    done = [(int(r["trial_id"]), r["score"]) for r in records if r["score"] is not None]
    failed = [int(r["trial_id"]) for r in records if r["score"] is None]
    if done:
        xs, ys = zip(*done)
        axes.plot(xs, ys, "o", label="trial")
        best, running = [], -math.inf
        for y in ys:
            running = max(running, y)
            best.append(running)
        axes.step(xs, best, where="post", label="best so far")
    if failed:
        floor = min((y for _, y in done), default=0.0)
        axes.plot(failed, [floor] * len(failed), "x", color="red", label="failed")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trial")
    axes.set_ylabel(OBJECTIVE)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if done or failed:
        axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
