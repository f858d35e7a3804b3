"""``pretrained=True`` fails at once when its weights cannot be had (docs/design.md §2.8).

timm would try the Hugging Face hub (with retries, about 47 s offline) or warn and return a
randomly initialised model when a variant has no weights. Every model this package registers
calls :func:`check_pretrained` first: weights given locally (``pretrained_cfg_overlay=dict(
file=...)``), already in the local cache, or downloadable from a reachable host pass; anything
else raises RuntimeError naming the model and what to do.
"""

import os
import socket
from typing import Optional
from urllib.parse import urlparse

HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _hf_cached(hub_id: str, filename: Optional[str], cache_dir) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    names = (filename,) if filename else HF_FILES
    return any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision or None), str)
               for name in names)


def _url_cached(url: str, cache_dir) -> bool:
    import torch.hub

    folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    return os.path.isfile(os.path.join(folder, os.path.basename(urlparse(url).path)))


def _reachable(host: str, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") and "huggingface" in host:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_pretrained(variant: str, pretrained: bool, kwargs: dict) -> None:
    """Raise RuntimeError unless ``pretrained`` is False or the weights of ``variant`` can be
    loaded now (``kwargs``: the model function's keyword arguments, timm's overrides included)."""
    if not pretrained:
        return
    from timm.models import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
    if cfg.get("state_dict") is not None or cfg.get("file"):
        return
    hub, url, cache_dir = cfg.get("hf_hub_id"), cfg.get("url"), kwargs.get("cache_dir")
    if not hub and not url:
        raise RuntimeError(f"{variant} has no published pretrained weights: use pretrained=False, or pass your own "
                           f"with pretrained_cfg_overlay=dict(file='weights.safetensors')")
    if (hub and _hf_cached(hub, cfg.get("hf_hub_filename"), cache_dir)) or (url and _url_cached(url, cache_dir)):
        return
    hosts = ([urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname] if hub else []) + (
        [urlparse(url).hostname] if url else [])
    if any(_reachable(h) for h in hosts):
        return
    raise RuntimeError(f"{variant}: pretrained=True, but its weights ({hub or url}) are not in the local cache and "
                       f"{' / '.join(hosts)} cannot be reached (offline?). Download them where there is a network, "
                       f"pass them with pretrained_cfg_overlay=dict(file='weights.safetensors'), or use pretrained=False")
