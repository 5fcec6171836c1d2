"""Config: shipped recipes, overrides, validation errors, the lr schedule and the generated DeepSpeed
config."""
import math

import pytest
import torch

from fastmask.engine.config import ConfigError, list_recipes, load_config
from fastmask.engine.schedule import lr_at, scaled_lr
from fastmask.engine.trainer import build_ds_config, resolve_precision


def test_every_shipped_recipe_loads():
    names = list_recipes()
    assert {"mae_tiny", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"} <= set(names)
    for name in names:
        load_config(name)


@pytest.mark.parametrize("name,model", [("mae_vit_base_patch16", "vit_base_patch16"),
                                        ("mae_vit_large_patch16", "vit_large_patch16"),
                                        ("mae_vit_huge_patch14", "vit_huge_patch14")])
def test_paper_recipes(name, model):
    cfg = load_config(name)
    e = cfg.engine
    assert (cfg.method, cfg.model, cfg.mask_ratio, cfg.data.img_size) == ("mae", model, 0.75, 224)
    assert (e.blr, e.betas, e.weight_decay, e.warmup_epochs, e.epochs, e.min_lr) == (1.5e-4, (0.9, 0.95),
                                                                                     0.05, 40, 800, 0.0)
    assert cfg.data.batch_size == 64 and cfg.data.min_scale == 0.2 and e.lr is None and e.clip_grad is None
    assert cfg.method_args == {"norm_pix": True, "decoder_embed_dim": 512, "decoder_depth": 8,
                               "decoder_num_heads": 16,
                               # the official optimizer groups decay cls and mask tokens
                               "decay_tokens": True}
    assert resolve_precision(e.precision, torch.device("cuda")) == "bf16"
    # 64 per GPU x 64 GPUs: the paper's lr.
    assert math.isclose(scaled_lr(e.blr, 64 * 64), 2.4e-3)


def test_overrides_and_types():
    cfg = load_config("mae_tiny", ["model=vit_small_patch16", "engine.zero_stage=2",
                                   "engine.betas=[0.9,0.99]", "data.root=/x", "engine.clip_grad=1"])
    assert cfg.model == "vit_small_patch16" and cfg.engine.zero_stage == 2
    assert cfg.engine.betas == (0.9, 0.99) and cfg.data.root == "/x" and cfg.engine.clip_grad == 1.0


@pytest.mark.parametrize("override,needle", [
    ("engine.zero_stag=2", "engine.zero_stag"),
    ("nonsense=1", "nonsense"),
    ("mask_ratio=1.0", "mask_ratio must be in (0, 1)"),
    ("mask_ratio=0", "mask_ratio must be in (0, 1)"),
    ("engine.zero_stage=4", "engine.zero_stage"),
    ("engine.precision=fp8", "engine.precision"),
    ("engine.resume=maybe", "engine.resume"),
    ("data.batch_size=two", "data.batch_size must be an integer"),
    ("engine.keep_last=0", "keep_last"),
    ("data.on_corrupt=ignore", "data.on_corrupt"),
])
def test_bad_config_names_the_problem(override, needle):
    with pytest.raises(ConfigError, match=None) as ei:
        load_config("mae_tiny", [override])
    assert needle in str(ei.value)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown config 'mae_nope'"):
        load_config("mae_nope")


def _official_lr(it_frac_epoch, lr, min_lr, warmup_epochs, epochs):
    # facebookresearch/mae util/lr_sched.adjust_learning_rate, written out independently.
    if it_frac_epoch < warmup_epochs:
        return lr * it_frac_epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (it_frac_epoch - warmup_epochs)
                                                          / (epochs - warmup_epochs)))


@pytest.mark.parametrize("steps_per_epoch,epochs,warmup_epochs", [(7, 10, 2), (13, 5, 0), (1, 9, 3)])
def test_lr_schedule_matches_official(steps_per_epoch, epochs, warmup_epochs):
    total = steps_per_epoch * epochs
    for step in range(total):
        ours = lr_at(step, total, 2.4e-3, warmup_epochs * steps_per_epoch, 1e-6)
        ref = _official_lr(step / steps_per_epoch, 2.4e-3, 1e-6, warmup_epochs, epochs)
        assert math.isclose(ours, ref, rel_tol=1e-12, abs_tol=1e-15), (step, ours, ref)


def test_lr_schedule_shape():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(101)]
    assert lrs[0] == 0.0 and math.isclose(lrs[10], 1.0) and math.isclose(lrs[100], 0.1)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))       # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))         # cosine falls
    assert min(lrs[10:]) >= 0.1


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ds_config(stage, precision):
    cfg = load_config("mae_tiny", [f"engine.zero_stage={stage}", "engine.grad_accum=3",
                                   "engine.clip_grad=1.5", "data.batch_size=5"])
    ds = build_ds_config(cfg, 4, precision, torch.device("cuda"))
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (5, 3, 60)
    assert ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_precision_resolution():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))


def test_method_override_without_config_starts_from_that_methods_tiny_recipe():
    from fastmask.engine.pretrain import DEFAULT_RECIPE, default_recipe

    assert default_recipe([]) == DEFAULT_RECIPE == "mae_tiny"
    for m in ("extrema", "relaxmim", "adios", "mst"):
        assert default_recipe(["engine.steps=3", f"method={m}"]) == f"{m}_tiny"
        cfg = load_config(default_recipe([f"method={m}"]), [f"method={m}"])
        assert cfg.method == m
    # then the method name fails where it is built
    assert default_recipe(["method=unknown"]) == DEFAULT_RECIPE


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError,
                       match=r"engine.optimizer must be adamw\|apex_fused_adam\|sgd\|lars, got 'adam'"):
        load_config("mae_tiny", ["engine.optimizer=adam"])
    assert load_config("mae_tiny", ["engine.optimizer=sgd"]).engine.optimizer == "sgd"


@pytest.mark.parametrize("spelling,value", [
    ("1e-3", 1e-3), ("1E-3", 1e-3), ("1.5e+2", 150.0), (".5", 0.5), ("-1e-4", -1e-4), ("+2.", 2.0),
    ("1_000.5", 1000.5), ("3", 3.0), ("'1e-3'", 1e-3), ("1:30.5", 90.5),
])
def test_every_float_spelling_on_the_command_line_and_in_yaml(spelling, value, tmp_path):
    """YAML 1.2 and Python floats; PyYAML's YAML 1.1 resolver alone reads `1e-3` as a string."""
    assert load_config("mae_tiny", [f"engine.min_lr={spelling}"]).engine.min_lr == value
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: mae_tiny\nengine:\n  min_lr: {spelling}\nmethod_args:\n  norm_pix: false\n")
    cfg = load_config(str(recipe))
    assert cfg.engine.min_lr == value and isinstance(cfg.engine.min_lr, float)


def test_integers_in_scientific_notation_and_non_numbers(tmp_path):
    assert load_config("mae_tiny", ["engine.steps=1e3"]).engine.steps == 1000
    assert load_config("mae_tiny", ["engine.steps=2.0"]).engine.steps == 2
    # Numbers in method_args reach the method as numbers too (its Args checks them).
    from fastmask.methods import build_method
    method = build_method(load_config("relaxmim_tiny", ["method_args.temperature=2e-1", "data.img_size=32"]))
    assert method.temperature == 0.2
    for override, needle in [("engine.steps=2.5", "engine.steps must be an integer, got 2.5"),
                             ("engine.lr=abc", "engine.lr must be a finite number, got 'abc'"),
                             ("engine.lr=inf", "engine.lr must be a finite number"),
                             ("engine.lr=.nan", "engine.lr must be a finite number"),
                             ("engine.blr=true", "engine.blr must be a finite number, got True"),
                             ("engine.lr=[1", "engine.lr must be a finite number, got '[1'")]:
        with pytest.raises(ConfigError) as ei:
            load_config("mae_tiny", [override])
        assert needle in str(ei.value), (override, str(ei.value))
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
