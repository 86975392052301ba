"""Logging: text lines for people, or one JSON object per line for Loki (`log_format = "json"`).

Records may carry `host`, `vfolder`, `op` and `errno` (pass them with `extra=`); the JSON format
emits them as fields.  Per-request lines are logged at debug level only.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("host", "vfolder", "op", "errno")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn logs every connection at info; keep the daemon's log about the daemon
    logging.getLogger("vfusefs.control.http").setLevel(logging.WARNING)
    logging.getLogger("pyfuse3").setLevel(max(logging.INFO, root.level))
