"""``python -m llm2clip.summary``: what the last local pipeline run made, and where.

Reads ``dvc.yaml`` (as plain YAML) for each stage's outputs and their ``manifest.json``; prints
paths, headline numbers, the registered model (once the register stage exists) and how to open
the MLflow UI. This is the last thing ``make run`` prints.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

HEADLINES = ("counts", "metrics", "cra_before", "cra_after", "model_uri", "alias")


def _describe(manifest: dict) -> str:
    parts = []
    for key in HEADLINES:
        if key in manifest:
            value = manifest[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, dict))
            parts.append(f"{key}: {value}")
    return "; ".join(parts)


def _outputs(stages: dict, repo: Path) -> list[tuple[str, str]]:
    """``(stage, out path)`` in dvc.yaml order; a ``foreach`` stage once per eval set of params.yaml."""
    params = repo / "params.yaml"
    eval_sets = list((yaml.safe_load(params.read_text()) or {}).get("eval_data") or {}) if params.is_file() else []
    found = []
    for name, stage in stages.items():
        if "foreach" in stage:
            found += [(f"{name}@{key}", str(out).replace("${key}", key))
                      for key in eval_sets for out in stage["do"].get("outs", [])]
        else:
            found += [(name, out if isinstance(out, str) else next(iter(out))) for out in stage.get("outs", [])]
    return found


def paper_table_lines(table: dict) -> list[str]:
    """``paper_table.json`` (evaluate) as aligned text: one row per model, the paper's columns."""
    columns = table.get("columns", [])
    if not columns:
        return ["  (no eval set fills a column)"]
    header = ["model", *(c["title"] for c in columns)]
    rows = [[r["name"], *("-" if r["values"].get(c["key"]) is None else f"{r['values'][c['key']]:.1f}"
                          for c in columns)] for r in table.get("rows", [])]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    def line(row: list[str]) -> str:
        return "  " + "  ".join(cell.rjust(w) if i else cell.ljust(w)
                                for i, (cell, w) in enumerate(zip(row, widths, strict=True)))

    return [line(row) for row in [header, *rows]]


def summary_lines(repo: Path) -> list[str]:
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    lines = ["", "llm2clip pipeline outputs:"]
    # dvc.yaml lists the stages in pipeline order (tests/kfp/test_parity.py)
    for name, out in _outputs(stages, repo):
        path = repo / out
        manifest_path = path / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            lines.append(f"  {name:<28} {path.relative_to(repo)}/  {_describe(manifest)}")
        else:
            lines.append(f"  {name:<28} {path.relative_to(repo)}/  (not produced yet)")
    registration = repo / "models" / "registration" / "registration.json"
    if registration.is_file():
        reg = json.loads(registration.read_text())
        lines += ["", f"Registered model: {reg['model_uri']} (aliases: {', '.join(reg['aliases']) or 'none'})",
                  f"  champion: {reg['champion_uri']}  ({reg.get('reason', '')})"]
    report = repo / "reports" / "eval" / "manifest.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        lines += [f"Metrics: {rep['primary_metric']} = {rep['primary']:.4f} "
                  f"(gate {'passed' if rep['gate_passed'] else 'FAILED'}); all: reports/eval/metrics.json, "
                  "report: reports/eval/report.html"]
    table = repo / "reports" / "eval" / "paper_table.json"
    if table.is_file():
        lines += ["", "In the paper's layout (R@1 / top-1, percent; notes in reports/eval/report.md):",
                  *paper_table_lines(json.loads(table.read_text()))]
    uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    lines += [
        "",
        f"MLflow runs: {uri}",
        f"  open the UI: .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000",
        "  then browse http://127.0.0.1:5000",
    ]
    return lines


def main() -> int:
    repo = Path.cwd()
    if not (repo / "dvc.yaml").is_file():
        sys.stderr.write("run this from the repository root (where dvc.yaml is)\n")
        return 2
    sys.stdout.write("\n".join(summary_lines(repo)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
