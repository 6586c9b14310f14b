"""Writers: a value as a table shows it (``fmt``), a table as Markdown and LaTeX (booktabs), and the
names of the files they go to.

``write_table`` writes one table (header, body, caption) as ``<stem>.md`` and ``<stem>.tex``;
``flat_table`` lays rows out under given columns; ``file_stem`` / ``axis_token`` name a table's or a
figure's file after the axis values it is for (``loss_vs_lr_depth4``). Nothing here knows about
runs or cells: the tables (``orchestrator.tables``), figures and forensics all write through it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def fmt(v: Any) -> str:
    """A value as a table or a figure shows it: "–" for none, "yes" / "" for a flag, 4 significant
    digits (3 for very small or large numbers), "inf"."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e3) and v != 0 else f"{v:.4g}"
    return str(v)


_SHORT = {"warmup_steps": "warmup", "stabilizers": "stabilizer"}


def axis_name(field: str) -> str:
    """A field as a table header or a file name shows it (``warmup_steps`` -> ``warmup``)."""
    return _SHORT.get(field, field)


def axis_token(field: str, value: Any) -> str:
    """One axis value for a file name: ``warmup50``, ``depth4``, ``lr0.1``; the stabilizer alone
    (``weyl-qk_norm``). Only letters, digits, ``.``, ``_``, ``-``."""
    text = value if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
    text = text if field == "stabilizer" else axis_name(field) + text
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text.replace("+", "-"))


def file_stem(stem: str, values: dict[str, Any]) -> str:
    """``stem`` followed by one token per axis value (``loss_vs_lr_depth4``)."""
    return "_".join([stem] + [axis_token(f, v) for f, v in values.items()])


def to_markdown(header: list[str], body: list[list[str]], caption: str = "") -> str:
    lines = ([f"**{caption}**", ""] if caption else []) + ["| " + " | ".join(header) + " |",
                                                           "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("≥", r"$\geq$"), ("–", "--"), ("+", "+"), ("†", r"$^\dagger$"),
                 ("‡", r"$^\ddagger$"), ("§", r"\S{}")):
        s = s.replace(a, b)
    return s


def to_latex(header: list[str], body: list[list[str]], caption: str = "", label: str = "") -> str:
    cols = "l" + "r" * (len(header) - 1)
    out = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
           " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(_tex(c) for c in row) + r" \\" for row in body]
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{_tex(caption)}}}")
    if label:
        out.append(rf"\label{{{label}}}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def flat_table(rows: list[dict], columns: list[str]) -> tuple[list[str], list[list[str]]]:
    return columns, [[fmt(r.get(c)) for c in columns] for r in rows]


def write_table(out: Path, stem: str, header, body, caption) -> list[Path]:
    """One table as ``<stem>.md`` and ``<stem>.tex`` (label ``tab:<stem>``) in ``out``."""
    md, tex = out / f"{stem}.md", out / f"{stem}.tex"
    md.write_text(to_markdown(header, body, caption))
    tex.write_text(to_latex(header, body, caption, label=f"tab:{stem}"))
    return [md, tex]
