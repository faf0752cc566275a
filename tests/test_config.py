"""Every setting is a flag and a BATON_* env var; the flag wins, then the env var, then the default."""

from __future__ import annotations

import pytest

from services.common.config import COMMON, Setting, parse_bool, parse_settings, service_settings


def test_flag_beats_env_beats_default():
    settings = service_settings(50099, 9199)
    assert parse_settings(settings, [], {}).port == 50099
    assert parse_settings(settings, [], {"BATON_PORT": "6000"}).port == 6000
    assert parse_settings(settings, ["--port", "7000"], {"BATON_PORT": "6000"}).port == 7000


def test_every_common_setting_has_an_env_var_named_after_its_flag():
    for s in COMMON:
        assert s.env == "BATON_" + s.name.upper().replace("-", "_")
        assert s.help


def test_redis_url_falls_back_to_the_conventional_env_var():
    settings = service_settings(1, 2)
    assert parse_settings(settings, [], {"REDIS_URL": "redis://r:1/0"}).redis_url == "redis://r:1/0"
    both = {"REDIS_URL": "redis://r:1/0", "BATON_REDIS_URL": "redis://b:2/0"}
    assert parse_settings(settings, [], both).redis_url == "redis://b:2/0"


def test_bool_settings_accept_env_words_and_flags():
    flag = Setting("offload-idle", False, "why", parse_bool)
    assert parse_settings([flag], [], {"BATON_OFFLOAD_IDLE": "yes"}).offload_idle is True
    assert parse_settings([flag], ["--no-offload-idle"], {"BATON_OFFLOAD_IDLE": "yes"}).offload_idle is False
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_a_malformed_env_var_is_a_clear_error():
    with pytest.raises(SystemExit, match="BATON_PORT='abc'"):
        parse_settings(service_settings(1, 2), [], {"BATON_PORT": "abc"})


def test_choices_are_enforced():
    with pytest.raises(SystemExit):
        parse_settings(service_settings(1, 2), ["--log-format", "xml"], {})
