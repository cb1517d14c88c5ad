"""`deepen bench --soak`'s flags, fault list and replay of answers (the run itself:
tests/integration).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from deepen_engine.commands.bench.arguments import check_flags
from deepen_engine.commands.bench.soak import _alone, _plain, _streamed, request_key
from deepen_engine.commands.bench.soak_faults import CHAT, MALFORMED, SOAK_KINDS, good_request
from deepen_engine.commands.bench.soak_report import Seen, _kind_of, _thirds
from deepen_engine.commands.cli import build_parser
from deepen_engine.errors import ConfigError
from deepen_engine.server import create_app
from deepen_engine.server.protocol import parse_chat, parse_completion
from tests.conftest import running_server


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


def test_the_soak_replays_a_json_schema_request_with_its_properties_in_order(tiny_ensemble):
    # A JSON schema's properties are written in their order, so the request sent alone
    # must keep it: a replay with sorted keys asked for {"age", "name"} and its answer was
    # reported as a wrong answer under load (issue 23).
    path, body = good_request("json_schema", 0, 8)
    schema = body["response_format"]["json_schema"]["schema"]
    assert list(schema["properties"]) == ["name", "age"]
    view = tiny_ensemble.view(chat=True)
    as_sent = view.generate(body["messages"], json_schema=schema, max_new_tokens=8).text
    resorted = {**schema, "properties": dict(sorted(schema["properties"].items()))}
    sorted_text = view.generate(body["messages"], json_schema=resorted, max_new_tokens=8).text
    assert as_sent.startswith('{"name": ') and sorted_text.startswith('{"age": ')

    seen = Seen()

    async def load(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            await asyncio.gather(_plain(http, path, body, seen), _streamed(http, path, body, seen))

    with running_server(create_app(tiny_ensemble, model_name="tiny")) as url:
        asyncio.run(load(url))
        wrong = asyncio.run(_alone(url, seen))
    assert seen.unexpected == []
    assert wrong == []
    key = request_key(path, body)
    assert list(seen.answers) == [key]
    assert json.loads(key)[1] == body  # the replay's body, properties in the same order
    replayed = json.loads(key)[1]["response_format"]["json_schema"]["schema"]
    assert list(replayed["properties"]) == ["name", "age"]
    assert seen.answers[key] == {json.dumps([as_sent, []])}


def test_the_report_names_each_checked_kind_and_the_median_rss_of_each_third():
    keys = [request_key(*good_request(kind, 1, 12)) for kind in SOAK_KINDS]
    assert [_kind_of(key) for key in keys] == list(SOAK_KINDS)
    # 9 s of load, a sample a second and a last one after the load: thirds [0, 3), [3, 6),
    # [6, ...); a leak shows as a rising last median, one noisy sample does not move it
    rss = [(0, 10.0), (1, 50.0), (2, 60.0), (3, 100.0), (4, 300.0), (5, 101.0)]
    rss += [(6, 102.0), (7, 99.0), (8, 900.0), (9.5, 103.0)]
    assert _thirds(rss, 9) == [50.0, 101.0, 103.0]
    assert _thirds([(0, 5.0)], 9) == [5.0, None, None]
