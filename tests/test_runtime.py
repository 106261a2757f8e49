"""Device and precision choices: autocast defaults and the bf16 speed check behind train.muon_precision."""

from __future__ import annotations

import pytest
import torch

from lmforge import runtime


def test_auto_autocast_is_fp32_on_gpus_that_only_emulate_bf16(monkeypatch):
    # A V100 or T4: torch "supports" bf16 there by emulation, many times slower than fp32.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.pick_dtype("auto", torch.device("cuda")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert runtime.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert runtime.pick_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.fixture
def fresh_cache():
    runtime.fast_bf16.cache_clear()  # neither see another test's answer nor leave a fake one behind
    yield
    runtime.fast_bf16.cache_clear()


def test_fast_bf16_measures_once_per_process(monkeypatch, fresh_cache):
    ratio = [100.0]  # a CPU without bf16 instructions (AMD Zen 3)
    calls = []

    def bf16_time_ratio() -> float:
        calls.append(ratio[0])
        return ratio[0]

    monkeypatch.setattr(runtime, "bf16_time_ratio", bf16_time_ratio)
    assert runtime.fast_bf16("cpu") is False
    assert runtime.fast_bf16("cpu") is False and len(calls) == 1  # cached: measured once per process
    runtime.fast_bf16.cache_clear()
    ratio[0] = 0.5  # AVX512-BF16 or AMX
    assert runtime.fast_bf16("cpu") is True
    assert runtime.fast_bf16("mps") is False
    assert len(calls) == 2


def test_bf16_time_ratio_leaves_the_run_s_random_stream_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert runtime.bf16_time_ratio(n=32, pairs=3) > 0
    assert torch.equal(torch.get_rng_state(), before)
