"""structlog set-up: one entry per event (never per token), as JSON lines on stdout or, with
`[logging] journald = true`, as native journald entries whose fields can be queried:

    journalctl -t llm-supervisor MODEL=qwen EVENT=worker_recycle -o json
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, Callable

import structlog

SYSLOG_IDENTIFIER = "llm-supervisor"
# syslog priorities (journald's PRIORITY=) of structlog's level names.
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
# Shown in MESSAGE in this order when present; every key is also a field of its own.
LEADING = ("model", "worker_pid", "reason")


def journal_field(key: str) -> str:
    """journald field names are upper-case letters, digits and underscores, not starting with one."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    return name or "FIELD"


def journal_entry(event_dict: dict[str, Any], level: str) -> dict[str, str]:
    """The fields of one journald entry: MESSAGE for people, the rest for `journalctl FIELD=value`."""
    fields = dict(event_dict)
    event = str(fields.pop("event", ""))
    fields.pop("timestamp", None)  # journald stamps every entry itself
    fields.pop("level", None)
    said = [f"{k}={fields[k]}" for k in LEADING if fields.get(k) not in (None, "", 0)]
    said += [f"{k}={v}" for k, v in fields.items() if k not in LEADING and k != "exception"]
    message = f"{event}: {' '.join(said)}" if said else event
    if "exception" in fields:
        message += "\n" + str(fields["exception"])
    entry = {journal_field(k): v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    entry.update(MESSAGE=message, EVENT=event, PRIORITY=str(PRIORITY.get(level, 6)),
                 SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
    return entry


def to_journald(send: Callable[..., None]):
    def render(logger, method_name: str, event_dict: dict[str, Any]):
        send(**journal_entry(event_dict, event_dict.get("level", method_name)))
        raise structlog.DropEvent

    return render


def configure(level: str = "info", stream=sys.stdout, journald: bool = False) -> None:
    if journald:
        from systemd import journal  # systemd-python: sends to /run/systemd/journal/socket

        renderer = to_journald(journal.send)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
