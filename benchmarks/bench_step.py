"""Training-step benchmark (pretrain's step vs the official MAE step and the strong baseline): a thin script.

    python benchmarks/bench_step.py --model vit_base_patch16 --batch-size 8 --dtype fp32 --threads 2 \
        --ablation
    python benchmarks/bench_step.py --model vit_large_patch16 --batch-size 256 --dtype bf16 \
        --out benchmarks/results/step-$(date +%F)-h100-vitl.json --plot step.png

Same options as `fastmask bench`; the benchmark itself lives in `fastmask.bench.step`.
"""
import sys

from fastmask.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
