"""`deepen bench --soak`'s flags and fault list (the run itself: tests/integration)."""

from __future__ import annotations

import pytest

from deepen_engine.commands.bench.arguments import check_flags
from deepen_engine.commands.bench.soak_faults import CHAT, MALFORMED, SOAK_KINDS, good_request
from deepen_engine.commands.cli import build_parser
from deepen_engine.errors import ConfigError
from deepen_engine.server.protocol import parse_chat, parse_completion


def test_the_soak_sends_at_least_20_kinds_of_malformed_bodies():
    assert len(MALFORMED) >= 20
    assert len({repr(body) for _, body, _ in MALFORMED}) == len(MALFORMED)
    assert {status for _, _, status in MALFORMED} == {400}


@pytest.mark.parametrize("kind", SOAK_KINDS)
def test_every_well_formed_kind_is_read_by_the_server(kind):
    path, body = good_request(kind, 3, 12)
    call = (parse_chat if path == CHAT else parse_completion)(body)
    assert call.generation["max_new_tokens"] == 12


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--soak-clients", "0"], "--soak-clients"),
        (["--soak-seconds", "0"], "--soak-seconds"),
        (["--soak-malformed", "0.6", "--soak-disconnect", "0.6"], "sum to at most 1"),
        (["--soak-timeouts", "-0.1"], "must be >= 0"),
        (["--serving"], "--soak is a run of its own"),
    ],
)
def test_bad_soak_flags_fail_before_anything_starts(flags, message):
    args = build_parser().parse_args(["bench", "--soak", *flags])
    args.new_tokens = 64
    with pytest.raises(ConfigError, match=message):
        check_flags(args)
