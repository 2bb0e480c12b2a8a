"""Structured logging: one line per event, key=value (default) or JSON.

Successful requests are never logged one by one; errors carry the request id.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name}
        msg = record.getMessage()
        for part in msg.split(" "):
            k, sep, v = part.partition("=")
            if sep:
                doc[k] = v.strip("'\"")
            else:
                doc.setdefault("msg", "")
                doc["msg"] = (doc["msg"] + " " + part).strip()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str = "INFO", fmt: str = "kv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        f = logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
        f.converter = time.gmtime
        handler.setFormatter(f)
    root = logging.getLogger("splitserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
