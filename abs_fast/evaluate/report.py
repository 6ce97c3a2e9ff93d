"""`abs-fast report`: one self-contained HTML page (plus markdown) from saved results.

It reads what the other commands wrote (metrics.jsonl and config.json of training runs, eval.json,
crossplay.json, exploit.json) and never runs a model. Figures are rendered from the JSON and
embedded as data: URIs, so the page can be mailed or archived as one file. Every number cell names
the JSON value it came from (data-source="FILE#path"), so a reader can trace it back.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from abs_fast.evaluate.crossplay import CROSSPLAY_METRICS, plot_crossplay
from abs_fast.evaluate.evaluation import metric_order, metric_title
from abs_fast.evaluate.exploit import plot_exploit
from abs_fast.evaluate.tables import fmt, markdown_table
from abs_fast.io import RunDirectory, atomic_write_bytes, atomic_write_text, read_json

__all__ = ["build_report", "find_results"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d1d1f; background: #ffffff; padding: 0 1em; }
h1 { border-bottom: 2px solid #c0392b; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #7b241c; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4ecec; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
p.note { color: #555; font-size: 13px; }
"""

# training metrics shown in the "final step" table, in this order
_TRAINING_KEYS = (
    "reward/attacker", "reward/defender", "attack_success", "refusal_rate/harmful_prompt",
    "refusal_rate/benign_prompt", "collapse/refusal_benign_seeds", "collapse/refusal_attacker_prompts",
    "collapse/role_kl", "diversity/cosine", "diversity/self_bleu", "format_violation/attacker",
    "format_violation/defender", "kl/attacker", "kl/defender",
)


@dataclass
class _Results:
    """What one path on the command line holds."""

    path: Path
    run_config: dict | None = None
    metrics: Path | None = None
    evals: list[Path] = field(default_factory=list)
    crossplay: Path | None = None
    exploit: Path | None = None


def find_results(path: str | Path) -> _Results:
    """The result files in a run directory or a results directory (and its eval*/, crossplay/,
    exploit/ subdirectories)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a run or results directory)")
    found = _Results(path)
    if (path / "config.json").is_file() and (path / "metrics.jsonl").is_file():
        found.run_config = read_json(path / "config.json", "run config")
        found.metrics = path / "metrics.jsonl"
    for candidate in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        if (candidate / "eval.json").is_file():
            found.evals.append(candidate / "eval.json")
        if found.crossplay is None and (candidate / "crossplay.json").is_file():
            found.crossplay = candidate / "crossplay.json"
        if found.exploit is None and (candidate / "exploit.json").is_file():
            found.exploit = candidate / "exploit.json"
    if not (found.metrics or found.evals or found.crossplay or found.exploit):
        raise FileNotFoundError(f"{path}: no results (metrics.jsonl, eval.json, crossplay.json or exploit.json, in it "
                                "or in a subdirectory)")
    return found


class _Document:
    """Builds the HTML page and the markdown side by side."""

    def __init__(self, title: str, figures_dir: Path):
        self.html = [f"<h1>{html.escape(title)}</h1>"]
        self.md = [f"# {title}", ""]
        self.figures_dir = figures_dir
        self.figure_count = 0

    def heading(self, text: str, level: int = 2) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md += ["#" * level + " " + text, ""]

    def paragraph(self, text: str, note: bool = False) -> None:
        self.html.append(f"<p{' class=note' if note else ''}>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, headers: list[str], rows: list[list], table_id: str = "") -> None:
        """rows: cells, each a plain string or (number, "FILE#json.path")."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = []
        for row in rows:
            cells = []
            for cell in row:
                if isinstance(cell, tuple):
                    value, source = cell
                    cells.append(f'<td class="num" data-source="{html.escape(source)}">{html.escape(fmt(value))}</td>')
                else:
                    cells.append(f"<td>{html.escape(str(cell))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        ident = f' id="{html.escape(table_id)}"' if table_id else ""
        self.html.append(f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        md_rows = [[fmt(c[0]) if isinstance(c, tuple) else str(c) for c in row] for row in rows]
        self.md += [markdown_table(headers, md_rows), ""]

    def figure(self, png: bytes, alt: str, image_id: str) -> None:
        self.figure_count += 1
        name = f"figure_{self.figure_count:02d}_{image_id}.png"
        atomic_write_bytes(self.figures_dir / name, png)
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<img id="{html.escape(image_id)}" alt="{html.escape(alt)}" '
                         f'src="data:image/png;base64,{data}">')
        self.md += [f"![{alt}]({self.figures_dir.name}/{name})", ""]

    def render_html(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.md[0][2:])}</title><style>{_CSS}</style></head><body>\n"
                + "\n".join(self.html) + "\n</body></html>\n")


def _training_section(doc: _Document, found: _Results, label: str) -> None:
    from abs_fast.train.metrics import read_metrics, render_metrics_png

    config = found.run_config or {}
    records = read_metrics(found.metrics)
    source = str(found.metrics)
    doc.heading(f"Training: {label}")
    doc.paragraph(f"mode {config.get('mode')}, model {config.get('model')}, algorithm {config.get('algorithm')}, "
                  f"judge {config.get('judge')}, {len(records)} of {config.get('steps')} steps recorded.")
    if not records:
        doc.paragraph("No steps recorded yet.", note=True)
        return
    doc.figure(render_metrics_png(records), f"training curves of {label}", f"curves-{_slug(label)}")
    last = records[-1]
    index = len(records) - 1
    rows = []
    for key in _TRAINING_KEYS:  # the newest value of each (diagnostics are logged every N steps)
        at = next((i for i in range(index, -1, -1) if _finite(records[i].get(key))), None)
        if at is not None:
            rows.append([key, str(records[at]["step"]), (records[at][key], f"{source}#{at}.{key}")])
    doc.heading("Headline metrics (newest step that logged each)", 3)
    doc.table(["metric", "step", "value"], rows, table_id=f"training-{_slug(label)}")
    outcomes = [[key.split("/", 1)[1], (last[key], f"{source}#{index}.{key}")] for key in sorted(last)
                if key.startswith("outcome/")]
    if outcomes:
        doc.heading(f"Outcome rates at step {last['step']}", 3)
        doc.table(["outcome", "rate"], outcomes, table_id=f"outcomes-{_slug(label)}")


def _eval_section(doc: _Document, path: Path) -> None:
    results = read_json(path, "results file")
    doc.heading(f"Evaluation: {results.get('policy', path.parent.name)}")
    doc.paragraph(f"defender adapter {results.get('defender') or 'none (base model)'}, judge "
                  f"{results.get('judge', 'n/a')}, from {path}.", note=True)
    for name, suite in results["suites"].items():
        rows = []
        for metric in metric_order(suite):
            rate = suite["metrics"][metric]
            where = f"{path}#suites.{name}.metrics.{metric}"
            rows.append([metric_title(metric), (rate["value"], f"{where}.value"), f"{rate['count']}/{rate['total']}",
                         (rate["ci95"][0], f"{where}.ci95.0"), (rate["ci95"][1], f"{where}.ci95.1")])
        doc.heading(f"{name} ({suite['kind']}, {suite['n']} prompts)", 3)
        doc.table(["metric", "value", "count", "95% CI low", "95% CI high"], rows, table_id=f"eval-{_slug(name)}")
    probe = results.get("attacker_probe")
    if probe:
        where = f"{path}#attacker_probe"
        doc.heading(f"Attack diversity and collapse probe ({probe['n']} seeds)", 3)
        doc.table(["metric", "value"], [
            ["MiniLM cosine similarity of attacks (lower = more diverse)",
             (probe["diversity"]["cosine"], f"{where}.diversity.cosine")],
            ["self-BLEU of attacks (lower = more diverse)", (probe["diversity"]["self_bleu"],
                                                           f"{where}.diversity.self_bleu")],
            ["attack success on harmful seeds", (probe["attack_success"]["value"], f"{where}.attack_success.value")],
            ["defender refusal on the attacker's prompts", (probe["refusal_rate/attacker_prompts"]["value"],
                                                            f"{where}.refusal_rate/attacker_prompts.value")],
            ["KL(defender || attacker) per token", (probe["role_kl"], f"{where}.role_kl")],
        ], table_id=f"probe-{_slug(str(path.parent.name))}")


def _crossplay_section(doc: _Document, path: Path) -> None:
    results = read_json(path, "results file")
    doc.heading("Cross-play")
    doc.paragraph(f"{len(results['attackers'])} attacker(s) x {len(results['defenders'])} defender(s) on "
                  f"{results['seeds']} seeds ({results['seeds_harmful']} harmful), from {path}.", note=True)
    doc.figure(plot_crossplay(results), "cross-play heatmap", "crossplay-heatmap")
    for metric, title in CROSSPLAY_METRICS.items():
        rows = [[attacker] + [(cell["value"], f"{path}#matrices.{metric}.{i}.{j}.value") for j, cell in enumerate(row)]
                for i, (attacker, row) in enumerate(zip(results["attackers"], results["matrices"][metric],
                                                        strict=True))]
        doc.heading(title, 3)
        doc.table(["attacker \\ defender", *results["defenders"]], rows, table_id=f"crossplay-{metric}")


def _exploit_section(doc: _Document, path: Path) -> None:
    summary = read_json(path, "results file")
    doc.heading(f"Exploitability of {summary['defender']}")
    doc.figure(plot_exploit(summary), f"exploitability of {summary['defender']}", "exploit-curve")
    plateau = summary["plateau"]
    doc.table(["estimate", "value", "count", "95% CI low", "95% CI high"], [[
        f"plateau attack success (steps {summary['plateau_steps'][0]}-{summary['plateau_steps'][1]})",
        (plateau["value"], f"{path}#plateau.value"), f"{plateau['count']}/{plateau['total']}",
        (plateau["ci95"][0], f"{path}#plateau.ci95.0"), (plateau["ci95"][1], f"{path}#plateau.ci95.1")]],
        table_id="exploit")


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "x"


def build_report(paths: list[str | Path], output: str | Path) -> tuple[Path, Path]:
    """Write output/report.html (self-contained) and output/report.md (+ output/figures/)."""
    output = Path(output)
    found = [find_results(p) for p in paths]
    with RunDirectory(output, "report"):
        return _write_report(found, output)


def _write_report(found: list, output: Path) -> tuple[Path, Path]:
    (output / "figures").mkdir(parents=True, exist_ok=True)
    doc = _Document("abs-fast report", output / "figures")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.paragraph(f"Generated {stamp} from {', '.join(str(f.path) for f in found)}. Rates are judge-labelled; "
                  "intervals are 95% Wilson score intervals.", note=True)
    shown: set[Path] = set()  # a file reached from two given paths appears once

    def first_time(path: Path | None) -> bool:
        if path is None or path.resolve() in shown:
            return False
        shown.add(path.resolve())
        return True

    for item in found:
        label = item.path.name or str(item.path)
        if first_time(item.metrics):
            _training_section(doc, item, label)
        for path in item.evals:
            if first_time(path):
                _eval_section(doc, path)
        if first_time(item.crossplay):
            _crossplay_section(doc, item.crossplay)
        if first_time(item.exploit):
            _exploit_section(doc, item.exploit)
    atomic_write_text(output / "report.html", doc.render_html())
    atomic_write_text(output / "report.md", "\n".join(doc.md) + "\n")
    return output / "report.html", output / "report.md"
