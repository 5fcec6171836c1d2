"""A diagnostic: where in a pretrained encoder does a fine-tuning gain (or loss) sit? learning.py's
fine-tuning (`learning.finetune_encoder`: same loop, head init and seeds) from a mix of a run's trained
encoder and its random init, by parameter name.

    python benchmarks/finetune_surgery.py RUN --out F.json                        # trained, as learning.py
    python benchmarks/finetune_surgery.py RUN --random --out F.json               # its random init
    python benchmarks/finetune_surgery.py RUN --reset cls_token,pos_embed,patch_embed --out F.json
    python benchmarks/finetune_surgery.py RUN --transplant patch_embed --out F.json
    python benchmarks/finetune_surgery.py RUN --pool cls --out F.json             # another pool

--reset P,P: the trained encoder with every parameter whose name starts with one of the prefixes put
back to its random-init value; --transplant P,P: the random init with those parameters taken from the
trained encoder. If resetting a part removes a fine-tuning deficit (and transplanting it alone brings
the deficit), that part carries it. Everything else (requires_grad, a fixed position embedding) is as
`fastmask.eval.load.load_encoder` hands the encoder out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("learning", Path(__file__).with_name("learning.py"))
learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning)


def mixed_encoder(run: Path, cfg, prefixes: tuple[str, ...], transplant: bool):
    """-> (encoder, names moved): the trained encoder with `prefixes` reset to the random init, or
    (transplant) the random init with `prefixes` from the trained encoder. ValueError, before any
    training, where a prefix names no parameter."""
    from fastmask.eval.load import load_encoder

    random_init, _ = load_encoder(None, cfg=cfg)
    if transplant and not prefixes:  # the random init, whole: the trained weights are not read
        return random_init, []
    trained, _ = load_encoder(run, cfg=cfg)
    dst, src = (random_init, trained) if transplant else (trained, random_init)
    source = dict(src.named_parameters())
    unmatched = [p for p in prefixes if not any(n.startswith(p) for n in source)]
    if unmatched:
        raise ValueError(f"no parameter of the encoder starts with {unmatched}; its names begin "
                         f"{sorted({n.split('.')[0] for n in source})}")
    moved = []
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if name.startswith(prefixes):
                p.copy_(source[name])
                moved.append(name)
    return dst, moved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a pretraining run folder (or checkpoint) of learning.py")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--random", action="store_true", help="the run's random init, whole")
    which.add_argument("--reset", default="", metavar="P,P", help="trained, these parameters at random init")
    which.add_argument("--transplant", default="", metavar="P,P", help="random init, these from the trained")
    ap.add_argument("--pool", choices=("cls", "mean"), default=None, help="default: learning.FINETUNE's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fastmask.eval.features import shapes_labeled_set
    from fastmask.eval.load import resolve_config

    cfg = resolve_config(args.run)
    prefixes = tuple(p for p in (args.reset or args.transplant).split(",") if p)
    if args.random:
        encoder, moved = mixed_encoder(args.run, cfg, (), transplant=True)
    else:
        try:
            encoder, moved = mixed_encoder(args.run, cfg, prefixes, transplant=bool(args.transplant))
        except ValueError as err:
            ap.error(str(err))
    start = "random init" if args.random else (
        f"trained, {args.reset} reset" if args.reset else
        f"random init, {args.transplant} from trained" if args.transplant else "trained")
    data = shapes_labeled_set()
    result = {"run": str(args.run), "start": start, "moved": moved, "command": " ".join(sys.argv),
              "meta": learning._meta(data, args.threads),
              "finetune": learning.finetune_encoder(encoder, cfg.data.img_size, data, args.seed, args.pool)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
