"""Ray placement without a Ray cluster: MemberSpec checks, joining a cluster (Ray missing,
addresses that disagree or do not answer), the resource check before any model loads,
and how `RayLink` turns a stuck or dead actor into `MemberError` (a fake `ray` module)."""

from __future__ import annotations

import socket
import sys
from types import SimpleNamespace

import pytest

from deepen_engine import ConfigError, Ensemble, MemberError, MemberSpec
from deepen_engine.remote import cluster as ray_cluster
from deepen_engine.remote.backend import RayLink
from deepen_engine.remote.protocol import Open, StepReply, StepRequest

# --------------------------------------------------------------------- MemberSpec


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_gpus": 1}, r"num_gpus=1.0 applies to placement='ray' only"),
        ({"num_cpus": 2, "address": "x:1"}, r"address='x:1', num_cpus=2.0 apply to placement"),
        (
            {"placement": "ray", "num_gpus": 0.5},
            r"reserves a GPU but device='cpu'; add device='cuda'",
        ),
        ({"placement": "ray", "device": "cuda:0"}, r"needs num_gpus > 0"),
        (
            {"placement": "ray", "num_cpus": 0},
            r"MemberSpec.num_cpus: Input should be greater than 0",
        ),
        ({"placement": "ray", "step_timeout": -1}, r"MemberSpec.step_timeout"),
        ({"placement": "cluster"}, r"MemberSpec.placement: Input should be 'local' or 'ray'"),
    ],
)
def test_bad_placement_settings_raise_config_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        MemberSpec(source="gemma-3-270m", **settings)


def test_ready_objects_cannot_go_to_an_actor(tiny_pair):
    with pytest.raises(ConfigError, match="not a ready object"):
        MemberSpec(source=tiny_pair[0], placement="ray")


def test_ray_settings_are_accepted():
    spec = MemberSpec(
        source="gemma-3-270m", placement="ray", device="cuda", num_gpus=0.5, resources={"a": 1}
    )
    assert ray_cluster.demand(spec) == {"CPU": 1.0, "GPU": 0.5, "a": 1}


# ------------------------------------------------------------------- joining a cluster


def test_missing_ray_is_a_config_error_before_loading(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'deepen\[ray\]'"):
        Ensemble([MemberSpec(source="gemma-3-270m", placement="ray")])


def test_members_must_name_one_cluster():
    specs = [
        MemberSpec(source="a", placement="ray", address="10.0.0.1:6379"),
        MemberSpec(source="b", placement="ray", address="10.0.0.2:6379"),
    ]
    with pytest.raises(ConfigError, match="name different clusters"):
        ray_cluster.cluster_address(specs)


def test_an_address_that_does_not_answer_fails_at_once(monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process already joined a Ray cluster")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("ray.init called"))
    with pytest.raises(ConfigError, match=rf"Cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        ray_cluster.connect(f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        ray_cluster.connect("no-port-here")


def _cluster(nodes, free):
    return SimpleNamespace(
        nodes=lambda: [{"Alive": True, "Resources": n} for n in nodes],
        available_resources=lambda: free,
    )


def test_a_member_no_node_can_hold():
    ray = _cluster([{"CPU": 2.0, "node:1.2.3.4": 1.0}], {"CPU": 2.0})
    spec = MemberSpec(source="gemma-3-270m", placement="ray", device="cuda", num_gpus=1)
    with pytest.raises(ConfigError, match=r"'gemma-3-270m' asks Ray for CPU=1, GPU=1, but no node"):
        ray_cluster.check_resources(ray, [spec])


def test_members_that_together_exceed_what_is_free():
    ray = _cluster([{"CPU": 2.0}], {"CPU": 1.5})
    specs = [MemberSpec(source=s, placement="ray") for s in ("a", "b")]
    with pytest.raises(ConfigError, match=r"ask for CPU=2 in all, but the cluster has CPU=1.5"):
        ray_cluster.check_resources(ray, specs)
    ray_cluster.check_resources(ray, [s.model_copy(update={"num_cpus": 0.5}) for s in specs])


# ----------------------------------------------------------------------- faults


class _Exceptions:
    class RayError(Exception):
        pass

    class GetTimeoutError(RayError, TimeoutError):
        pass

    class ActorDiedError(RayError):
        pass

    class ActorUnavailableError(RayError):
        pass


class _FakeRay:
    """`ray.get` answers from a script: a reply, or an exception to raise."""

    exceptions = _Exceptions

    def __init__(self, answers):
        self.answers = list(answers)
        self.killed = []

    def get(self, ref, timeout=None):
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def kill(self, actor, no_restart=True):
        self.killed.append(no_restart)


class _Method:
    def remote(self, *args):
        return "ref"


_ACTOR = SimpleNamespace(step=_Method(), pid=_Method(), free=_Method())


def _link(fake, **settings):
    spec = MemberSpec(source="gemma-3-270m", placement="ray", **settings)
    return RayLink(fake, _ACTOR, spec, "gemma-3-270m")


def test_a_stuck_actor_times_out_with_member_error_and_is_restarted():
    reply = StepReply()
    fake = _FakeRay([_Exceptions.GetTimeoutError(), 123, reply])
    link = _link(fake, step_timeout=2.5)
    with pytest.raises(
        MemberError, match=r"'gemma-3-270m' did not answer within step_timeout=2.5 s"
    ) as info:
        link.step(StepRequest([], 0, None))
    assert info.value.member == "gemma-3-270m"
    assert fake.killed == [False]  # killed so that Ray restarts it
    assert link.step(StepRequest([], 0, None)) is reply  # waited for the restart (pid), then ran


def test_a_dead_actor_raises_member_error_naming_the_member():
    fake = _FakeRay([_Exceptions.ActorDiedError("gone"), _Exceptions.ActorDiedError("still gone")])
    link = _link(fake, max_restarts=0)
    with pytest.raises(
        MemberError, match=r"its Ray actor died during the request \(ActorDiedError\)"
    ):
        link.step(StepRequest([], 0, None))
    with pytest.raises(MemberError, match=r"did not come back within load_timeout=900 s") as info:
        link.step(StepRequest([], 0, None))  # restarts exhausted: the wait for it fails
    assert info.value.member == "gemma-3-270m"


def test_the_next_step_waits_while_ray_restarts_the_actor(monkeypatch):
    monkeypatch.setattr("deepen_engine.remote.backend._RESTART_POLL_SECONDS", 0.0)
    reply = StepReply()
    restarting = _Exceptions.ActorUnavailableError("restarting")
    fake = _FakeRay([_Exceptions.ActorDiedError("gone"), restarting, restarting, 456, reply])
    link = _link(fake)
    with pytest.raises(MemberError, match="died during the request"):
        link.step(StepRequest([], 0, None))
    assert link.step(StepRequest([], 0, None)) is reply
    assert fake.answers == []


def test_a_prefill_to_an_actor_that_died_idle_is_sent_again():
    """A request that opens the batch it runs carries all its state: after the restart
    it runs as if nothing happened."""
    reply = StepReply()
    fake = _FakeRay([_Exceptions.ActorDiedError("died while idle"), 456, reply])
    prefill = StepRequest([Open(batch=5, prompt_ids=[[1, 2]])], 5, 64)
    assert _link(fake).step(prefill) is reply
    fake = _FakeRay([_Exceptions.ActorDiedError("died mid-request")])
    with pytest.raises(MemberError, match="died during the request"):
        _link(fake).step(StepRequest([], 5, 64))  # a running batch's state is gone


# ----------------------------------------------------------------------- command line


def _parse(*argv):
    from deepen_engine.commands.cli import build_parser

    return build_parser().parse_args(["generate", "x", *argv])


def test_cli_ray_options_become_member_specs():
    from deepen_engine.commands.options import member_specs

    args = _parse("--ray", "--ray-num-cpus", "0.5", "--step-timeout", "30", "-m", "a", "-m", "b")
    specs = member_specs(args)
    assert [(s.source, s.placement, s.num_cpus, s.step_timeout) for s in specs] == [
        ("a", "ray", 0.5, 30.0),
        ("b", "ray", 0.5, 30.0),
    ]
    assert {s.placement for s in member_specs(args, ray=False)} == {"local"}
    assert member_specs(_parse())[0].placement == "local"
    with pytest.raises(ConfigError, match=r"--ray-address, --ray-num-gpus apply to members in Ray"):
        member_specs(_parse("--ray-address", "h:1", "--ray-num-gpus", "1"))
