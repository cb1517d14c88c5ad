"""The scheduler's limits as flags: one declaration for `deepen serve` and `deepen bench`."""

import pytest

from deepen_engine.commands.bench.arguments import BENCH_LIMITS
from deepen_engine.commands.cli import build_parser
from deepen_engine.commands.scheduler_options import scheduler_limits
from deepen_engine.commands.serve import SERVER_LIMITS
from deepen_engine.config import SchedulerConfig


def test_unset_flags_give_the_engine_defaults():
    parser = build_parser()
    for command, names in (("serve", SERVER_LIMITS), ("bench", BENCH_LIMITS)):
        assert scheduler_limits(parser.parse_args([command]), names) == SchedulerConfig()


def test_flags_reach_the_scheduler_config():
    parser = build_parser()
    serve = parser.parse_args(["serve", "--max-batch-size", "3", "--max-queue", "5",
                               "--speculate-max-rows", "0"])  # fmt: skip
    limits = scheduler_limits(serve, SERVER_LIMITS)
    assert (limits.max_batch_size, limits.max_queue, limits.speculate_max_rows) == (3, 5, 0)
    bench = parser.parse_args(["bench", "--max-batch-size", "4", "--speculate-max-rows", "2"])
    limits = scheduler_limits(bench, BENCH_LIMITS)
    assert (limits.max_batch_size, limits.speculate_max_rows) == (4, 2)
    assert limits.max_queue == SchedulerConfig().max_queue  # bench has no --max-queue
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--max-queue", "5"])


def test_draft_precision_is_a_choice_flag(capsys):
    parser = build_parser()
    for command, names in (("serve", SERVER_LIMITS), ("bench", BENCH_LIMITS)):
        args = parser.parse_args([command, "--draft-precision", "float32"])
        assert scheduler_limits(args, names).draft_precision == "float32"
    assert scheduler_limits(parser.parse_args(["serve"]), SERVER_LIMITS).draft_precision == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--draft-precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_a_bad_limit_is_refused_with_the_field_named():
    args = build_parser().parse_args(["serve", "--max-batch-size", "0"])
    with pytest.raises(ValueError, match="max_batch_size"):
        scheduler_limits(args, SERVER_LIMITS)
