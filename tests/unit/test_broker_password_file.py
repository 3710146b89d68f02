"""broker.password_file: the Redis password read from a file when connecting, never from config.yaml or argv."""

from __future__ import annotations

import pytest

import broker
from broker.redis import BrokerAuthError
from opd.config import ConfigError, load_config

AWKWARD = "p@ss:w/rd%20 #?x"  # every character a URL would otherwise misread


def _section(*overrides: str):
    return load_config(None, ["broker.type=redis", *overrides]).broker


def test_the_password_comes_from_the_file_and_the_url_user_stays(tmp_path):
    secret = tmp_path / "redis.password"
    secret.write_text(AWKWARD + "\n")
    secret.chmod(0o600)
    section = _section("broker.url=rediss://worker@10.0.0.1:6380/2", f"broker.password_file={secret}")
    kw = broker.connect(section).redis.connection_pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["host"], kw["port"], kw["db"]) == (
        "worker",
        AWKWARD,
        "10.0.0.1",
        6380,
        2,
    )
    assert AWKWARD not in broker.address(section)


def test_a_password_in_both_places_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="password_file"):
        _section("broker.url=redis://:pw@h:1/0", f"broker.password_file={tmp_path / 'x'}")


def test_an_unreadable_password_file_is_a_clear_error(tmp_path):
    section = _section(f"broker.password_file={tmp_path / 'missing'}")
    with pytest.raises(BrokerAuthError, match=r"broker.password_file .*missing cannot be read"):
        broker.connect(section)
