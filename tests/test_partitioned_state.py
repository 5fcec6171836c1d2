"""EMA teachers and the frozen-state checkpoint on ZeRO-3 partitions, without DeepSpeed (fast).

DeepSpeed's ZeRO-3 parameter is stood in for by `partition_`: an empty `p.data`, and `p.ds_tensor`
holding this rank's flat slice of the flattened parameter padded to world_size equal slices (with
`ds_shape`, `ds_numel`, `ds_status`), which is all `fastmask.methods.partition` reads. Sizes are
odd (35 and 7 elements over 2 and 3 ranks) so the last slice carries padding. The real thing runs
in tests/test_zero_methods.py (2 ranks through DeepSpeed).
"""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastmask.engine import frozen_state
from fastmask.methods.momentum import ema_shadow, ema_update_, make_teacher, set_ema_shadow, teachers


def _padded(t: torch.Tensor, world: int) -> torch.Tensor:
    part = math.ceil(t.numel() / world)
    flat = torch.full((part * world,), float("nan"), dtype=t.dtype)  # padding: never read back
    flat[:t.numel()] = t.detach().reshape(-1)
    return flat


def partition_(module: nn.Module, rank: int, world: int) -> nn.Module:
    """In place: every parameter becomes a stand-in of a ZeRO-3 partitioned parameter on `rank` of `world`."""
    for p in module.parameters():
        part = math.ceil(p.numel() / world)
        p.ds_tensor = _padded(p, world)[rank * part:(rank + 1) * part].clone()
        p.ds_tensor.ds_numel = part
        p.ds_shape, p.ds_numel, p.ds_process_group = tuple(p.shape), p.numel(), None
        p.ds_status = SimpleNamespace(name="NOT_AVAILABLE")
        p.data = torch.empty(0, dtype=p.dtype)
    return module


def _slice(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    part = math.ceil(full.numel() / world)
    return _padded(full, world)[rank * part:(rank + 1) * part]


class Student(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(5, 7), nn.LayerNorm(7))


def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    student = Student()
    teacher = make_teacher(student, Student).to(dtype)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))  # the student moved after construction
    return student, teacher


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world", [2, 3])
def test_ema_on_partitions_equals_the_whole_ema_sliced(dtype, world):
    student, teacher = _pair(dtype)
    want = copy.deepcopy(teacher)
    ema_update_(want, student, 0.9)
    ema_update_(want, student, 0.8)
    for rank in range(world):
        s, t = partition_(copy.deepcopy(student), rank, world), \
            partition_(copy.deepcopy(teacher), rank, world)
        ema_update_(t, s, 0.9)
        ema_update_(t, s, 0.8)
        for (n, got), w in zip(t.named_parameters(), want.parameters()):
            k = min(got.ds_tensor.numel(), w.numel() - rank * got.ds_tensor.numel())
            assert torch.equal(got.ds_tensor[:k], _slice(w, rank, world)[:k]), n
        if dtype == torch.bfloat16:  # the fp32 shadow is kept per partition
            assert [x.shape for x in ema_shadow(t)] == [p.ds_tensor.shape for p in t.parameters()]


def test_ema_refuses_partitions_that_do_not_line_up():
    student, teacher = _pair()
    with pytest.raises(ValueError, match="cannot be averaged slice by slice.*partitioned differently"):
        ema_update_(partition_(copy.deepcopy(teacher), 0, 2), partition_(copy.deepcopy(student), 0, 3), 0.9)
    with pytest.raises(ValueError, match="one is partitioned"):
        ema_update_(partition_(copy.deepcopy(teacher), 0, 2), student, 0.9)


def test_ema_regathers_parameters_deepspeed_keeps_whole():
    student, teacher = _pair()
    s, t = partition_(copy.deepcopy(student), 0, 2), partition_(copy.deepcopy(teacher), 0, 2)
    calls = []
    held = t[1].weight  # a small "persistent" parameter: DeepSpeed keeps its full copy between steps
    held.ds_status = SimpleNamespace(name="AVAILABLE")
    held.partition = lambda params: calls.append(("partition", params))
    held.all_gather = lambda params: calls.append(("all_gather", params))
    ema_update_(t, s, 0.9)
    assert calls == [("partition", [held]), ("all_gather", [held])]


def test_make_teacher_with_build_copies_the_student_and_leaves_the_rng_alone():
    torch.manual_seed(1)
    student = Student()
    before = torch.get_rng_state()
    teacher = make_teacher(student, Student)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                 student.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters()) \
        and all(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError, match="pass build="):
        make_teacher(partition_(copy.deepcopy(student), 0, 2))


class Method(nn.Module):
    """A method's kinds of state: a trainable student, an EMA teacher (with an fp32 shadow), a frozen
    non-teacher parameter, a buffer, and `_extra_state`."""

    def __init__(self):
        super().__init__()
        self.student = Student()
        self.teacher = make_teacher(self.student, Student)
        self.fixed = nn.Parameter(torch.randn(2, 9), requires_grad=False)
        self.register_buffer("center", torch.randn(3))
        self.draws = 0

    def get_extra_state(self):
        return {"draws": self.draws}

    def set_extra_state(self, state):
        self.draws = state["draws"]


def _method(kind: str, rank: int, world: int, seed: int, shadow: list | None):
    torch.manual_seed(seed)
    m = Method()
    m.draws = seed
    if kind == "zero3":
        partition_(m, rank, world)
    if shadow is not None:
        set_ema_shadow(m.teacher, [_slice(s, rank, world) if kind == "zero3" else s for s in shadow])
    return m


LAYOUTS = [("plain", 1), ("plain", 3), ("zero3", 2), ("zero3", 3)]


@pytest.mark.parametrize("saved", LAYOUTS)
@pytest.mark.parametrize("loaded", LAYOUTS)
def test_frozen_state_written_in_any_layout_reads_back_in_any_other(tmp_path, monkeypatch, saved, loaded):
    torch.manual_seed(7)
    shadow = [torch.randn(p.shape) for p in Student().parameters()]
    ref = _method("plain", 0, 1, seed=3, shadow=shadow)
    monkeypatch.setattr(frozen_state, "_world", lambda: saved[1])
    for rank in range(saved[1]):
        frozen_state.save(_method(saved[0], rank, saved[1], seed=3, shadow=shadow), tmp_path, rank)
    assert len(list(tmp_path.glob("frozen_rank*.pt"))) == saved[1]
    monkeypatch.setattr(frozen_state, "_world", lambda: loaded[1])
    for rank in range(loaded[1]):
        m = _method(loaded[0], rank, loaded[1], seed=11, shadow=None)  # other values everywhere
        assert frozen_state.load(m, tmp_path, rank)
        for (n, p), want in zip(m.named_parameters(), ref.parameters()):
            if p.requires_grad:
                continue  # trainable: DeepSpeed's optimizer state restores those
            got = p.ds_tensor[:min(p.ds_tensor.numel(), want.numel() - rank * p.ds_tensor.numel())] \
                if loaded[0] == "zero3" else p.reshape(-1)
            exp = _slice(want, rank, loaded[1])[:got.numel()] if loaded[0] == "zero3" else want.reshape(-1)
            assert torch.equal(got, exp), n
        for got, want in zip(ema_shadow(m.teacher), shadow):
            exp = _slice(want, rank, loaded[1]) if loaded[0] == "zero3" else want
            k = min(got.numel(), want.numel() - rank * got.numel()) if loaded[0] == "zero3" else got.numel()
            assert torch.equal(got.reshape(-1)[:k], exp.reshape(-1)[:k])
        assert torch.equal(m.center, ref.center) and m.draws == 3
        assert [n for n, _ in teachers(m)] == ["teacher"]


def test_frozen_state_refuses_files_that_do_not_cover_the_method(tmp_path, monkeypatch):
    monkeypatch.setattr(frozen_state, "_world", lambda: 2)
    frozen_state.save(_method("zero3", 0, 2, seed=3, shadow=None), tmp_path, 0)
    with pytest.raises(ValueError, match="holds 1 of the 2 frozen-state files"):
        frozen_state.load(_method("zero3", 0, 2, seed=3, shadow=None), tmp_path, 0)
    assert not frozen_state.load(Method(), tmp_path / "nothing", 0)  # an older checkpoint: nothing to do
