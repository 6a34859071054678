"""
Tests for L{relaygw.tap}: the twistd plugin's options and service.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application.service import IService
from twisted.python import usage
from zope.interface.verify import verifyObject

from relaygw.config._load import load
from relaygw.errors import ConfigError
from relaygw.service import RelayGatewayService
from relaygw.tap import Options, makeService

_BAD = """
[gateway]
hostname = "mx.example.test"

[[connectors]]
name = "Default"
bindings = ["127.0.0.1:2525"]
remote_ranges = ["192.168.0.300"]

[[routes]]
name = "internet"
"""


def test_bad_config_is_usage_error_with_config_error_text(tmp_path: Path) -> None:
    """
    A bad configuration makes postOptions raise UsageError whose text is the
    ConfigError's (file, key path, problem), so twistd exits before listening.
    """
    path = tmp_path / "bad.toml"
    path.write_text(_BAD)
    with pytest.raises(ConfigError) as expected:
        load(path)
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["-c", str(path)])
    assert str(caught.value) == str(expected.value)
    assert "connectors[0].remote_ranges[0]" in str(caught.value)


def test_missing_file_is_usage_error(tmp_path: Path) -> None:
    """A configuration file that does not exist is a UsageError naming it."""
    path = tmp_path / "absent.toml"
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--config", str(path)])
    assert str(path) in str(caught.value)


def test_no_option_loads_embedded_default() -> None:
    """Without -c, the embedded default configuration is loaded."""
    options = Options()
    options.parseOptions([])
    assert options.config.source == "<embedded default>"


def test_make_service_builds_gateway_without_starting() -> None:
    """makeService returns an IService for the loaded configuration, not running."""
    options = Options()
    options.parseOptions([])
    service = makeService(options)
    assert isinstance(service, RelayGatewayService)
    assert verifyObject(IService, service)
    assert service.config is options.config
    assert not service.running


def test_default_workers_leave_a_core_for_delivery() -> None:
    from relaygw.workers import default_workers

    assert [default_workers(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert default_workers() >= 1
