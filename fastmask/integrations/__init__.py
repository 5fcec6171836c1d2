"""apply/revert pairs that drop fastmask's fused ops into other libraries' models, one module per library:

    from fastmask.integrations.timm import apply_fastmask, revert_fastmask          # fastmask[timm]
    from fastmask.integrations.transformers import apply_fastmask, revert_fastmask  # fastmask[hf]

`apply_fastmask(model)` swaps the forward of the parts it recognizes for one that runs through
`fastmask.ops` and returns a `PatchReport` of what it patched and what it left alone (and why);
parameter names and state_dict keys never change, and `revert_fastmask(model)` restores the
original forwards. Importing an integration without its library raises an ImportError that names
the extra to install. Nothing here is imported by the rest of fastmask.
"""
from __future__ import annotations

import importlib


def require(library: str, extra: str, integration: str):
    """Import `library` for `integration`, or raise an ImportError saying which fastmask extra installs it."""
    try:
        return importlib.import_module(library)
    except ImportError as e:
        raise ImportError(f"fastmask.integrations.{integration} needs the {library!r} package, which is not "
                          f"importable here ({e}); install it with: pip install 'fastmask[{extra}]'") from e
