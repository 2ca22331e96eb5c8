"""An account's backoff: its steps after account-wide failures, and the backoff and probe
the other workers on the queue share (relay.delivery.host).

A mixin of AccountWorker (relay.delivery.worker): the claim loop asks it before claiming
(_follow_host) and after each send (_account_health); a group's send through the account
does the same (relay.delivery.member). What it decides is published for `relay status`
(relay.delivery.health) and restored after a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from relay.delivery.account import AccountState
from relay.delivery.health import AccountHealth
from relay.delivery.host import SharedBackoff
from relay.delivery.refusals import login_refused
from relay.delivery.transport import SendResult
from relay.errors import DeliveryError, StoreError, TokenRefused
from relay.observe.logs import event, iso_time

log = logging.getLogger("relay.delivery")
# While another worker probes an account whose backoff ended, how often to look again.
PROBE_WAIT_S = 0.25


def backoff_reason(error: DeliveryError) -> str:
    """The label for relay_account_backoffs_total: a fixed, small set."""
    if error.account_reason is not None:
        return error.account_reason
    if login_refused(error.code or 0, error.enhanced):
        return "auth"
    return "refused" if error.code is not None else "connect"


def account_error(sent: SendResult | DeliveryError) -> DeliveryError | None:
    """The failure that concerns the whole account, if any: the attempt's own error, or a
    recipient's refusal that is a quota or throttle (Gmail's 5.4.5 at RCPT): the other
    recipients and messages would get the same answer. Not a group's result (``via``):
    such a refusal was its member's, which backed off (relay.delivery.groups); the group
    backs off only when it raises, no member being able to send."""
    if isinstance(sent, DeliveryError):
        return sent if sent.account_wide else None
    if sent.via:
        return None
    return next((e for e in sent.refused.values() if e.account_wide), None)


def _refused_login(failure: DeliveryError) -> bool:
    """The upstream (or the token endpoint) refused this process's login."""
    return isinstance(failure, TokenRefused) or (
        failure.code is not None and login_refused(failure.code, failure.enhanced))


class AccountBackoff(AccountState):
    """The account-wide backoff of an AccountWorker."""

    @property
    def backed_off(self) -> bool:
        return self.mono() < self.backoff_until

    @property
    def held_back(self) -> bool:
        """Backing off, or holding for a wait the server named ("try again in 2 hours"):
        nothing of the account may go now (its own claims, a session's immediate attempt,
        a group's send through it)."""
        return self.backed_off or self.throttle.held(self.mono()) > 0

    def _account_health(self, sent: SendResult | DeliveryError, now: float) -> float | None:
        """Back the account off on account-wide failures; return when it resumes (wall)."""
        mono = self.mono()
        failure = account_error(sent)
        if failure is None:
            if self.throttle.held(mono):
                return None  # a wait the server named ("try again in 2 hours"): no recovery
            recovered = self.backoff_failures > 0
            if recovered:
                event(log, logging.INFO, "account_recovered", account=self.name)
            self.backoff_failures = 0
            self.auth_failures = 0
            self.last_account_error = ""
            if recovered and self.health is not None:
                self._publish(AccountHealth(self.name, self._wall_at(self.backoff_until), 0))
            if recovered and self.host is not None:
                self.host.recovered()  # the other workers send again too
            return None
        if _refused_login(failure):  # every refused login counts, also inside a backoff
            self.metrics.auth_failures.labels(self.name).inc()
        if mono < self.backoff_until:  # another send already backed it off
            return self._wall_at(self.backoff_until)
        reason = backoff_reason(failure)
        auth = reason == "auth"
        self.backoff_failures += 1
        if auth:  # its own floor: a provider locks an account after a few failed logins
            self.auth_failures += 1
            delay = self.auth_policy.next_delay(self.auth_failures, self.rng)
        else:
            delay = self.policy.next_delay(self.backoff_failures, self.rng)
        # Not before a wait the server named in the same reply ("421 4.7.0 Try again in
        # 2 hours" at the greeting): published, and restored after a restart, as one.
        delay = max(delay, self.throttle.held(mono))
        self.backoff_until = mono + delay
        resume_at = self.resume_at = now + delay
        self.last_account_error = failure.reply_text()
        self.metrics.account_backoffs.labels(self.name, reason).inc()
        if self.host is not None:
            self.host.backed_off(resume_at, reason,
                                 self.auth_failures if auth else self.backoff_failures)
        event(log, logging.ERROR if auth else logging.WARNING,
              "account_auth_failed" if auth else "account_backoff", account=self.name,
              relay=self.transport.peer, reason=failure.reply_text(), why=reason,
              until=iso_time(resume_at))
        # Claimed-ahead messages go back to the queue, due when the account resumes: while
        # it backs off, 'sending' means a connection carries the message now (11.13).
        self._unclaim_ready(now, due_at=resume_at)
        self._publish(AccountHealth(self.name, resume_at, self.backoff_failures,
                                    self.last_account_error, auth, reason))
        return resume_at

    async def _follow_host(self, shared: SharedBackoff | None, now: float, mono: float,
                           *, own: bool = True) -> float | None:
        """Take on the account's backoff as the other workers left it (``shared``: until,
        reason), before claiming: adopt a backoff another worker decided, forget one that
        another's probe ended, and once it is over probe only if this worker holds the
        probe. ``own``: for a claim of its own mail, which takes the probe only with mail
        due to send (else a group's send through the account probes it, in whichever
        process: a probe held with nothing to send would stop them all for its lease).
        Returns how long to wait instead of claiming, or None."""
        assert self.host is not None
        if shared is None:
            if self.backoff_failures and not self.host.writing:
                self._forget_backoff()  # another worker's probe got through, or a flush
            return None
        self._count(shared)  # one send at a time, and the next step as the host's
        if shared.until > now:
            self._adopt(shared, now, mono)
            return None
        if mono < self.backoff_until:
            return None  # our own view ends later: wait for it as before
        if own:
            due = await self.store.next_due_at(self.name)
            if due is None or due > now:
                return None  # nothing to probe with (the claim takes nothing without it)
        if await self.host.take_probe(self.lease_s):
            return None  # this worker probes: one message
        return PROBE_WAIT_S  # another worker probes: its result decides

    async def _after_failure(self, sent: SendResult | DeliveryError, now: float) -> None:
        """Another worker may have backed the account off meanwhile (this send was held
        by it, or failed alike): follow that backoff rather than add a step. Not for our
        own refused login: the row then is the floor this login's end just wrote
        (HostAccount.end_login); this worker takes the next step itself, counting from
        the host's failures in a row."""
        failure = account_error(sent)
        if self.host is None or failure is None:
            return
        with contextlib.suppress(StoreError):
            shared = await self.host.backoff(fresh=True)
            if shared is not None and shared.until > now:
                self._count(shared)
                if not _refused_login(failure):
                    self._adopt(shared, now, self.mono())

    def _count(self, shared: SharedBackoff) -> None:
        """Failures in a row as the host counts them: whichever worker probes next and
        fails takes the next step (a longer wait), not its own first one again."""
        self.backoff_failures = max(self.backoff_failures, shared.failures)
        if shared.why == "auth":
            self.auth_failures = max(self.auth_failures, shared.failures)

    def _adopt(self, shared: SharedBackoff, now: float, mono: float) -> None:
        """Back off until ``shared.until`` (wall) as another worker decided, without a
        step of our own: no count, no new delay."""
        until = shared.until
        if mono + (until - now) <= self.backoff_until + 0.5:  # ours, or no later than ours
            return
        self.backoff_until = mono + (until - now)
        self.resume_at = until
        self.last_account_error = self.last_account_error or shared.why
        event(log, logging.INFO, "account_backoff_shared", account=self.name, why=shared.why,
              until=iso_time(until))
        self._unclaim_ready(now, due_at=until)
        self._publish(AccountHealth(self.name, until, self.backoff_failures,
                                    self.last_account_error, shared.why == "auth", shared.why))

    def _forget_backoff(self) -> None:
        self.backoff_failures = self.auth_failures = 0
        self.backoff_until = 0.0
        self.last_account_error = ""
        if self._pool is not None:
            self._pool.end_login_hold()
        event(log, logging.INFO, "account_recovered", account=self.name,
              by="another worker")
        self._publish(AccountHealth(self.name, self.clock(), 0))

    def restore_backoff(self, health: AccountHealth, now: float) -> None:
        """Go on with the backoff a previous run stored (``health``, wall time): after a
        restart the account still probes one at a time, not a pool's worth at once, and a
        refused login is not tried again before its backoff ends (a crash loop would
        otherwise lock the account)."""
        if health.failures <= 0:
            return
        self.backoff_failures = health.failures
        self.auth_failures = health.failures if health.auth else 0
        self.last_account_error = health.last_error
        remaining = health.backoff_until - now
        if remaining > 0:
            self.backoff_until = self.mono() + remaining
            self.resume_at = health.backoff_until
        event(log, logging.WARNING, "account_backoff_restored", account=self.name,
              reason=health.last_error, why=health.reason or None,
              until=iso_time(max(health.backoff_until, now)))

    def _publish(self, health: AccountHealth) -> None:
        """Tell `relay status` (through the scheduler's health hook), with the throttle."""
        self._health = dataclasses.replace(health, throttle=self.throttle.factor)
        if self.health is not None:
            self.health(self._health)

    def _wall_at(self, mono_at: float) -> float:
        """The wall-clock time (for storing) of a monotonic instant."""
        return self.clock() + (mono_at - self.mono())
