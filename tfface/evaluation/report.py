"""`report.md`: the evaluation as a short Markdown page.

Built only from the metrics dict that `evaluate_model` saves as
`metrics.json`, so a report can be regenerated from that file alone.
"""

from __future__ import annotations

PLOT_TITLES = {
    "accuracy.png": "Per-task accuracy and balanced accuracy",
    "group_masks.png": "Predicted group masks",
}


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header, rows) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _plot_title(name: str) -> str:
    if name in PLOT_TITLES:
        return PLOT_TITLES[name]
    if name.startswith("confusion_"):
        return f"Confusion matrix: {name[len('confusion_'):-len('.png')]}"
    if name.startswith("subgroups_"):
        return f"Balanced accuracy by {name[len('subgroups_'):-len('.png')].replace('_', ' ')}"
    return name


def markdown_report(metrics: dict) -> str:
    """The report text for `evaluate_model`'s metrics dict."""
    lines = ["# tfface evaluation", ""]
    model = metrics.get("model") or {}
    if model:
        where = f"`{model['path']}`" if model.get("path") else "in-memory model"
        lines.append(
            f"- **Model:** {where} ({model.get('type')}, backbone {model.get('backbone')}, "
            f"schema `{model.get('schema')}`, {model.get('image_size')} px)"
        )
    data = metrics.get("data") or []
    if data:
        described = ", ".join(
            f"{d['name']} ({d['format']}, {d['n_images']} images"
            + (f", {d['split']} split" if d.get("split") else "")
            + ")"
            for d in data
        )
        lines.append(f"- **Data:** {described}")
    # What reading the data skipped (bad rows, images that do not decode):
    # the scores are of the rest.
    lines += [f"- **Reading {d['name']}:** {problem}" for d in data for problem in d.get("problems") or []]
    lines.append(f"- **Images evaluated:** {metrics.get('n_images', 0)}")
    limit = limit_line(metrics.get("limit"))
    if limit:
        lines.append(f"- **Limit:** {limit}")
    lines += ["", "## Headline", ""]
    headline = [
        ("mean accuracy (binary tasks)", metrics.get("mean_accuracy")),
        ("mean balanced accuracy (binary tasks)", metrics.get("mean_balanced_accuracy")),
        ("binary tasks labelled", metrics.get("n_binary_tasks")),
    ]
    for key, label in (
        ("gender_accuracy", "gender accuracy"),
        ("age_group_exact", "age group exact"),
        ("age_group_one_off", "age group one-off"),
        ("race_accuracy", "race accuracy"),
    ):
        if key in metrics:
            headline.append((label, metrics[key]))
    lines += _table(["metric", "value"], [(k, _fmt(v)) for k, v in headline])

    per_source = metrics.get("per_source")
    if per_source:
        lines += ["", "### By source", ""]
        lines += _table(
            ["source", "images", "mean accuracy", "mean balanced accuracy"],
            [
                (name, m.get("n_images"), _fmt(m.get("mean_accuracy")), _fmt(m.get("mean_balanced_accuracy")))
                for name, m in per_source.items()
            ],
        )

    lines += ["", "## Per task", ""]
    rows = []
    for name, s in (metrics.get("tasks") or {}).items():
        binary = s.get("kind") == "binary"
        rows.append(
            (
                name,
                s.get("kind"),
                s.get("n_labelled"),
                s.get("positives", "–") if binary else "–",
                _fmt(s.get("accuracy")),
                _fmt(s.get("balanced_accuracy")),
                _fmt(s.get("threshold"), 2) if binary else "–",
                f"one-off {_fmt(s['one_off'])}" if "one_off" in s else "",
            )
        )
    lines += _table(
        ["task", "kind", "labelled", "positives", "accuracy", "balanced accuracy", "threshold", "note"], rows
    )

    subgroups = metrics.get("subgroups") or []
    if subgroups:
        lines += [
            "",
            "## Subgroups",
            "",
            "Balanced accuracy (labelled examples) of each binary attribute per subgroup, "
            "split by the true labels.",
        ]
        for by in dict.fromkeys(r["by"] for r in subgroups):
            part = [r for r in subgroups if r["by"] == by]
            groups = list(dict.fromkeys(r["subgroup"] for r in part))
            cells = {(r["attribute"], r["subgroup"]): r for r in part}
            rows = []
            for attribute in dict.fromkeys(r["attribute"] for r in part):
                row = [attribute]
                for g in groups:
                    r = cells.get((attribute, g))
                    row.append(f"{_fmt(r['balanced_accuracy'])} ({r['n']})" if r else "–")
                rows.append(row)
            lines += ["", f"### By {by.replace('_', ' ')}", ""]
            lines += _table(["attribute"] + groups, rows)

    plots = metrics.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""]
        for name in plots:
            lines += [f"![{_plot_title(name)}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def limit_line(limit) -> str | None:
    """What an evaluation with `--limit` scored, in words; None without one."""
    if not limit:
        return None
    if not limit["applied"]:
        return f"all {limit['n_images_available']} images scored (limit {limit['requested']} is not below that)"
    return (
        f"{limit['n_images_scored']} of {limit['n_images_available']} images scored (limit {limit['requested']}), "
        f"a fixed subset: {limit['chosen_by']}, seed {limit['seed']}"
    )
