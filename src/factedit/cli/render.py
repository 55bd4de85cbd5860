"""Tables the commands print: built from the core's report objects, never from raw model calls.

Tables take their natural width (no fixed width): in a terminal rich wraps cells to fit, and when
stdout is not a terminal :class:`factedit.cli.options.PipeFriendlyConsole` lets every column through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from factedit.errors import FactEditError

# The names of factedit.editing.methods.METHODS, in its order. Listed here because importing the registry
# imports torch and transformers (seconds), and option help must be instant; tests/test_cli.py checks
# that this tuple and method_names() agree. The registry (get_method) stays the authority;
# check_method_name only answers a typo early.
METHOD_CHOICES: tuple[str, ...] = (
    "none",
    "rome",
    "rome-original",
    "memit",
    "alphaedit",
    "ft",
    "ft-l",
    "emmet",
    "ultraedit",
)


def check_method_name(name: str) -> None:
    """Refuse an unknown method before the registry (and with it torch) is imported: a typo costs no wait."""
    if name not in METHOD_CHOICES:
        raise FactEditError(f"unknown method {name!r}: choose one of {', '.join(METHOD_CHOICES)}")


def _top(probe: dict[str, Any]) -> str:
    return "\n".join(escape(f"{t!r} {p:.3f}") for t, p in probe["top"])


def _p(probe: dict[str, Any]) -> str:
    true = "-" if probe.get("p_target_true") is None else f"{probe['p_target_true']:.3g}"
    return f"{probe['p_target_new']:.3g} / {true}"


def probe_table(title: str, rows: Sequence[Any]) -> Table:
    """One edit: each probed prompt with its top-5 next tokens and p(new)/p(true), before and after.

    ``rows``: :class:`factedit.editing.report.CompareRow` (``kind``, ``text``, ``before``, ``after``)."""
    table = Table(title=escape(title), show_lines=True)
    table.add_column("prompt")
    table.add_column("before: top-5 next tokens")
    table.add_column("before: p(new) / p(true)")
    with_after = any(row.after is not None for row in rows)
    if with_after:
        table.add_column("after: top-5 next tokens")
        table.add_column("after: p(new) / p(true)")
    for row in rows:
        cells = [escape(f"[{row.kind}]\n{row.text}"), _top(row.before), _p(row.before)]
        if with_after:
            cells += [_top(row.after), _p(row.after)] if row.after is not None else ["-", "-"]
        table.add_row(*cells)
    return table


def batch_table(title: str, report: Any) -> Table:
    """Many edits: per request its prompt, new target, top-1 before and after and p(new) before -> after,
    and whether the edit converged / landed (:class:`factedit.editing.report.EditReport`)."""
    table = Table(title=escape(title))
    for col in (
        "prompt",
        "new target",
        "before: top-1",
        "after: top-1",
        "p(new) before -> after",
        "converged",
        "top-1 = new",
    ):
        table.add_column(col)
    prompts = {row.request: row for row in report.rows if row.kind == "prompt"}
    for i, r in enumerate(report.requests):
        row = prompts[i]
        after = row.after or row.before
        converged = report.converged[i] if i < len(report.converged) else None
        landed = report.landed[i] if i < len(report.landed) else None
        p_new = f"{row.before['p_target_new']:.3g} -> {after['p_target_new']:.3g}"
        table.add_row(
            escape(r.text),
            escape(repr(r.new_text)),
            escape(repr(row.before["top"][0][0])),
            escape(repr(after["top"][0][0])),
            p_new,
            _yes_no(converged),
            _yes_no(landed),
        )
    return table


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")
