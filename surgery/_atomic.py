"""Quiet transformers while an export reloads what it wrote (its logs and progress bars off, restored
after). Everything else that was here, the filesystem safety of writes, is the one staged writer,
``_core.writer``."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading logs and progress bars (restored after)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as tlog

    bar = tlog.is_progress_bar_enabled()
    level = tlog.get_verbosity()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)  # the GGUF loader draws its own bar
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        tlog.set_verbosity(level)
        if bar:
            tlog.enable_progress_bar()
