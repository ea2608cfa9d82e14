"""Reliability and security suite: chaos soak, kill -9 campaign, disk full, hostile input,
``harvester serve`` hardening, secrets. Figures for docs/reliability.md come from these tests
(see ``report.py``)."""
