"""Devices on a CPU-only machine: device settings are checked before any model loads, the
CPU path makes no copies, and naming the CPU as the fusion device changes nothing. (The
CUDA path itself is tested in tests/gpu, on a GPU.)"""

from __future__ import annotations

import pytest
import torch

from deepen_engine import ConfigError, FusionConfig, MemberSpec
from deepen_engine.decoding.sampling import position_uniform
from deepen_engine.devices import DeviceCopies, check_device, device_problem, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
PROMPTS = ["The capital of France is", "def add(a, b):"]


@no_cuda
def test_a_cuda_fusion_device_without_cuda_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as info:
        FusionConfig(fusion_device="cuda")
    message = str(info.value)
    assert message.startswith("FusionConfig.fusion_device: 'cuda' needs CUDA, which this")
    assert "use 'cpu', or leave it unset" in message


def test_a_fusion_device_torch_does_not_know_is_refused():
    with pytest.raises(ConfigError, match=r"'gpu0' is not a torch device; give e\.g\. 'cpu'"):
        FusionConfig(fusion_device="gpu0")


def test_fusion_device_defaults_to_none_and_takes_cpu():
    assert FusionConfig().fusion_device is None
    assert FusionConfig(fusion_device="cpu").fusion_device == "cpu"


@no_cuda
def test_a_local_member_on_cuda_without_cuda_is_refused_before_loading():
    with pytest.raises(ConfigError, match=r"MemberSpec: device 'cuda:1' needs CUDA"):
        MemberSpec(source="no-such-model", device="cuda:1")


def test_a_ray_member_on_cuda_is_not_checked_here():
    spec = MemberSpec(source="gemma-3-270m", placement="ray", device="cuda", num_gpus=1)
    assert spec.device == "cuda"  # its actor has the GPU, not this process


def test_check_device_names_the_setting():
    assert check_device("cpu", "--device") == "cpu"
    assert device_problem("cpu") is None
    with pytest.raises(ConfigError, match=r"^--device: 'tpu' "):
        check_device("tpu", "--device")


def test_resolve_device_keeps_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_device_copies_give_the_table_itself_on_its_device():
    table = torch.arange(5)
    copies = DeviceCopies()
    assert copies.on(table, torch.device("cpu")) is table  # no copy on the CPU path


def test_device_copies_are_made_once_per_device():
    table = torch.arange(5)
    copies = DeviceCopies()
    meta = torch.device("meta")  # a device every machine has: shapes without data
    first = copies.on(table, meta)
    assert first.device == meta and first.shape == table.shape
    assert copies.on(table, meta) is first


def test_a_rows_numbers_depend_on_its_seed_and_position_only():
    from deepen_engine.decoding.rows import Row
    from deepen_engine.decoding.text import TextAssembler

    row = Row(index=0, config=None, fuser=None, owner=None, text=TextAssembler([]), seed=3)
    assert [row.uniform(n) for n in range(3)] == [position_uniform(3, n) for n in range(3)]


@pytest.mark.parametrize("method", ["deepen", "union", "unite"])
def test_naming_the_cpu_as_fusion_device_changes_nothing(tiny_ensemble, method):
    plain = tiny_ensemble.with_fusion(method=method)
    named = tiny_ensemble.with_fusion(method=method, fusion_device="cpu")
    expected = [r.token_ids for r in plain.generate(PROMPTS, max_new_tokens=8)]
    assert [r.token_ids for r in named.generate(PROMPTS, max_new_tokens=8)] == expected


def test_member_logits_stay_float32_on_the_member_device(tiny_ensemble):
    from deepen_engine.decoding.member_batch import MemberBatch

    member = tiny_ensemble.members[0]
    batch = MemberBatch(member, [member.tokenizer("Hello there").input_ids])
    batch.forward()
    logits = batch.require_logits()
    assert logits.dtype == torch.float32 and logits.device == torch.device("cpu")
    batch.free()


def test_the_fusion_device_is_a_cli_option():
    from deepen_engine.commands.options import fusion_options, fusion_settings

    args = fusion_options().parse_args(["--fusion-device", "cpu"])
    assert fusion_settings(args)["fusion_device"] == "cpu"
