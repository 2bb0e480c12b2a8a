"""The `jobs:` block of the config file: defaults, bounds, one-line errors, secrets kept
out of logs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runtime.config.settings import SECRET_KEYS, Settings, describe, flatten

pytestmark = pytest.mark.unit


def test_defaults_and_a_full_block():
    s = Settings()
    assert s.jobs.url is None and s.jobs.path is None and s.jobs.enabled and not s.jobs.only
    s = Settings.model_validate({"jobs": {"url": "redis://r:6379/0", "concurrency": 8,
                                          "lease_s": 5, "callback_secret": "x"}})
    assert s.jobs.concurrency == 8 and s.jobs.url == "redis://r:6379/0"
    assert "jobs.lease_s" in flatten(s)


@pytest.mark.parametrize("block, says", [
    ({"url": "http://r:6379"}, "jobs.url"),
    ({"concurrency": 0}, "jobs.concurrency"),
    ({"lease_s": 0.01}, "jobs.lease_s"),
    ({"max_attempts": 0}, "jobs.max_attempts"),
    ({"max_queue": 5}, "jobs.max_queue: unknown key"),
])
def test_bad_values_are_one_line_naming_the_key(block, says):
    with pytest.raises(ValidationError) as e:
        Settings.model_validate({"jobs": block})
    msg = describe(e.value)
    assert says in msg and "\n" not in msg


def test_secrets_are_not_shown():
    assert {"jobs.callback_secret", "jobs.url"} <= SECRET_KEYS
    with pytest.raises(ValidationError) as e:
        Settings.model_validate({"jobs": {"url": "ftp://user:pw@host"}})
    assert "pw" not in describe(e.value)
