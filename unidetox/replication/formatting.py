"""How the replication writes numbers: in directory names and stage names (:func:`format_number`) and in the
report's text (:func:`percent_change`, :func:`table_head`)."""

from __future__ import annotations


def format_number(value: float) -> str:
    """Compact, stable text for a hyperparameter in a directory name: ``0.0005 -> "5e-4"``, ``0.1 -> "0.1"``.

    Example:
        >>> from unidetox.replication.formatting import format_number
        >>> [format_number(v) for v in (5e-4, 2.5e-4, 0.1, 1.0, 2)]
        ['5e-4', '2.5e-4', '0.1', '1', '2']
    """
    value = float(value)
    if value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.6g}"


def percent_change(value: float | None) -> str:
    """A relative change as a signed percentage, ``n/a`` when unknown.

    Example:
        >>> from unidetox.replication.formatting import percent_change
        >>> percent_change(-0.4712), percent_change(None)
        ('-47.1%', 'n/a')
    """
    return "n/a" if value is None else f"{value:+.1%}"


def table_head(*columns: str) -> list[str]:
    """The first two lines of a Markdown table with these column names.

    Example:
        >>> from unidetox.replication.formatting import table_head
        >>> table_head("target", "TP")
        ['| target | TP |', '|---|---|']
    """
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
