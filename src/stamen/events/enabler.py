"""Turning events on across the cluster every few seconds, as Flower's ``enable_events``.

Workers started without ``-E`` send no task events; a broadcast every 5 s switches them on,
including workers that join later. It runs in its own thread so a slow broker never delays
ingest, and a failure is logged once per outage.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

log = logging.getLogger(__name__)

INTERVAL = 5.0


class EventsEnabler(threading.Thread):
    def __init__(self, app: Celery, interval: float = INTERVAL) -> None:
        super().__init__(name="stamen-enable-events", daemon=True)
        self.app = app
        self.interval = interval
        self._stop_event = threading.Event()
        self._failing = False

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.app.control.enable_events()
            except Exception as exc:
                if not self._failing:
                    log.warning("Failed to enable events: %s", exc)
                self._failing = True
            else:
                self._failing = False
            self._stop_event.wait(self.interval)
