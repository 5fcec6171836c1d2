"""EMA teachers with BatchNorm heads (`head_norm=bn`, BYOL-style): in training the target's BatchNorm
normalizes with the batch's statistics and keeps its own running statistics, as BYOL's target network
runs in train mode; the rest of the teacher stays in eval mode (no drop-path in the target)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmask.methods import get_method
from fastmask.methods.momentum import teacher_mode_
from fastmask.models import MODELS, VisionTransformer, register_model

IMG, P = 32, 8
MODEL = "test_teacher_mode_vit_micro"

if MODEL not in MODELS:
    @register_model(name=MODEL)
    def _micro(**kw):
        return VisionTransformer(**{"patch_size": P, "embed_dim": 32, "depth": 1, "num_heads": 2, **kw})


def _extrema():
    return get_method("extrema")(model=MODEL, img_size=IMG, mask_ratio=0.75, masking="multi", num_masks=2,
                                 proj_hidden_dim=24, proj_dim=8, pred_hidden_dim=16, head_norm="bn",
                                 drop_path_rate=0.1, color_aug=False)


def _relaxmim():
    return get_method("relaxmim")(model=MODEL, img_size=IMG, mask_ratio=0.75, similarity="infonce",
                                  target="ema", proj_hidden_dim=24, proj_dim=8, head_norm="bn")


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("build", [_extrema, _relaxmim], ids=["extrema", "relaxmim"])
def test_bn_target_uses_batch_statistics_in_training(build):
    torch.manual_seed(0)
    m = build().train()
    teacher_bns = _bns(m.teacher)
    assert teacher_bns, "head_norm=bn gives the teacher's heads BatchNorm layers"
    assert all(bn.training for bn in teacher_bns)
    others = [mod for mod in m.teacher.modules() if not isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    assert not any(mod.training for mod in others)  # no drop-path / dropout in the target
    before = [bn.running_mean.clone() for bn in teacher_bns]
    imgs = torch.randn(6, 3, IMG, IMG) + 0.5
    m(imgs)["loss"].backward()
    # the target's forward updated its own running statistics: it normalized with the batch's
    assert all(not torch.equal(b, bn.running_mean) for b, bn in zip(before, teacher_bns))
    m.eval()
    assert not any(mod.training for mod in m.teacher.modules())


def test_teacher_mode_leaves_a_module_without_batchnorm_in_eval():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.LayerNorm(4))
    teacher_mode_(net, True)
    assert not any(mod.training for mod in net.modules())
    x = torch.randn(3, 4)
    torch.testing.assert_close(net(x), net(x))  # no dropout: deterministic
