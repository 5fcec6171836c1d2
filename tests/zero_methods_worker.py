"""Run by tests/test_zero_methods.py under torchrun: every method at several ZeRO stages, in one launch.

    torchrun --nproc_per_node 2 tests/zero_methods_worker.py OUT [CASE ...]   (CASE...: only these, to debug)

Each run trains a tiny configuration of a registered method (2-block ViT at 32 px, batch 4 per
rank) for STEPS steps through `fastmask.engine.trainer.pretrain`. Rank 0 writes
OUT/<run>.json (the logged (step, loss) pairs, the step resumed from) and OUT/<run>.pt (the
method's state dict, parameters gathered whole at ZeRO-3: students, teachers, buffers, draw
counters); ZeRO-0 runs also OUT/<run>_init.pt, the state as built. Process start-up
(torch + DeepSpeed imports, ~30 s) is paid once for all runs.

RUNS lists (name, case, stage, extra overrides); RESUMED the cases stopped half-way and resumed.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from fastmask.models import MODELS, VIT_ARCHS, VisionTransformer, register_model  # noqa: E402

STEPS = 4
MICRO = "test_zero_vit_micro_patch8"  # 2 blocks, 32 wide, 16 patches at 32 px; own name

VIT_ARCHS.setdefault("micro", (32, 2, 2))  # MAE takes architectures by name: vit_micro_patch16 (2x2 patches)
if MICRO not in MODELS:
    @register_model(name=MICRO)
    def _micro(**kw):
        return VisionTransformer(**{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, **kw})

_COMMON = ["data.img_size=32", "data.batch_size=4", "data.num_workers=0", "data.loader=torch",
           f"engine.steps={STEPS}", "engine.log_every=1", "engine.warmup_steps=1",
           "engine.checkpoint_every=0", "engine.precision=fp32"]
# case -> (recipe, overrides): tiny heads, one decoder block, EMA momentum 0.5 so the teachers move visibly.
CASES = {
    "mae": ("mae_tiny", ["model=vit_micro_patch16", "method_args.decoder_depth=1",
                         "method_args.decoder_embed_dim=32", "method_args.decoder_num_heads=4"]),
    "extrema": ("extrema_tiny", [f"model={MICRO}", "method_args.num_masks=2", "mask_ratio=0.5",
                                 "method_args.proj_hidden_dim=64", "method_args.proj_dim=32",
                                 "method_args.pred_hidden_dim=64", "method_args.momentum=0.5"]),
    "relaxmim_stopgrad": ("relaxmim_tiny", [f"model={MICRO}", "method_args.decoder_depth=1",
                                            "method_args.decoder_embed_dim=32",
                                            "method_args.decoder_num_heads=4",
                                            "method_args.proj_hidden_dim=64", "method_args.proj_dim=32",
                                            "method_args.negatives=image"]),  # batch negatives: per rank
    "mst": ("mst_tiny", [f"model={MICRO}", "method_args.out_dim=64", "method_args.head_hidden_dim=32",
                         "method_args.bottleneck_dim=16", "method_args.decoder_width=16",
                         "method_args.momentum=0.5"]),
}
CASES["relaxmim_ema"] = (CASES["relaxmim_stopgrad"][0],
                         [*CASES["relaxmim_stopgrad"][1], "method_args.target=ema",
                          "method_args.momentum=0.5"])
_ADIOS = [f"model={MICRO}", "method_args.num_masks=2", "method_args.mask_fbase=8",
          "method_args.proj_hidden_dim=64", "method_args.proj_output_dim=32",
          "method_args.pred_hidden_dim=64", "method_args.momentum_base=0.5", "method_args.mask_lr=null",
          "engine.lr=0.001", "data.min_scale=1.0",
          "engine.optimizer=adamw"]  # the recipe's LARS is refused at stages 1-3 (flat partitions)
CASES["adios_byol_simultaneous"] = ("adios_vit_tiny", [*_ADIOS, "method_args.mode=simultaneous"])
CASES["adios_byol_alternating"] = ("adios_vit_tiny", [*_ADIOS, "method_args.mode=alternating"])
CASES["adios_byol_frozenpatch"] = ("adios_vit_tiny", [*_ADIOS, "method_args.mode=simultaneous",
                                                      "method_args.freeze_patch_embed=true"])

RUNS = [(f"{case}_z{stage}", case, stage, []) for case in CASES for stage in (0, 3)
        if not (case == "adios_byol_alternating" and stage == 3)]  # refused at stage 3 (tested in-process)
RUNS += [("extrema_z2", "extrema", 2, []), ("mst_z1", "mst", 1, []),
         ("adios_byol_alternating_z2", "adios_byol_alternating", 2, [])]  # its side optimizer, in post_step
# ZeRO-3 runs stopped after STEPS // 2 steps (OUT/<case>_resume_first.*), copied for a resume on one
# rank (OUT/<case>_resume_to1), then resumed on both ranks (OUT/<case>_resume.*).
RESUMED = ("extrema", "mst")
# MAE started from an official-format weights file (engine.init_from, OUT/mae_official.pth: MAE built with
# seed 123).
INIT_FROM = [("mae_init_z0", 0), ("mae_init_z3", 3)]


def config(case: str, stage: int, *extra: str):
    from fastmask.engine.config import load_config
    recipe, overrides = CASES[case]
    return load_config(recipe, [*_COMMON, *overrides, f"engine.zero_stage={stage}", *extra])


def _run(out: Path, name: str, cfg, tag: str = "") -> None:
    """Train run `name` (resuming when OUT/name holds a checkpoint); rank 0 writes OUT/name+tag .json and
    .pt."""
    from fastmask.engine.trainer import pretrain
    from fastmask.engine.zero import gathered
    from fastmask.methods import build_method

    built = {}

    def keep(c):
        built["method"] = build_method(c)
        if c.engine.zero_stage == 0 and int(os.environ["RANK"]) == 0:  # the initial state, for "did it move"
            torch.save(built["method"].state_dict(), out / f"{name}{tag}_init.pt")
        return built["method"]

    t0 = time.perf_counter()
    result = pretrain(cfg, out=out / name, method_factory=keep, progress=False)
    method = built["method"]
    with gathered(list(method.parameters())):
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in method.state_dict().items()}
    if int(os.environ["RANK"]) == 0:
        torch.save(state, out / f"{name}{tag}.pt")
        (out / f"{name}{tag}.json").write_text(json.dumps({"losses": result.losses,
                                                           "resumed_from": result.resumed_from,
                                                           "seconds": time.perf_counter() - t0}))


def main() -> None:
    from fastmask.methods import build_method

    out, only = Path(sys.argv[1]), set(sys.argv[2:])
    for name, case, stage, extra in RUNS:
        if not only or case in only:
            _run(out, name, config(case, stage, *extra))
    if only:
        return
    if int(os.environ["RANK"]) == 0:
        torch.manual_seed(123)
        official = build_method(config("mae", 0)).official_state_dict()
        torch.save({"model": official}, out / "mae_official.pth")
    torch.distributed.barrier()
    for name, stage in INIT_FROM:
        _run(out, name, config("mae", stage, f"engine.init_from={out / 'mae_official.pth'}"))
    for case in RESUMED:
        name = f"{case}_resume"
        _run(out, name, config(case, 3, f"engine.stop_at={STEPS // 2}"), tag="_first")
        # the half-way checkpoint, for a resume on one rank (the test's process)
        if int(os.environ["RANK"]) == 0:
            shutil.copytree(out / name, out / f"{name}_to1")
        torch.distributed.barrier()
        _run(out, name, config(case, 3))  # resumes from the checkpoint the first run left


if __name__ == "__main__":
    main()
