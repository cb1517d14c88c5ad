"""Session fixtures of the integration tier: the default members are loaded once per test
run, and one OpenAI-compatible server serves them, for every module that needs them.

Loading the pair costs tens of seconds of CPU each time (conversion is cached on disk, but
the members' weights, anchors and relative rows are read again), and the tier used to load
them once per module and once per subprocess: about 41 minutes for `.ci/run`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deepen_engine import EMBEDDED, Ensemble


@pytest.fixture(scope="package", autouse=True)
def _members_load_once() -> Iterator[None]:
    """A second load of the same member in this process (an adapter's lazy `Ensemble()`, a
    test's new `Ensemble()`) reuses the first one's weights and tokenizer. For this tier
    only: the plain loader is back before the unit tier runs in the same process."""
    from tests.integration.one_process import share_member_loads

    restore = share_member_loads()
    yield
    restore()


def _members_installed() -> bool:
    return all(entry.installed() for entry in EMBEDDED.values())


@pytest.fixture(scope="session")
def default_ensemble() -> Iterator[Ensemble]:
    """The default members (Gemma-3-270m, SmolLM2-135M; default settings), loaded once per run.

    Tests take views of it (`with_fusion`), never change it; it is closed at the end.
    """
    if not _members_installed():
        pytest.skip("the embedded default members' packages are not installed")
    ensemble = Ensemble()
    yield ensemble
    ensemble.close()


@pytest.fixture(scope="session")
def default_server(default_ensemble: Ensemble) -> Iterator[str]:
    """One `deepen serve` app on `default_ensemble`, on a loopback port: its base URL."""
    pytest.importorskip("starlette")
    from deepen_engine.server import create_app
    from tests.conftest import running_server

    with running_server(create_app(default_ensemble, model_name="deepen-default")) as url:
        yield url


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[str | None]:
    """The tier's one local Ray cluster (3 CPUs: the placed pair and an adapter's member),
    started here and joined by the one process's `deepen --ray` items through
    `RAY_ADDRESS`: its address, or None without Ray. Shut down when the tier ends, so the
    unit tier that follows in the same process finds no Ray joined."""
    try:
        import ray
    except ImportError:
        yield None
        return
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# ------------------------------------------------ scripts and snippets in one process

ROOT = Path(__file__).resolve().parents[2]
COOKBOOK_SCRIPTS = sorted(
    p.name
    for p in (ROOT / "cookbook").glob("*.py")
    if p.name.startswith(("langchain_", "llama_index_")) or p.name == "structured_extraction.py"
)


CLI_ITEMS = {
    "cli:generate-json": 'deepen generate "The capital of France is" --json --max-new-tokens 8 '
    "--stop .",
    "cli:generate-ray": 'deepen generate "The capital of France is" --ray --max-new-tokens 12 '
    "--json",
    "cli:bench-ray": "deepen bench --ray --new-tokens 4 --rounds 1 --json",
}
"""`deepen` command lines the tests check, run in the one process with the README's (each in
its own process, they would load the members again: about 15 s each, 30-60 s with Ray)."""


@dataclass(frozen=True)
class Run:
    """What one item printed, and its exit status."""

    stdout: str
    stderr: str
    rc: int
    seconds: float = 0.0


def cli_lines(code: str) -> list[str] | None:
    """The `deepen` command lines of a bash snippet, or None if it holds anything else."""
    lines = [line.strip() for line in code.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if all(line.split("|")[-1].strip().startswith("deepen ") for line in lines):
        return lines
    return None


def one_process_items(snippet_dir: Path) -> dict[str, str]:
    """Every item run in the one process: README python snippets (`readme:LINE`), the
    `deepen` lines of README bash snippets (`readme:LINE:K`), cookbook scripts by name,
    then the tests' own command lines (CLI_ITEMS)."""
    from tests.integration.test_readme import snippets

    items: dict[str, str] = {}
    for snippet in snippets():
        if snippet.skip is not None:
            continue
        if snippet.language == "python":
            path = snippet_dir / f"readme-line{snippet.line}.py"
            path.write_text(snippet.code, encoding="utf-8")
            items[f"readme:{snippet.line}"] = f"py:{path}"
        elif (lines := cli_lines(snippet.code)) is not None:
            for k, line in enumerate(lines):
                items[f"readme:{snippet.line}:{k}"] = f"cli:{line}"
    for name in COOKBOOK_SCRIPTS:
        items[name] = f"py:{ROOT / 'cookbook' / name}"
    items.update({key: f"cli:{line}" for key, line in CLI_ITEMS.items()})
    return items


@pytest.fixture(scope="package")  # as ray_cluster, which it joins
def one_process(
    default_server: str, ray_cluster: str | None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Run]:
    """Run the README's snippets and the cookbook scripts in one process
    (tests/integration/one_process.py: the members load once for all of them), against
    the session's server for the ChatOpenAI example and the tier's Ray cluster for the
    `--ray` items; each one's output by key."""
    out = tmp_path_factory.mktemp("one-process")
    items = one_process_items(out)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env["DEEPEN_BASE_URL"] = default_server  # cookbook/langchain_chat_openai_server.py
    if ray_cluster is not None:  # `deepen --ray` joins it (remote/cluster.py), no Ray of its own
        env["RAY_ADDRESS"] = ray_cluster
    command = [sys.executable, "-m", "tests.integration.one_process", str(out), *items.values()]
    subprocess.run(command, cwd=ROOT, env=env, timeout=3600, check=False)
    if ray_cluster is not None:
        _wait_for_free_cpus()  # the one process's actors end with it, a moment later
    runs = {}
    for i, key in enumerate(items):
        rc = out / f"{i}.rc"
        if not rc.exists():  # the process died before this item
            runs[key] = Run("", "the one process ended before this item ran", -1)
            continue
        runs[key] = Run(
            (out / f"{i}.stdout").read_text(encoding="utf-8"),
            (out / f"{i}.stderr").read_text(encoding="utf-8"),
            int(rc.read_text()),
            float((out / f"{i}.seconds").read_text()),
        )
    ONE_PROCESS_SECONDS.update({key: run.seconds for key, run in runs.items()})
    return runs


def _wait_for_free_cpus(seconds: float = 60.0) -> None:
    """Wait until the tier's Ray has all its CPUs free again (the Ray tests ask for them)."""
    import ray

    deadline = time.monotonic() + seconds
    total = ray.cluster_resources().get("CPU", 0.0)
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.5)


ONE_PROCESS_SECONDS: dict[str, float] = {}
"""Each one-process item's wall time, for the slowest ones in the terminal summary."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The one-process items' times (the fixture's setup time is their sum, which pytest's
    --durations shows as one line)."""
    if not ONE_PROCESS_SECONDS:
        return
    slowest = sorted(ONE_PROCESS_SECONDS.items(), key=lambda kv: -kv[1])[:10]
    total = sum(ONE_PROCESS_SECONDS.values())
    terminalreporter.write_sep("=", f"one process: {len(ONE_PROCESS_SECONDS)} items, {total:.0f} s")
    for key, seconds in slowest:
        terminalreporter.write_line(f"{seconds:7.1f}s  {key}")
