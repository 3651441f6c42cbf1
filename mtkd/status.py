"""Status messages: each module's logger under ``mtkd``, quiet on every DDP rank but zero.

The library adds no handler and sets no level: ``mtkd`` (the CLI) shows INFO messages on stderr,
and a user silences or redirects them with ``logging.getLogger("mtkd").setLevel(...)`` or a
handler of their own. Tables the user asked for (evaluate, report) are printed to stdout instead.
"""

from __future__ import annotations

import logging

# Lightning's rank_zero_only object from the light package that defines it, so that commands
# without a Trainer (init, synth) do not import Lightning; its rank is unset until Lightning loads.
from lightning_utilities.core.rank_zero import rank_zero_only


def on_rank_zero(record: logging.LogRecord) -> bool:
    """A logging filter: keep the record in the rank-0 process only, so DDP says it once."""
    return getattr(rank_zero_only, "rank", 0) == 0


def status_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``), filtered to rank zero."""
    logger = logging.getLogger(name)
    if on_rank_zero not in logger.filters:
        logger.addFilter(on_rank_zero)
    return logger
