"""Delivery: the scheduler and account workers, and the pure policy they apply (routing,
priority, retry, rate limits, outcomes, bounces, account refusals).

Transports are edges in their own modules (``smtp/``, ``maildir``); policy modules stay
pure (time passed in). The scheduler, the account worker (worker, with its roles in
backoff, slowdown, member, pacing and recording over account) and the health reporter are
orchestration.
"""
