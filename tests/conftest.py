"""Test session set-up shared by every test file.

Without a GPU, Triton kernels run in Triton's CPU interpreter. `triton.jit` reads TRITON_INTERPRET
when a kernel module is imported, and the backend records decide their devices when fastmask.ops
imports, so the variable is set here, before any test module is collected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
