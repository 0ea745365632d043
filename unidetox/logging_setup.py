"""Logging for unidetox's entry points: the CLI, the recipes, the examples and the stages' ``run()``.

The library never configures logging on import; an entry point calls :func:`configure_logging` once it runs, so
that the stages' progress lines (validation results, resumed checkpoints, chosen checkpoints) are shown.
"""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Show INFO lines on stderr, unless the application already configured logging (then nothing changes).

    Idempotent: a second call, or a call after the application's own ``logging.basicConfig``, adds no handler.

    Example:
        >>> import logging
        >>> from unidetox.logging_setup import configure_logging
        >>> configure_logging()
        >>> configure_logging()  # no second handler
    """
    logging.basicConfig(level=level, format=LOG_FORMAT)
