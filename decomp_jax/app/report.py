"""A study's report (``decomp-jax report``): the finished cells of a ``decomp-jax sweep`` folder
aggregated over seeds into the paper's table, paired comparisons of methods with their tests, and
the figures; and the per-layer methods' budgets as the paper counts them (``paper_budgets``).

The report reads ``STUDY_DIR/study.json`` (the cells and their grid axes) and each finished cell's
``runs/<cell>/metrics.json``; see ``decomp_jax.app.sweep`` for the study file and the sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from decomp_jax.core import methods
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import trainable_count
from decomp_jax.core.tree import count_params
from decomp_jax.errors import ConfigError
from decomp_jax.models.bert import NativeSequenceClassifier
from decomp_jax.models.hf import TARGET_PRESETS
from decomp_jax.tasks.metrics import TASK_METRICS

AXIS_TASK, AXIS_METHOD = "task", "method"  # the grid keys of a study's task and method axes
SEED_KEY = "train.seed"


def short_key(key: str) -> str:
    """The last part of a ``section.key`` (``adapter.rank`` -> ``rank``)."""
    return key.split(".")[-1]


def load_plan(study_dir) -> dict:
    path = Path(study_dir) / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the output_dir of a `decomp-jax sweep` (it writes study.json) "
                                f"or a report folder `decomp-jax report` wrote (study.json and cells.csv).")
    return json.loads(path.read_text())


CELL_COLUMNS = ("trainable_params", "backbone_params", "adapter_method", "steps", "train_seconds")


def collect(study_dir) -> list[dict]:
    """One record per finished cell: ``{id, axes, task, method, metrics, trainable_params,
    backbone_params}``, from ``runs/<cell>/metrics.json``, or for a report folder (no runs, a
    ``cells.csv`` that ``report`` wrote) from its rows."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    axes = {k for cell in plan["cells"] for k in cell["axes"]}
    rows = _cells_csv_rows(study_dir / "cells.csv", axes) if not (study_dir / "runs").is_dir() else {}
    records = []
    for cell in plan["cells"]:
        path = study_dir / "runs" / cell["id"] / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            records.append({"id": cell["id"], "axes": cell["axes"], "task": m["task"], "adapter_method": m["method"],
                            "method": str(cell["axes"].get(AXIS_METHOD, m["method"])), "metrics": m["eval"],
                            "trainable_params": m["trainable_params"], "backbone_params": m["backbone_params"],
                            "train_seconds": m.get("train_seconds"), "steps": m.get("steps")})
        elif cell["id"] in rows:
            row = rows[cell["id"]]
            records.append({"id": cell["id"], "axes": cell["axes"], "task": str(cell["axes"][AXIS_TASK]),
                            "adapter_method": row["adapter_method"],
                            "method": str(cell["axes"].get(AXIS_METHOD, row["adapter_method"])),
                            "metrics": row["metrics"], "trainable_params": row["trainable_params"],
                            "backbone_params": row["backbone_params"], "train_seconds": row["train_seconds"],
                            "steps": row["steps"]})
    return records


def _cells_csv_rows(path: Path, axes) -> dict[str, dict]:
    """The rows of a report's ``cells.csv`` by cell id: metrics (the non-empty metric columns) and the
    ``CELL_COLUMNS``; ``{}`` when there is no such file. A file without the columns a report needs is
    refused by name (reports before they were written cannot be re-aggregated)."""
    import csv

    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("id", "trainable_params", "backbone_params", "adapter_method") if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} column(s): re-aggregate from the study's run folders "
                             f"(`decomp-jax report STUDY_DIR`) instead.")
        metric_names = [k for k in reader.fieldnames if k not in {"id", *axes, *CELL_COLUMNS}]
        out = {}
        for row in reader:
            out[row["id"]] = {"metrics": {k: float(row[k]) for k in metric_names if row[k] != ""},
                              "trainable_params": int(row["trainable_params"]),
                              "backbone_params": int(row["backbone_params"]), "adapter_method": row["adapter_method"],
                              "steps": int(row["steps"]) if row.get("steps") else None,
                              "train_seconds": float(row["train_seconds"]) if row.get("train_seconds") else None}
    return out


def cells_csv(records: list[dict]) -> str:
    """One row per finished cell: its id, grid axes, every eval metric, trainable and backbone parameters,
    the adapter's method, steps and training seconds (the per-cell numbers behind the table; with the
    study.json beside it, ``report`` re-aggregates them)."""
    import csv
    import io

    axes = list(dict.fromkeys(k for r in records for k in r["axes"]))
    metric_names = sorted({k for r in records for k in r["metrics"]})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", *axes, *metric_names, *CELL_COLUMNS])
    for r in records:
        writer.writerow([r["id"], *(r["axes"].get(a, "") for a in axes), *(r["metrics"].get(m, "") for m in metric_names),
                         r["trainable_params"], r["backbone_params"], r["adapter_method"], r.get("steps", ""),
                         "" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}"])
    return buf.getvalue()


def mean_std_sem(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation (n - 1) and standard error of the mean; std and sem are nan
    for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, std / math.sqrt(n)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        d = 1.0 / d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        f *= c * d
        if abs(1.0 - c * d) < 1e-12:
            break
    return front * (f - 1.0)


def paired_t_test(diffs: Sequence[float]) -> tuple[float, float]:
    """``(t, two-sided p)`` of a paired t-test on the differences (Student's t with n - 1 degrees of
    freedom); ``(nan, nan)`` for fewer than two differences, ``(inf or 0, 0 or 1)`` when they are all equal."""
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    mean, std, sem = mean_std_sem(diffs)
    if std <= 1e-12 * max(1.0, abs(mean)):  # all equal (up to rounding)
        return (math.copysign(math.inf, mean), 0.0) if abs(mean) > 1e-12 else (0.0, 1.0)
    t = mean / sem
    dof = n - 1
    return t, _betainc(dof / 2, 0.5, dof / (dof + t * t))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties left out): P(a split at least as uneven | p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def score_of(record: dict, metrics: Mapping[str, str]) -> tuple[str, float]:
    """``(metric name, value x 100)`` of a record: the study's metric for its task, else the task's first."""
    name = metrics.get(record["task"]) or TASK_METRICS.get(record["task"], tuple(record["metrics"]))[0]
    if name not in record["metrics"]:
        raise ConfigError(f"metrics.{record['task']}: {name!r} is not among the run's metrics {sorted(record['metrics'])}.")
    return name, 100.0 * float(record["metrics"][name])


def _row_key(axes: Mapping[str, Any]) -> tuple:
    """What a table row is: the method and every other grid value except the task and the seed."""
    return tuple((k, v) for k, v in axes.items() if k not in (AXIS_TASK, SEED_KEY))


def _label(row: tuple) -> str:
    parts = dict(row)
    method = str(parts.pop(AXIS_METHOD, "?"))
    return method + "".join(f" {short_key(k)}={v}" for k, v in parts.items())


def aggregate(records: Sequence[dict], metrics: Mapping[str, str] = {}) -> dict:
    """``{"tasks": [...], "rows": [{label, key, budget_per_mille, cells: {task: {mean, std, sem, n,
    metric, values}}, avg}]}``: scores (x 100) over seeds per row and task; ``avg`` is the mean of the
    task means where the row has every task (else None)."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows: dict[tuple, dict] = {}
    for r in records:
        key = _row_key(r["axes"])
        row = rows.setdefault(key, {"key": key, "label": _label(key), "cells": {}, "budgets": [],
                                    "family": family(r), "rank": dict(key).get("adapter.rank")})
        metric, value = score_of(r, metrics)
        cell = row["cells"].setdefault(r["task"], {"metric": metric, "values": [], "seeds": []})
        cell["values"].append(value)
        cell["seeds"].append(r["axes"].get(SEED_KEY))
        row["budgets"].append(1000.0 * r["trainable_params"] / r["backbone_params"])
    out = []
    for row in rows.values():
        for cell in row["cells"].values():
            cell["mean"], cell["std"], cell["sem"] = mean_std_sem(cell["values"])
            cell["n"] = len(cell["values"])
        means = [row["cells"][t]["mean"] for t in tasks if t in row["cells"]]
        row["avg"] = sum(means) / len(means) if len(means) == len(tasks) else None
        budgets = row.pop("budgets")
        row["budget_per_mille"] = sum(budgets) / len(budgets)
        out.append(row)
    return {"tasks": tasks, "rows": out}


def paired(records: Sequence[dict], pairs: Sequence[Sequence[str]], metrics: Mapping[str, str] = {}) -> list[dict]:
    """For each ``(A, B)``: the settings (task and every grid value but the method and the seed) where
    both ran; per setting the mean of the seed-paired differences A - B (seeds both have); over the
    settings: the mean difference, wins / settings, a paired t-test and a sign test on the settings'
    differences."""
    out = []
    for a, b in pairs:
        by: dict[tuple, dict[str, dict]] = {}
        for r in records:
            if r["method"] not in (a, b):
                continue
            setting = tuple((k, v) for k, v in r["axes"].items() if k not in (AXIS_METHOD, SEED_KEY))
            setting = ((AXIS_TASK, r["task"]),) + tuple(x for x in setting if x[0] != AXIS_TASK)
            by.setdefault(setting, {}).setdefault(r["method"], {})[r["axes"].get(SEED_KEY)] = score_of(r, metrics)[1]
        settings = []
        for setting, sides in by.items():
            if a in sides and b in sides:
                seeds = sorted(set(sides[a]) & set(sides[b]), key=str)
                if seeds:
                    diffs = [sides[a][s] - sides[b][s] for s in seeds]
                    settings.append({"setting": dict(setting), "diff": sum(diffs) / len(diffs), "seeds": len(seeds)})
        diffs = [s["diff"] for s in settings]
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        t, p = paired_t_test(diffs)
        out.append({"a": a, "b": b, "settings": settings, "n": len(diffs),
                    "mean_diff": sum(diffs) / len(diffs) if diffs else math.nan,
                    "sem": mean_std_sem(diffs)[2] if diffs else math.nan,
                    "wins": wins, "losses": losses, "t": t, "p_t": p, "p_sign": sign_test(wins, losses)})
    return out


def _pm(mean: float, sem: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(sem) else f" ± {sem:.{digits}f}")


def tables(agg: dict) -> dict[str, str]:
    """The paper's layout (rows = methods with their budget in per mille, columns = tasks, Avg) as
    ``{"md", "csv", "tex"}``; cells are mean ± standard error over seeds (x 100)."""
    tasks = agg["tasks"]
    metric_of = {t: next((r["cells"][t]["metric"] for r in agg["rows"] if t in r["cells"]), "") for t in tasks}
    head = [f"{t} ({metric_of[t]})" for t in tasks]
    md = ["| method | budget ‰ | " + " | ".join(head) + " | Avg |", "|---|---|" + "---|" * len(tasks) + "---|"]
    csv = ["method,budget_per_mille," + ",".join(f"{t}_mean,{t}_std,{t}_sem,{t}_n" for t in tasks) + ",avg"]
    tex = ["\\begin{tabular}{l r " + "r " * len(tasks) + "r}", "\\hline",
           "Method & Budget (\\textperthousand) & " + " & ".join(t.upper() for t in tasks) + " & Avg \\\\", "\\hline"]
    for row in agg["rows"]:
        cells = [row["cells"].get(t) for t in tasks]
        avg = "" if row["avg"] is None else f"{row['avg']:.2f}"
        md.append(f"| {row['label']} | {row['budget_per_mille']:.3f} | "
                  + " | ".join(_pm(c["mean"], c["sem"]) if c else "" for c in cells) + f" | {avg} |")
        csv.append(",".join([f'"{row["label"]}"', f"{row['budget_per_mille']:.4f}"] + [
            ",".join("" if c is None or math.isnan(c[k]) else f"{c[k]:.4f}" for k in ("mean", "std", "sem")) + f",{c['n'] if c else ''}"
            for c in cells] + [avg]))
        tex.append(f"{row['label'].replace('_', chr(92) + '_')} & {row['budget_per_mille']:.2f} & "
                   + " & ".join(f"{c['mean']:.2f}$_{{\\pm {c['sem']:.2f}}}$" if c and not math.isnan(c["sem"])
                                else (f"{c['mean']:.2f}" if c else "--") for c in cells) + f" & {avg or '--'} \\\\")
    tex += ["\\hline", "\\end{tabular}"]
    return {"md": "\n".join(md) + "\n", "csv": "\n".join(csv) + "\n", "tex": "\n".join(tex) + "\n"}


def pairs_markdown(comparisons: Sequence[dict]) -> str:
    lines = ["| A - B | settings | mean diff ± s.e. | wins / settings | paired t (p) | sign test p |",
             "|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['a']} - {c['b']} | {c['n']} | {_pm(c['mean_diff'], c['sem'])} | {c['wins']} / {c['n']} "
                     f"| {c['t']:.2f} ({c['p_t']:.3f}) | {c['p_sign']:.3f} |")
    return "\n".join(lines) + "\n"


def family(record: dict) -> str:
    """The paper's family of a record's method (``full`` for full fine-tuning)."""
    if record["method"] == "full" or record["trainable_params"] == record["backbone_params"]:
        return "full"
    return methods.get(record["adapter_method"]).family


def _avg_sem(row: dict) -> float:
    """The standard error of a row's Avg: sqrt(sum of the tasks' squared standard errors) / tasks."""
    sems = [c["sem"] for c in row["cells"].values()]
    return math.sqrt(sum(x * x for x in sems)) / len(sems) if sems else math.nan


def plots(agg: dict, out_dir: Path) -> list[Path]:
    """``budget.png`` (Avg against the budget in per mille, log scale, one colour per family) and, when
    rows differ in ``adapter.rank``, ``ranks.png`` (Avg per rank, one bar per method, standard-error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in agg["rows"] if r["avg"] is not None]
    paths = []
    if not rows:
        return paths
    colours = {"full": "black", "reconstruction": "tab:blue", "extension": "tab:orange", "combination": "tab:green"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for fam, colour in colours.items():
        pts = [r for r in rows if r["family"] == fam]
        if pts:
            ax.errorbar([r["budget_per_mille"] for r in pts], [r["avg"] for r in pts],
                        yerr=[0 if math.isnan(_avg_sem(r)) else _avg_sem(r) for r in pts],
                        fmt="o", color=colour, label=fam, capsize=2)
            for r in pts:
                ax.annotate(r["label"], (r["budget_per_mille"], r["avg"]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
            by_method: dict = {}
            for r in pts:  # one method over several ranks: a line through its budgets (the paper's Fig. 2)
                by_method.setdefault(dict(r["key"]).get(AXIS_METHOD), []).append(r)
            for line in by_method.values():
                if len(line) > 1:
                    line = sorted(line, key=lambda r: r["budget_per_mille"])
                    ax.plot([r["budget_per_mille"] for r in line], [r["avg"] for r in line], color=colour, lw=0.8,
                            alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (per mille of the backbone, log scale)")
    ax.set_ylabel(f"Avg score over {', '.join(agg['tasks'])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "budget.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
    if len(ranks) > 1:
        methods = list(dict.fromkeys(dict(r["key"]).get(AXIS_METHOD) for r in rows if r["rank"] is not None))
        width = 0.8 / max(len(methods), 1)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(ranks) * max(len(methods), 1) * 0.4), 4.5))
        for j, m in enumerate(methods):
            xs, ys, es = [], [], []
            for i, rank in enumerate(ranks):
                match = [r for r in rows if dict(r["key"]).get(AXIS_METHOD) == m and r["rank"] == rank]
                if match:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(match[0]["avg"])
                    es.append(0 if math.isnan(_avg_sem(match[0])) else _avg_sem(match[0]))
            ax.bar(xs, ys, width=width, yerr=es, capsize=2, label=str(m))
        ax.set_xticks(range(len(ranks)), [f"r={r}" for r in ranks])
        low = min(r["avg"] for r in rows if r["rank"] is not None)
        ax.set_ylim(bottom=max(0.0, low - 5))
        ax.set_ylabel("Avg score")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / "ranks.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def report(study_dir, out_dir=None, pairs: Optional[Sequence[Sequence[str]]] = None) -> dict[str, Path]:
    """Aggregate a study folder: ``report.md`` (status, the table, paired comparisons), ``table.csv``,
    ``table.tex``, ``report.json``, ``cells.csv`` (per-cell metrics), ``study.json`` (the study's cells),
    ``budget.png`` and ``ranks.png``, in ``out_dir`` (default ``STUDY_DIR/report``). A report folder (its
    ``study.json`` and ``cells.csv``, no runs) is re-aggregated from its cells, in place by default.
    ``pairs`` defaults to the study file's."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    a_report = not (study_dir / "runs").is_dir() and (study_dir / "cells.csv").is_file()  # re-aggregated in place
    out = Path(out_dir) if out_dir else study_dir if a_report else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = collect(study_dir)
    if not records:
        raise FileNotFoundError(f"{study_dir}: no cell has finished yet (no runs/*/metrics.json); run `decomp-jax sweep` first.")
    metrics = plan.get("metrics") or {}
    agg = aggregate(records, metrics)
    comparisons = paired(records, pairs if pairs is not None else plan.get("pairs") or [], metrics)
    failed = sorted(p.stem for p in (study_dir / "failed").glob("*.json")) if (study_dir / "failed").is_dir() else []
    done = {r["id"] for r in records}
    failed = [f for f in failed if f not in done]
    t = tables(agg)
    paths = {"md": out / "report.md", "csv": out / "table.csv", "tex": out / "table.tex", "json": out / "report.json",
             "cells": out / "cells.csv", "study": out / "study.json"}
    status = (f"{len(records)} of {len(plan['cells'])} cells finished, {len(failed)} failed"
              + (f" ({', '.join(failed)})" if failed else "") + ".")
    text = ["# Study report", "", f"`{study_dir}`: {status} Scores x 100, mean ± standard error over seeds "
            f"(n per cell in table.csv); budget: trainable parameters (the task head included) per mille of the "
            f"backbone's.", "", t["md"]]
    if comparisons:
        text += ["## Paired comparisons", "", "Per setting (task and grid values but the method and the seed) the mean "
                 "of the seed-paired differences; over settings the mean ± standard error, the settings A wins, a "
                 "paired t-test and an exact sign test.", "", pairs_markdown(comparisons)]
    figures = plots(agg, out)
    text += [f"![{p.stem}]({p.name})" for p in figures]
    paths["md"].write_text("\n".join(text) + "\n")
    paths["csv"].write_text(t["csv"])
    paths["tex"].write_text(t["tex"])
    paths["cells"].write_text(cells_csv(records))
    if paths["study"].resolve() != (study_dir / "study.json").resolve():  # the report folder stands on its own
        paths["study"].write_text(json.dumps(plan, indent=2, default=str) + "\n")
    serial = {"tasks": agg["tasks"], "rows": [{**r, "key": [list(k) for k in r["key"]]} for r in agg["rows"]],
              "pairs": comparisons, "finished": len(records), "cells": len(plan["cells"]), "failed": failed}
    paths["json"].write_text(json.dumps(serial, indent=2, default=str) + "\n")
    for p in figures:
        paths[p.stem] = p
    return paths


# ---------------------------------------------------------------------------------------------
# budgets as the paper counts them

PAPER_BACKBONE = 125e6  # "RoBERTa-base (125M)": the paper's denominator
PAPER_PER_MILLE = {"ssl": 0.22, "ia3": 0.44, "ssb": 0.66, "bitfit": 0.82, "lora": 2.65, "dora": 3.32}  # LoRA/DoRA at r=2
# where the paper puts the methods: SSL, IA3, SSB (and SAM-PARSER) on key, value and the FFN intermediate
# matrix, as their counts imply; BitFit on every bias (LayerNorm's too); the bottleneck adapters at their
# placements; every other method on the six linear layers of each block
PAPER_PLACEMENT = {"ssl": "key_value_ffn", "ia3": "key_value_ffn", "ssb": "key_value_ffn", "sam_parser": "key_value_ffn",
                   "houlsby": "houlsby", "pfeiffer": "pfeiffer"}


def paper_adapter(method: str, rank: int = 2):
    """The AdapterConfig of ``method`` at the paper's placement on RoBERTa-base (see PAPER_PLACEMENT)."""
    presets = TARGET_PRESETS["roberta"]
    targets = presets[PAPER_PLACEMENT.get(method, "all_linear")]
    extra = r"LayerNorm/bias$" if method == "bitfit" else None
    return AdapterConfig(method=method, targets=targets, rank=rank, alpha=2.0 * rank, train_extra=extra)


def paper_budgets(rank: int = 2) -> list[dict]:
    """Every per-layer method's trainable parameters on RoBERTa-base (transformers' ``RobertaConfig()``,
    shapes only: nothing is initialised) at the paper's placements, in per mille of 125M, with the
    paper's value where its tables give one (LoRA and DoRA: at r=2)."""
    import jax
    from transformers import RobertaConfig

    model = NativeSequenceClassifier(RobertaConfig())
    encoder = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))["roberta"]
    # the bare RobertaModel's tree (transformers' RobertaConfig() defaults): the encoder and its pooler
    d = RobertaConfig().hidden_size
    pooler = {"dense": {"kernel": jax.ShapeDtypeStruct((d, d), jax.numpy.float32),
                        "bias": jax.ShapeDtypeStruct((d,), jax.numpy.float32)}}
    shapes = {**encoder, "pooler": pooler}
    rows = []
    for name in methods.names():
        cfg = paper_adapter(name, rank)
        count = trainable_count(shapes, cfg)
        paper = PAPER_PER_MILLE.get(name) if (rank == 2 or not methods.get(name).uses_rank) else None
        rows.append({"method": name, "placement": PAPER_PLACEMENT.get(name, "all_linear") + (" + LayerNorm" if name == "bitfit" else ""),
                     "trainable": count, "per_mille": 1000.0 * count / PAPER_BACKBONE, "paper_per_mille": paper,
                     "backbone": count_params(shapes)})
    return rows
