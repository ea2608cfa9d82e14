"""Units of events.py and display.py that have no I/O: the figures of the summary and the bar,
the status line's fit to the terminal, and untrusted text shown as text."""
from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from harvester.display import LiveDisplay, PlainDisplay, failure_line, printable, resume_line, status_line
from harvester.events import Event, Failure, Tally, human_duration, reason_class, short_detail


@pytest.mark.parametrize("seconds,text", [
    (None, "?"), (0, "0.0s"), (0.94, "0.9s"), (9.94, "9.9s"), (9.97, "9s"), (10, "10s"), (59.9, "59s"),
    (187, "3m07s"), (7500, "2h05m"), (-0.2, "0.0s"),
])
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rerun_tally(clock: Clock) -> Tally:
    """A rerun of 120 series, 23 of them (1.5 GB) complete on disk, 97 (750 MB) to fetch."""
    t = Tally(clock=clock)
    t(Event("plan", data={"series": 120, "bytes": 2_250_000_000, "unavailable": 0}))
    clock.now += 7.0   # planning
    for _ in range(23):
        t(Event("skip", bytes=1_500_000_000 // 23))
    t(Event("fetching", data={"series": 97, "bytes": 750_000_000}))
    return t


def test_a_rerun_does_not_start_at_the_rate_of_the_bytes_already_on_disk():
    """A rerun's progress started with the bytes already on disk: "166.1 MB/s, 0:00:05" on an
    8 MB/s link with 90 s to go. The rate and the ETA count only this run's bytes, from its
    first download on (planning time is not transfer time either)."""
    clock = Clock()
    t = rerun_tally(clock)
    assert t.rate == 0 and t.eta() is None and t.fetched_bytes == 0
    t(Event("start", "1.2.3"))
    for _ in range(10):
        clock.now += 1.0
        t(Event("bytes", bytes=8_000_000))
    assert t.rate == pytest.approx(8_000_000)
    assert t.eta() == pytest.approx((750_000_000 - 80_000_000) / 8_000_000)
    assert t.to_fetch_bytes == 750_000_000 and t.fetched_bytes == 80_000_000
    assert resume_line(t) == "resuming: 23 of 120 series already complete, 97 to fetch, 750.0 MB"


def test_the_rate_stops_counting_at_finish_so_the_bar_and_the_summary_agree():
    clock = Clock()
    t = rerun_tally(clock)
    t(Event("start", "1.2.3"))
    clock.now += 4.0
    t(Event("bytes", bytes=40_000_000))
    t(Event("done", "1.2.3", bytes=40_000_000, files=3))
    t(Event("finish"))
    clock.now += 600.0   # the summary is printed later: same figure
    assert t.rate == pytest.approx(10_000_000) and t.transfer_seconds == pytest.approx(4.0)
    assert "10.0 MB/s" in status_line(t, 200)[1]


def test_a_first_run_has_no_resume_line():
    t = Tally()
    t(Event("plan", data={"series": 3, "bytes": 10}))
    t(Event("fetching", data={"series": 3, "bytes": 10}))
    assert resume_line(t) is None


def test_planning_is_labelled_not_series_0_of_0():
    """Planning showed "series 0/0" with no label."""
    text = status_line(Tally(), 80)[1]
    assert text.startswith("planning: ") and "0/0" not in text


def busy_tally() -> Tally:
    t = Tally()
    t(Event("plan", data={"series": 123_456, "bytes": 9_876_543_210_000, "unavailable": 12}))
    t(Event("start", "1"))
    t(Event("bytes", bytes=123_456_789))
    for kind in ("retry", "series_retry", "failed"):
        t(Event(kind, "1", message="HTTP 500"))
    for _ in range(48):
        t(Event("start", "2"))
    return t


@pytest.mark.parametrize("width", [200, 120, 80, 60, 40, 20, 8])
def test_the_status_line_fits_every_width(width):
    """At 80 columns the bar wrapped. The line (bar, a space, the text) is never wider than the
    terminal; what drops first is the optional part, never the series count while it fits."""
    bar, text = status_line(busy_tally(), width)
    assert (bar + 1 if bar else 0) + len(text) <= width
    if width >= 40:
        assert text.startswith("1/123,456 series")
    if width >= 80:
        assert "ETA" in text and "/s" in text and bar >= 10


def test_the_live_display_draws_one_line_of_at_most_the_terminal_width():
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    display = LiveDisplay(busy_tally(), console)
    lines = console.render_lines(display.__rich__(), console.options, pad=False)
    assert len(lines) == 1 and sum(len(seg.text) for seg in lines[0]) <= 80


def test_reason_classes_and_no_whole_request_url():
    """Final messages carried the whole request URL and no class of reason."""
    msg = ("HTTP 500 from http://127.0.0.1:8080/nbia-api/services/v4/getImage?SeriesInstanceUID=1.2.3&"
           "IncludeMD5=yes (no attempt succeeded)")
    assert short_detail(msg) == "HTTP 500 from getImage (no attempt succeeded)"
    assert reason_class("RetryableRequestError", msg) == "server error"
    assert reason_class("PermanentRequestError", "HTTP 403 from x") == "refused"
    assert reason_class("RetryableRequestError", "timed out") == "network"
    assert reason_class("IncompleteSeriesError", "") == "truncated"
    assert reason_class("IntegrityError", "MD5") == "corrupt"
    f = Failure("1.2.3", msg, "LIDC-IDRI", "LIDC-IDRI-0001", "CT THORAX", "RetryableRequestError")
    assert failure_line(f) == ('failed: 1.2.3: LIDC-IDRI LIDC-IDRI-0001 "CT THORAX": server error: '
                               "HTTP 500 from getImage (no attempt succeeded)")


HOSTILE_TEXT = "HTTP 400: [red]x[/bold] [link=mailto:x@example.org]click[/link] :thumbs_up: [/] [bold a\\"


def test_markup_emoji_and_links_in_a_server_message_are_printed_as_sent():
    """rich markup built from untrusted text raised MarkupError inside a worker and ended the run;
    escaped markup still turned ':thumbs_up:' into an emoji and doubled a trailing backslash."""
    out = io.StringIO()
    console = Console(file=out, width=300, force_terminal=True, color_system="truecolor")
    t = Tally()
    display = LiveDisplay(t, console)
    t(Event("failed", "1.2.[/]3", message=HOSTILE_TEXT))
    display(Event("failed", "1.2.[/]3", message=HOSTILE_TEXT))
    printed = out.getvalue()
    assert "\x1b]8;" not in printed and "👍" not in printed      # no OSC 8 hyperlink, no emoji
    text = re.sub(r"\x1b\[[0-9;]*m", "", printed)
    assert text == f"failed: 1.2.[/]3: refused: {HOSTILE_TEXT}\n"
    assert printed.count("\x1b[0m") == 1   # the one style is the red "failed"


def test_control_characters_from_a_server_cannot_drive_the_terminal():
    assert printable("a\x1b[2Jb\x07c\x9bd\te\n") == "a\\x1b[2Jb\\x07c\\x9bd\te\n"
    t = Tally()
    t(Event("failed", "1", message="x\x1b]0;pwned\x07"))
    out = io.StringIO()
    PlainDisplay(t, out)(Event("failed", "1"))
    assert "\x1b" not in out.getvalue() and "\\x1b]0;pwned\\x07" in out.getvalue()


def test_plain_display_without_a_ticker_prints_when_a_series_settles_and_the_interval_passed():
    t = Tally()
    out = io.StringIO()
    plain = PlainDisplay(t, out, interval=0.0)
    t(Event("plan", data={"series": 2, "bytes": 10}))
    t(Event("skip", bytes=5))
    plain(Event("skip"))
    assert out.getvalue().startswith("1/2 series  ")
