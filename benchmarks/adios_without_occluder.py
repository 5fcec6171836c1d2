"""A diagnostic: `fastmask pretrain` with ADIOS's occluder switched off, which leaves its base SSL method
(SimCLR, BYOL or SimSiam per `method_args.ssl`) on the same views, encoder, heads, optimizer and
engine. Is a shortfall of ADIOS its occluder's, or its base method's on the same data and budget?

    python benchmarks/adios_without_occluder.py pretrain --config adios_tiny --steps 300 --out RUN \\
        data.dataset=shapes data.img_size=32 data.batch_size=64 \\
        method_args.num_masks=1 method_args.single_mask=true method_args.mode=simultaneous
    fastmask eval --checkpoint RUN

Every mask is zero (each "masked" view is the clean second view) and the penalty is zero; with
`num_masks=1, single_mask=true` the SSL loss is the base method's one pair, and `mode=simultaneous`
skips the occluder's own step (which would have nothing to learn). The occluder's weights stay in the
model, unused. Not a library option: the ADIOS paper's baselines are the plain methods, and this
only patches the method class in this process.
"""
from __future__ import annotations

import sys

from fastmask.cli import main
from fastmask.methods.adios import ADIOS


def _no_masks(self, x1, x2):
    rows = x2.shape[0] * (2 if self.views == 2 else 1)  # SimSiam masks both views
    return x2.new_zeros(rows, self.args.num_masks, *x2.shape[-2:])


def _no_penalty(self, masks):
    return masks.new_zeros(()), masks.new_zeros(masks.shape[:2])


if __name__ == "__main__":
    ADIOS._masks, ADIOS._penalty = _no_masks, _no_penalty
    sys.exit(main(sys.argv[1:]))
