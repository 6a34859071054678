"""
The bounded CI run of the fuzzers in L{tests.fuzzing} (issue 11, "Must show"
3): derandomized, so every run tries the same examples; C{bench/fuzz.py}
runs the same properties for as long as asked.  Explicit examples are the
regressions of what the fuzzers found.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from twisted.trial.unittest import SynchronousTestCase

from tests.fuzzing import (
    check_config,
    check_session,
    check_smuggling,
    config_texts,
    sessions,
    smuggling_cases,
)

#: CI bounds: each property a few seconds on the shared machine (about
#: 2,000 sessions, 1,500 configurations, 1,000 smuggling cases a second or
#: two each on one idle core).
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
CI = settings(deadline=None, derandomize=True, database=None, suppress_health_check=_HEALTH)


class SessionFuzzTests(SynchronousTestCase):
    @settings(CI, max_examples=2000)
    @given(sessions())
    def test_session_properties(self, case: dict[str, Any]) -> None:
        """
        Random and mutated sessions on every connector shape: replies from
        the table only, no traceback, a 250 2.6.0 per commit, no hang.
        """
        check_session(case)


class ConfigFuzzTests(SynchronousTestCase):
    @settings(CI, max_examples=1500)
    @given(config_texts())
    @example('"gateway" = {"." = ""}\n')
    @example('"gateway" = {" " = ""}\n')
    def test_config_loader_properties(self, text: str) -> None:
        """
        Mutated samples and random documents: a configuration or a
        ConfigError naming the file, key path and problem, nothing else.
        """
        check_config(text)


class SmugglingFuzzTests(SynchronousTestCase):
    @settings(CI, max_examples=1000)
    @given(smuggling_cases())
    @example({"variant": b"\r\n\x00.\r\n", "cuts": [1]})
    @example({"variant": b"\r\n.\r\r\n", "cuts": [3, 7]})
    def test_end_of_data_look_alikes(self, case: dict[str, Any]) -> None:
        """
        CR, LF, NUL, dot and space sequences in DATA, cut anywhere: refused
        with 550 5.6.11 or one message holding the smuggled commands.
        """
        check_smuggling(case)


class FoundByFuzzingTests(SynchronousTestCase):
    def test_unknown_key_quoted_in_key_path(self) -> None:
        """
        An unknown key that is not a bare TOML key (".", " ", "") is quoted
        in the key path, which stays unambiguous (bench/fuzz.py found
        C{gateway..} and C{gateway. }).
        """
        from pathlib import Path

        from relaygw.config._load import load_text
        from relaygw.errors import ConfigError

        for key, shown in [(".", '"."'), (" ", '" "'), ("", '""'), ("a\\nb", '"a\\nb"'),
                           ("bogus", "bogus")]:
            text = f'[gateway]\n"{key}" = 1\n'
            with self.assertRaises(ConfigError) as caught:
                load_text(text, "relaygw.toml", Path("/nonexistent"))
            self.assertEqual(caught.exception.key_path, f"gateway.{shown}")
            self.assertTrue(caught.exception.problem.startswith("unknown key"))
