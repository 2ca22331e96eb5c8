"""How an account's worker answers "slow down" replies (relay.delivery.throttle): fewer
connections and a lower rate for a cool-down, a hold for a wait the server named, and
the way back up while the replies stay away.

A mixin of AccountWorker (relay.delivery.worker), over relay.delivery.account; a group's
send through the account comes here too (relay.delivery.member: note_reply).
"""

from __future__ import annotations

import logging

from relay.delivery.account import AccountState
from relay.delivery.health import AccountHealth
from relay.delivery.throttle import named_wait, slow_down_reply
from relay.delivery.transport import SendResult
from relay.errors import DeliveryError
from relay.observe.logs import event

log = logging.getLogger("relay.delivery")


class SlowDown(AccountState):
    """The throttle of an AccountWorker: its factor scales the pool and the rate limits."""

    def _note_slow_down(self, sent: SendResult | DeliveryError) -> None:
        """A "slow down" reply (relay.delivery.throttle) to this send: halve the account's
        connections and rate for a cool-down, and hold claims for a wait it names. A reply
        through a group's member (``via``) throttled that member (GroupTransport), not the
        group: one member's named wait must not hold the others."""
        if sent.via and sent.via != self.name:
            return
        errors = [sent] if isinstance(sent, DeliveryError) else list(sent.refused.values())
        slow = next((e for e in errors if slow_down_reply(e.code, e.enhanced, e.reason)), None)
        if slow is None:
            return
        mono = self.mono()
        wait = named_wait(slow.reason)
        if wait:
            # Once it ends (or a flush ends it), one send at a time until one gets through
            # (_slots), as after a backoff: not a pool's worth told the same again.
            self.backoff_failures = max(1, self.backoff_failures)
        if wait and self.host is not None:
            # The wait is the account's, not this process's: every worker holds its
            # claims (and group sends through it) until then, as for a backoff, and one
            # send probes it after.
            self.host.backed_off(self._wall_at(mono + wait), "throttle",
                                 self.backoff_failures)
        elif wait:  # one process: `relay status` shows the wait as the shared row would
            self._publish(AccountHealth(self.name, self._wall_at(mono + wait),
                                        self.backoff_failures, slow.reply_text(),
                                        reason="throttle"))
        if self.throttle.slow_down(mono, wait):  # one line per change, not per message
            self._throttle_changed()
            event(log, logging.WARNING, "account_throttled", account=self.name,
                  factor=f"{self.throttle.factor:g}", connections=self._capacity(),
                  reason=slow.reply_text(), wait=f"{wait:g}s" if wait else None)
            self._trim_ready(self.clock())

    def ease_throttle(self, mono: float) -> None:
        """Additive increase: the steps due by ``mono`` (also while idle: the gauges)."""
        if self.throttle.ease(mono):
            self._throttle_changed()
            event(log, logging.INFO, "account_throttle_eased", account=self.name,
                  factor=f"{self.throttle.factor:g}", connections=self._capacity())

    def _throttle_changed(self) -> None:
        """The new factor to the limiter, the gauge and the report `relay status` reads."""
        self.limiter.factor = self.throttle.factor
        self.metrics.throttle_factor.labels(self.name).set(self.throttle.factor)
        self._publish(self._health or AccountHealth(self.name, 0.0, 0))
