"""Test session set-up shared by every test file.

Without a GPU, Triton kernels run in Triton's CPU interpreter. `triton.jit` reads TRITON_INTERPRET
when a kernel module is imported, and the backend records decide their devices when fastmask.ops
imports, so the variable is set here, before any test module is collected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every op that takes indices validates their values (distinct ids_keep, ids_restore permutations) in the
# tests; the default outside tests is off, since reading the values syncs with the host (the sync-free
# step test turns it off again).
os.environ.setdefault("FASTMASK_CHECK", "1")

# One intra-op thread per test process: the shapes here are tiny, and CI's 2 cores are shared with
# DataLoader workers, DALI threads and the multi-rank tests' second process; two spinning OpenMP
# threads under such contention made single tests tens of times slower. The environment carries the
# same count to every process a test starts (CLI runs, torchrun ranks, crash-and-resume children), so
# a child's kernels reduce in the same order as the test's in-process reference.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
