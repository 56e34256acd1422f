"""`align push`: a finished stage to a Hugging Face Hub model repository - its adapter folder (with its
model card), or the adapter merged into its base (``merged``).

Everything that can be checked is checked before the first byte leaves: the folder is a complete align
stage (not collapsed, not unfinished), it holds a trained artifact and its card (written again from the
stage folder if it is missing, so it says what the manifest says), a token is there, and the machine is
not in offline mode. The upload is huggingface_hub's (create_repo, create_branch, upload_folder); align
adds only the checks and the card.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from align.artifacts import written_by_align
from align.model_card import CARD_FILE, write_card


class PushError(RuntimeError):
    """A push that cannot start: the message says why and what to do."""


def check_pushable(folder: Path) -> tuple[dict, Path]:
    """(the stage's manifest, its artifact folder with a card) or PushError, without any network."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file() or not written_by_align(folder):
        raise PushError(f"{folder} is not a finished align stage (no manifest.json align wrote)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("status") == "collapsed":
        raise PushError(
            f"{folder}: its checkup raised the collapse alarm "
            f"({'; '.join((manifest.get('checkup') or {}).get('collapse') or [])}); align will not publish it"
        )
    if manifest.get("status") != "complete":
        raise PushError(f"{folder}: the stage has not finished (status {manifest.get('status')!r})")
    artifact = folder / manifest.get("artifact", "")
    if manifest.get("artifact") not in ("adapter", "model") or not artifact.is_dir():
        raise PushError(f"{folder}: a {manifest.get('kind')} stage holds no trained model to publish")
    if not (artifact / CARD_FILE).is_file() or "align" not in (artifact / CARD_FILE).read_text(encoding="utf-8"):
        write_card(folder)  # a stage from before cards, or peft's blank template: ours, from the manifest
    return manifest, artifact


def hub_token() -> str:
    """The Hugging Face token (HF_TOKEN, or the one `huggingface-cli login` stored), else PushError."""
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise PushError("HF_HUB_OFFLINE is set: align push needs the network; run it where the Hub is reachable")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`, then push again")
    return token


def push(folder: Path, repo_id: str, merged: bool = False, private: bool = False, revision: str | None = None) -> str:
    """Uploads the stage in ``folder`` to ``repo_id`` (created if missing; ``revision``: a branch,
    created from main if missing); returns the commit's URL."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"{repo_id!r} is not a Hub repository id: write it as OWNER/NAME")
    manifest, artifact = check_pushable(folder)
    token = hub_token()
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        return _upload(api, folder, repo_id, manifest, artifact, merged, private, revision)
    except (HfHubHTTPError, httpx.HTTPError, OSError) as error:  # refused, unreachable, or the disk
        raise PushError(f"pushing {folder} to {repo_id} failed: {str(error).splitlines()[0][:300]}") from None


def _upload(api, folder: Path, repo_id: str, manifest: dict, artifact: Path, merged, private, revision) -> str:
    with tempfile.TemporaryDirectory(prefix="align-push-") as scratch:
        upload = artifact
        if merged and manifest["artifact"] == "adapter":
            from align.models.trained import merge

            upload = merge(folder, Path(scratch) / "merged")  # carries the card, as a merged model's
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(upload),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=f"align: {manifest.get('recipe')}/{manifest.get('stage')} ({manifest.get('kind')})"
            + (", merged" if upload is not artifact else ""),
        )
    return str(getattr(commit, "commit_url", commit))
