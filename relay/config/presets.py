"""Provider presets (``accounts.NAME.preset``): host, port, TLS and the provider's
published sending limits, filled in where the account leaves them out.

Limits are the providers' own numbers as their pages state them (docs/routing.md lists
each page). They were not re-checked online when this table was written: providers
change them, and an account's plan may differ, so an operator may always set a *lower*
limit. An explicit host, port or TLS mode that differs from the preset, or a limit above
the published one, is a config error naming the key: the preset would otherwise claim
something that is not so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    host: str | None  # None: the account gives it (a region, a plan)
    port: int
    tls: str
    limits: dict[str, int] = field(default_factory=dict)  # rate_limit keys


PRESETS: dict[str, Preset] = {
    # Gmail (personal): "500 messages per day" through the web and SMTP, counted over a
    # rolling 24 hours (support.google.com/mail/answer/22839).
    "gmail": Preset("smtp.gmail.com", 587, "starttls", {"per_rolling_day": 500}),
    # Google Workspace: "2,000 messages per day per user", rolling 24 hours
    # (support.google.com/a/answer/166852, "Gmail sending limits in Google Workspace").
    "google-workspace": Preset("smtp.gmail.com", 587, "starttls", {"per_rolling_day": 2000}),
    # Amazon SES sandbox: 200 messages per 24 hours, 1 per second (docs.aws.amazon.com/ses
    # /latest/dg/request-production-access.html). The host names the region:
    # email-smtp.REGION.amazonaws.com, so the account gives it.
    "ses-sandbox": Preset(None, 587, "starttls", {"per_rolling_day": 200, "per_second": 1}),
    # SendGrid free plan: 100 emails per day (sendgrid.com/pricing; the free plan has
    # changed over time: check yours).
    "sendgrid-free": Preset("smtp.sendgrid.net", 587, "starttls", {"per_rolling_day": 100}),
    # Mailgun free plan: 100 messages per day (mailgun.com/pricing; EU accounts use
    # smtp.eu.mailgun.org, which is a conflicting host: give no preset's host then).
    "mailgun-free": Preset("smtp.mailgun.org", 587, "starttls", {"per_rolling_day": 100}),
    # Microsoft 365 (Exchange Online limits, learn.microsoft.com/office365/servicedescriptions
    # /exchange-online-service-description/exchange-online-limits): 30 messages per
    # minute and 10,000 recipients per day; relay counts messages, not recipients.
    "m365": Preset("smtp.office365.com", 587, "starttls",
                   {"per_minute": 30, "per_rolling_day": 10000}),
}


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """The account's keys with the preset's filled in; ValueError('key: why') for an
    explicit key that conflicts with it. ``data`` is the account's raw mapping."""
    name = data.get("preset")
    if name is None:
        return data
    preset = PRESETS.get(str(name))
    if preset is None:
        raise ValueError(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    filled = dict(data)
    for key in ("host", "port", "tls"):
        wanted = getattr(preset, key)
        if wanted is None:
            continue
        given = data.get(key)
        if given is not None and str(given).strip() != str(wanted):
            raise ValueError(f"{key}: preset {name} uses {wanted}; remove {key} or the preset")
        filled[key] = wanted
    limits = data.get("rate_limit") or {}
    if not isinstance(limits, dict):
        return filled  # the rate_limit block's own check says what is wrong
    merged = dict(limits)
    for key, published in preset.limits.items():
        given = limits.get(key)
        if given is None:
            merged[key] = published
        elif _number(given) > published:
            raise ValueError(f"rate_limit.{key}: {given} is above {name}'s published limit"
                             f" of {published}; set it lower, or remove the preset")
    filled["rate_limit"] = merged
    return filled


def _number(value: object) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        return float("-inf")  # not a number: rate_limit's own check reports it
