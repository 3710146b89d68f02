"""opd.config.redact finds the secrets of a config tree or a log line, and leaves everything else as it was."""

from __future__ import annotations

import logging

from opd.config import load_config
from opd.config.redact import REDACTED, redact, redact_text, secret_paths
from opd.runtime.lifecycle import _redact_record


def test_url_passwords_and_secret_keys_are_redacted_and_nothing_else():
    tree = {
        "broker": {"url": "redis://alice:hunter2@redis:6379/0", "password_file": "/run/secrets/redis"},
        "scorer": {"remote": {"url": "http://teacher:30000", "api_key_env": "TEACHER_API_KEY"}},
        "pipeline": {"actor_ms_per_token": 2.5},
        "extra": {
            "hf_token": "hf_abc",
            "db_password": "pw",
            "servers": ["rediss://:s3cret@a:1/0", "redis://b:2/0"],
        },
    }
    out = redact(tree)
    assert out["broker"] == {
        "url": f"redis://alice:{REDACTED}@redis:6379/0",
        "password_file": "/run/secrets/redis",
    }
    assert out["scorer"] == tree["scorer"], "a key naming where a secret is kept is not a secret"
    assert out["pipeline"] == tree["pipeline"], "a number under a *_token key is no secret"
    assert out["extra"] == {
        "hf_token": REDACTED,
        "db_password": REDACTED,
        "servers": [f"rediss://:{REDACTED}@a:1/0", "redis://b:2/0"],
    }
    assert tree["broker"]["url"].endswith("hunter2@redis:6379/0"), "the input is not modified"
    assert secret_paths(tree) == ["broker.url", "extra.hf_token", "extra.db_password", "extra.servers.0"]


def test_a_default_config_holds_nothing_to_redact():
    data = load_config(None, ["broker.type=redis"]).model_dump(mode="json")
    assert redact(data) == data and secret_paths(data) == []


def test_log_lines_lose_passwords_but_keep_their_sense():
    line = (
        "connecting to redis://:p4ss@10.0.0.1:6379/0 and https://bob:tok@x.org/v1; password=abc token: 'xyz' "
        "redis-server --requirepass hunter2 (max_new_tokens=64, pad token 0)"
    )
    assert redact_text(line) == (
        f"connecting to redis://:{REDACTED}@10.0.0.1:6379/0 and https://bob:{REDACTED}@x.org/v1; "
        f"password={REDACTED} token: '{REDACTED}' redis-server --requirepass {REDACTED} (max_new_tokens=64, pad token 0)"
    )


def test_the_component_log_filter_redacts_the_formatted_message():
    record = logging.LogRecord(
        "opd", logging.INFO, __file__, 1, "broker at %s", ("redis://:p4ss@h:1/0",), None
    )
    assert _redact_record(record) is True
    assert record.getMessage() == f"broker at redis://:{REDACTED}@h:1/0"
