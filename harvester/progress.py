"""Progress, kept importable under its old name: accounting lives in ``harvester.events``
(events, the tally, rates and ETA of this run) and drawing in ``harvester.display`` (displays
fed only by events). ``RichDisplay`` is the live display's old name."""
from __future__ import annotations

from harvester.display import LiveDisplay, PlainDisplay
from harvester.events import Event, Failure, Hub, Subscriber, Tally, human_bytes, human_duration

RichDisplay = LiveDisplay

__all__ = ["Event", "Failure", "Hub", "LiveDisplay", "PlainDisplay", "RichDisplay", "Subscriber", "Tally",
           "human_bytes", "human_duration"]
