"""Waiting with nothing to run: when every thread waits, the vCPU sleeps until the host has news for a
listening guest (a connection, bytes, a close), a deadline passes, a signal comes from outside, or the
machine is asked to pause (a checkpoint) or stop.

Each wake is an EVENTS event whose value says why (so a replay, which never sleeps, takes the same
steps): news (a NET_RX event follows with the messages), time (deadlines are checked again: clock
events), a signal from outside (a SIGNAL event with its number follows: control.py), or a control
request. For that one the first waiting thread runs, so the vCPU reaches the end of this exit and can
park for a checkpoint or stop, but only to enter the same wait again (Scheduler.interrupt, switching.py):
no wait ends, no deadline moves, whatever the monitor does meanwhile.

It does not flush the log while it sleeps (Journal.idle): this exit has logged events already (the
deadline of the call that blocked, clock readings), and a batch carries every event buffered, so a
backup would hold events of an exit the primary never finished and refuse to go live there. Outputs
are flushed when their own exit ends (flush_on_output), so nothing a client waits for stays behind.
"""

from __future__ import annotations

import time
from collections import deque

from monitor.journal import EventKind
from monitor.linux.calls_proc import CLOCKS
from monitor.linux.core import PersonalityCore
from monitor.linux.threads import Thread

WOKE_TIME, WOKE_NEWS, WOKE_CONTROL, WOKE_SIGNAL = 0, 1, 2, 3
_MAX_SLEEP_S = 0.25  # longest one sleep lasts before control requests are looked at again


class NetworkWaiting(PersonalityCore):
    _host_signals: deque[int]

    def _host_signal_here(self) -> bool:  # control.py
        raise NotImplementedError

    def _signal_wakes_waiter(self) -> Thread | None:  # control.py
        raise NotImplementedError

    def _wait_for_news(self) -> Thread:
        sched = self.process.sched
        journal = self.machine.journal
        while True:
            self._wake_ready()
            self._expire_deadlines()
            picked = sched.pick()
            if picked is None and self._signal_wakes_waiter() is not None:
                picked = sched.pick()  # a signal to handle ends a wait (EINTR or a restart)
            if picked is not None:
                return picked
            why = journal.value(EventKind.EVENTS, self._sleep_for_news)
            if why == WOKE_NEWS:
                self.net.take(journal)
            elif why == WOKE_SIGNAL:
                self._host_signal_here()
            elif why == WOKE_CONTROL:
                sched.interrupt(sched.waiting()[0])  # it keeps its wait: back into it after the pause
                picked = sched.pick()
                assert picked is not None
                return picked

    def _sleep_for_news(self) -> int:
        """Live (not replaying): sleep until news, a deadline, a signal or a control request; say which."""
        machine = self.machine
        backend = machine.net_backend
        sched = self.process.sched
        while True:
            if machine._control is not None:
                return WOKE_CONTROL
            if self._host_signals:
                return WOKE_SIGNAL
            if backend.has_news():
                return WOKE_NEWS
            timeout = _MAX_SLEEP_S
            deadlines = sched.deadlines()
            if deadlines:
                # The host's clock directly: only the outcome (time is up) is an event.
                left = min(deadline - time.clock_gettime_ns(CLOCKS[clock]) for clock, deadline in deadlines)
                if left <= 0:
                    return WOKE_TIME
                timeout = min(timeout, left / 1e9)
            with machine._wake_cond:
                if (
                    not machine._news
                    and not backend.has_news()
                    and machine._control is None
                    and not self._host_signals
                ):
                    machine._blocked = True  # waiting for clients is not a hang
                    try:
                        machine._wake_cond.wait(timeout)
                    finally:
                        machine._blocked = False
                machine._news = False
            # Round again: a deadline is only due when the host's clock says so (above); waking early
            # (the bound, a kick) must not cost clock events or end anything.
