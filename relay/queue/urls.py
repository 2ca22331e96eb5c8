"""How a queue's database URL is shown: with its password masked, wherever it appears
(logs, errors, `relay check-config`, `relay status`). Pure.
"""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(://[^:/@?#]*):[^@/?#]*@")
_KEY_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
# A query parameter whose name says it carries a secret (?token=, &api_key=,
# &X-Amz-Signature=): a webhook's or token endpoint's credential written into its URL.
_QUERY_SECRET = re.compile(
    r"([?&;](?:[\w.-]*[_.-])?(?:token|key|apikey|secret|password|passwd|pwd|sig|signature)=)"
    r"[^&#;]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with any password in it replaced by ***: what logs, errors and the CLI show.
    So are the values of query parameters named like secrets (token, key, sig...).

    >>> mask_url("postgresql://relay:s3cret@db:5432/relay?sslmode=require")
    'postgresql://relay:***@db:5432/relay?sslmode=require'
    >>> mask_url("host=db password='a b' dbname=relay")
    'host=db password=*** dbname=relay'
    >>> mask_url("https://hooks.example/h?team=ops&access_token=abc&sig=x")
    'https://hooks.example/h?team=ops&access_token=***&sig=***'
    """
    masked = _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))
    return _QUERY_SECRET.sub(r"\1***", masked)
