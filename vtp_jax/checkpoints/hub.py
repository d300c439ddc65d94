"""Released weights by Hugging Face hub id: "MiniMaxAI/VTP-Large-f16d64" wherever a folder goes.

The release hosts its models on the hub (MiniMaxAI/VTP-Small-f16d64, -Base-, -Large-). An id is
fetched once into the hub's cache (HF_HOME / HF_HUB_CACHE) with `huggingface_hub`, the optional
`[hub]` extra; HF_HUB_OFFLINE=1 uses the cache only. A string that names an existing folder, local
or gs://, is always that folder.
"""
from __future__ import annotations

import re

from vtp_jax import paths

RELEASES = {"S": "MiniMaxAI/VTP-Small-f16d64", "B": "MiniMaxAI/VTP-Base-f16d64", "L": "MiniMaxAI/VTP-Large-f16d64"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
FILES = ["config.json", "*.safetensors"]  # all a release folder needs


class HubError(FileNotFoundError):
    """A hub id that cannot be resolved; the message says what to do."""


def is_hub_id(name: str) -> bool:
    return bool(_REPO_ID.match(name or "")) and not paths.exists(name)


def resolve(name: str, field: str = "checkpoint", files=FILES) -> str:
    """`name` itself when it is a folder (or not an id); else the local snapshot of hub id `name`
    (the `files` patterns of it). `field` is the config field or argument that gave it, for the
    error a user can act on."""
    if paths.is_remote(name) or not is_hub_id(name):
        return name
    try:
        import huggingface_hub  # lazy: the optional [hub] extra, only for ids
    except ImportError:
        raise HubError(f"{field}={name!r} is no folder here; as a Hugging Face hub id it needs "
                       "`pip install 'vtp-jax[hub]'` (or download the folder and give its path)") from None
    try:
        return huggingface_hub.snapshot_download(name, allow_patterns=list(files))
    except Exception as e:  # offline without a cache, no such repo, no network, gated: one line for all
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        hint = ("HF_HUB_OFFLINE=1 and it is not in the hub cache: unset it once to download, or give a local folder"
                if offline else "check the id and the network (or HF_TOKEN), or give a local folder")
        raise HubError(f"{field}={name!r}: no such folder, and the hub id cannot be fetched "
                       f"({type(e).__name__}): {hint}") from None
