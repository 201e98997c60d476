"""Saved models on the Hugging Face hub: `llmembed-predict` takes a repo id where it takes a folder,
and `llmembed-push` uploads a folder.

Which one a MODEL argument means, by a fixed rule: an existing folder is always the folder; anything
else of the form `owner/name` (optionally `@revision`) is a hub model repo. A missing folder that
cannot be a repo id (`./x`, `a/b/c`, an absolute path, a name the hub's own rule refuses such as
`run--1/model`) is reported as a missing folder. Every download is said on stderr.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from llmembed.classify.saved import SavedModelError, load_trained
from llmembed.extract.backbones import valid_repo_id

# The files a saved model is; nothing else in a repo is downloaded or uploaded.
MODEL_FILES = ["model.json", "head.safetensors", "README.md"]
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def repo_ref(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `model` names a hub repo by the rule above, else None."""
    if Path(model).expanduser().exists():
        return None
    m = _REPO_ID.match(model)
    if m is None or model.startswith(".") or ".." in model or not valid_repo_id(m["repo"]):
        return None
    return m["repo"], m["revision"]


def locate_model(model: str | os.PathLike) -> Path:
    """The folder of a saved model: `model` itself, or the local snapshot of a hub repo (downloaded
    unless HF_HUB_OFFLINE=1, which uses the local hub cache only)."""
    ref = repo_ref(str(model))
    if ref is None:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise SavedModelError(
                f"{model} is not a folder; give a model folder written by llmembed-classify or a "
                "Hugging Face hub repo id (owner/name[@revision])"
            )
        return path
    return Path(_download(*ref))


def _download(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    # Said every time: a mistyped local folder of the form owner/name would otherwise run a hub
    # model of that name without a word.
    print(f"model {at} from the Hugging Face hub (no folder {at} here)", file=sys.stderr)
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES)
    except GatedRepoError:
        raise SavedModelError(
            f"{at} is a gated repo: accept its terms on the hub, then log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise SavedModelError(
            f"{at}: no such folder here, and no such model repo on the hub (or it is private: log "
            "in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise SavedModelError(f"{at}: the repo has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        how = (
            "HF_HUB_OFFLINE=1 is set and it is not in the local hub cache"
            if constants.HF_HUB_OFFLINE
            else "the hub cannot be reached and it is not in the local hub cache"
        )
        raise SavedModelError(
            f"{at}: no such folder here; as a hub repo id, {how} ({constants.HF_HUB_CACHE}); "
            "download it once with the hub reachable, or give the model's folder"
        ) from None
    except _transport_errors() as err:
        raise SavedModelError(f"{at}: the download failed ({type(err).__name__}: {err})") from None


def push_model(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
) -> str:
    """Upload a saved model's files to a hub model repo (created if missing); returns the commit URL.
    The folder is checked (model.json against the weights' contract) before anything is sent."""
    from huggingface_hub import HfApi, constants

    if _REPO_ID.match(repo_id) is None or "@" in repo_id or not valid_repo_id(repo_id):
        raise SavedModelError(
            f"{repo_id!r} is not a hub repo id; give owner/name (letters, digits, '-', '_', '.'; "
            "no '--' or '..', at most 96 characters)"
        )
    _, meta = load_trained(folder)
    missing = [f for f in MODEL_FILES if not (Path(folder) / f).is_file()]
    if missing:
        raise SavedModelError(f"{folder} lacks {missing}; push the folder llmembed-classify wrote")
    if constants.HF_HUB_OFFLINE:
        raise SavedModelError("HF_HUB_OFFLINE=1 is set; unset it to push to the hub")
    local = sorted(
        {
            str(s["backbone"]["path"])
            for s in meta["sources"]
            if Path(str(s["backbone"].get("path", ""))).is_absolute()
        }
    )
    if local:
        print(
            f"note: model.json names local backbone paths {local}; they are published with it",
            file=sys.stderr,
        )
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise SavedModelError(
                f"{repo_id} exists and is public: --private does not change an existing repo; make "
                "it private on the hub first, or push to a new repo"
            )
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=MODEL_FILES,
            revision=revision,
            commit_message=message or f"llmembed model from {Path(folder).resolve().name}",
        )
    except _transport_errors() as err:
        raise SavedModelError(
            f"pushing {folder} to {repo_id} failed ({type(err).__name__}: {err}); log in with "
            "`hf auth login` or set HF_TOKEN to a token that may write to it"
        ) from None
    return info.commit_url


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a refused or failed hub request raises: the hub's HTTP errors, OS errors, and the HTTP
    client's own (huggingface_hub has used httpx and httpx2; either is looked up, not required)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    found: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(found)
