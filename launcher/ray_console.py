"""Ray Train's per-checkpoint report lines, kept off a worker's console.

Ray Train 2.60 logs two INFO lines per checkpoint on every rank: ``Reporting training
result N: TrainingReport(...)`` (the metrics dict in full) and ``Checkpoint successfully
created at: ...``. Both repeat what the run's own step, validation and checkpoint output
says, once per worker, and drown it (six such lines per checkpoint of a 2-worker run,
with Ray's deduplication notice). They still reach Ray Train's log files under the
session's ``logs/train/``: only the console handlers drop them. Everything else Ray Train
prints (worker group start, failures, the failure policy's retry decisions) is unchanged.
"""

from __future__ import annotations

import logging

REPORT_LINE_PREFIXES = ("Reporting training result", "Checkpoint successfully created")


class _DropReportLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(REPORT_LINE_PREFIXES)


def drop_report_lines_from_console() -> None:
    """In a Ray Train worker, after Ray configured its loggers: the console handlers of
    the root and ``ray.train`` loggers (where Ray Train's worker logs go) drop the
    report lines. Idempotent."""
    try:
        from ray._private.log import PlainRayHandler  # Ray's console handler class (private)
    except ImportError:  # a Ray that moved it: its lines stay, training goes on
        return
    for logger in (logging.getLogger(), logging.getLogger("ray.train")):
        for handler in logger.handlers:
            if isinstance(handler, PlainRayHandler) and not any(isinstance(f, _DropReportLines)
                                                                for f in handler.filters):
                handler.addFilter(_DropReportLines())
