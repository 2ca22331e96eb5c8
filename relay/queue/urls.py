"""How a queue's database URL is shown: with its password masked, wherever it appears
(logs, errors, `relay check-config`, `relay status`). Pure.
"""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(://[^:/@?#]*):[^@/?#]*@")
_KEY_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with any password in it replaced by ***: what logs, errors and the CLI show.

    >>> mask_url("postgresql://relay:s3cret@db:5432/relay?sslmode=require")
    'postgresql://relay:***@db:5432/relay?sslmode=require'
    >>> mask_url("host=db password='a b' dbname=relay")
    'host=db password=*** dbname=relay'
    """
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))
