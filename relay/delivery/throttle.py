"""Adaptive throttling: when an upstream answers "slow down", send slower for a while.

Pure: replies and the time come in. ``slow_down_reply`` says whether a reply means "you
are sending too fast" and ``named_wait`` reads a wait the reply names; ``Throttle`` is
the account's factor (1: full speed), halved at a slow-down (multiplicative decrease),
held for a cool-down, then raised a step at a time (additive increase), as TCP does
with its congestion window. The worker applies the factor to the account's connection
count and rate limits, and holds claims until a named wait has passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.delivery.refusals import quota_reply

# Texts that mean "too fast" whatever the code's class says; lower case.
_SLOW_TEXTS = re.compile(
    r"rate limit(ed| exceeded| reached)|try (again )?later|throttl|sending rate exceeded"
    r"|too many (messages|mails|emails|requests|connections) (per|in the last|too fast)"
    r"|slow down|sending too fast")
# Replies that mention a slow-down word but are about one message or one connection:
# greylisting (RFC 6647) and Exim's per-connection message count.
_NOT_SLOW = re.compile(r"greylist|graylist|in this connection|mailbox (is )?full")
_WAIT = re.compile(
    r"(?:in|after|wait|for|retry in|try again in)\s+(\d+(?:\.\d+)?)\s*"
    r"(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)\b")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_NAMED_WAIT_S = 3600.0  # a reply cannot hold an account longer than this
# Several sends under way all get the same "slow down": one cut per this long, as TCP
# halves its window once per round trip, not once per lost packet.
CUT_GAP_S = 2.0


def slow_down_reply(code: int | None, enhanced: str | None, text: str) -> bool:
    """Whether a reply says the account is sending too fast: 421 4.7.0, 450/451 4.7.x,
    SES's 454 "Throttling failure", or a 4xx whose text says so. Not a quota (SES's
    "454 Throttling failure: Daily message quota exceeded"): halving the rate does not
    help, the account backs off until the quota resets (relay.delivery.refusals)."""
    if code is None or not 400 <= code < 500:
        return False
    lowered = " ".join(text.lower().split())
    if _NOT_SLOW.search(lowered) or quota_reply(code, enhanced, text):
        return False
    if code == 421 and enhanced == "4.7.0":
        return True
    if code in (450, 451) and enhanced is not None and enhanced.startswith("4.7."):
        return True
    if code == 454:
        return "throttl" in lowered
    # "451 4.3.0 try again later": the server's own trouble, not our rate (as in
    # relay.delivery.refusals: a throttle is a policy decision, class X.7).
    policy = enhanced is None or enhanced[2:].startswith("7.")
    return policy and _SLOW_TEXTS.search(lowered) is not None


def named_wait(text: str) -> float | None:
    """The wait a reply names ("try again in 30 seconds", "retry after 5 min"), in
    seconds and at most MAX_NAMED_WAIT_S; None when it names none."""
    found = _WAIT.search(text.lower())
    if found is None:
        return None
    seconds = float(found.group(1)) * _UNIT_S[found.group(2)[0]]
    return min(seconds, MAX_NAMED_WAIT_S)


@dataclass
class Throttle:
    """An account's share of its configured speed (``factor``), and any named wait.

    Times are monotonic seconds. ``factor`` halves at each slow-down (not below
    ``floor``), stays for ``cooldown_s``, then rises by ``step`` every ``step_s``.
    """

    cooldown_s: float = 60.0
    step_s: float = 30.0
    step: float = 0.125
    floor: float = 1 / 16
    factor: float = 1.0
    hold_until: float = 0.0  # no claims before this (a wait the reply named)
    _cut_at: float = float("-inf")
    _next_step: float = 0.0

    def slow_down(self, now: float, wait: float | None = None) -> bool:
        """A slow-down reply at ``now``: True when the factor changed (log it)."""
        if wait:
            self.hold_until = max(self.hold_until, now + wait)
        if now - self._cut_at < CUT_GAP_S:
            return False
        self._cut_at = now
        self._next_step = max(now + self.cooldown_s, self.hold_until)
        before, self.factor = self.factor, max(self.floor, self.factor / 2)
        return self.factor != before

    def ease(self, now: float) -> bool:
        """Raise the factor by the steps due at ``now``: True when it changed."""
        changed = False
        while self.factor < 1.0 and now >= self._next_step:
            self.factor = min(1.0, self.factor + self.step)
            self._next_step += self.step_s
            changed = True
        return changed

    def held(self, now: float) -> float:
        """Seconds until claims may go on (0.0: now)."""
        return max(0.0, self.hold_until - now)

    def scale(self, count: int) -> int:
        """A connection count or window limit at the current factor (at least 1)."""
        return scaled(count, self.factor)


def scaled(count: int, factor: float) -> int:
    """``count`` (connections, a window's limit) at ``factor``: rounded down, at least 1."""
    return count if factor >= 1.0 else max(1, int(count * factor + 1e-9))
