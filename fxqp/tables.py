"""The table type of fxqp's reports (:func:`fxqp.summary`, :func:`fxqp.explain`, ``fxqp
inspect``): values in cells, formatted only when printed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tabulate import tabulate

__all__ = ["Report"]


@dataclass
class Report:
    """A table with a title and notes; ``str()`` renders it with tabulate.

    Cells hold values (numbers, ``None`` for "not applicable", text for names), and
    ``formats`` says how a column is printed: :meth:`to_dicts` gives the values, ``str()``
    the formatted table.

    Attributes:
        title: first line.
        headers: column names.
        rows: one list of cells per row.
        notes: lines printed under the table.
        formats: header → function turning a (non-``None``) cell of that column into text.
        errors: what would make :func:`fxqp.transform` fail (:func:`fxqp.explain`; also among
            the notes); empty when nothing would.
    """

    title: str
    headers: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    formats: dict[str, Callable[[Any], str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows as dicts keyed by header, with their values (not the printed text)."""
        return [dict(zip(self.headers, row)) for row in self.rows]

    def _text(self, header: str, cell: Any) -> Any:
        if cell is None or cell == "":
            return cell
        fmt = self.formats.get(header)
        return fmt(cell) if fmt is not None else str(cell)

    def __str__(self) -> str:
        rows = [[self._text(h, c) for h, c in zip(self.headers, row)] for row in self.rows]
        table = tabulate(rows, headers=self.headers, tablefmt="simple", missingval="—", disable_numparse=True)
        return "\n".join([self.title, table, *self.notes])

    def __repr__(self) -> str:
        return str(self)
