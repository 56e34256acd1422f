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
from align.model_card import write_card


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
    write_card(folder)  # from the manifest, unless the README.md there is the user's own (then it goes as it is)
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
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise PushError(f"{repo_id!r} is not a Hub repository id: {error}") from None
    if repo_id.count("/") != 1:
        raise PushError(f"{repo_id!r} is not a Hub repository id: write it as OWNER/NAME")
    manifest, artifact = check_pushable(folder)
    if merged and manifest.get("kind") == "rm":
        raise PushError(f"{folder}: a reward model is published as its adapter and score head; drop --merged")
    token = hub_token()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    network = _network_errors()
    try:
        return _upload(api, folder, repo_id, manifest, artifact, merged, private, revision)
    except (HfHubHTTPError, *network, OSError) as error:  # refused, unreachable, or the disk
        raise PushError(f"pushing {folder} to {repo_id} failed: {str(error).splitlines()[0][:300]}") from None


def _network_errors() -> tuple[type[Exception], ...]:
    """The base errors of the HTTP clients huggingface_hub may raise from (httpx2 in recent versions,
    httpx or requests in older ones): a network failure, said in one line."""
    import importlib

    found = []
    for name, error in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(name), error))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _existing_files(api, repo_id: str, private: bool, revision: str | None) -> list[str] | None:
    """The files the repository (or branch) holds now, None when it does not exist; a public repository
    is refused when a private one was asked for (create_repo would leave it public)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return None
    if private and not info.private:
        raise PushError(f"{repo_id} exists and is public: --private would not make it private; make it so first")
    try:
        return api.list_repo_files(repo_id, repo_type="model", revision=revision)
    except RevisionNotFoundError:
        return []


def _upload(api, folder: Path, repo_id: str, manifest: dict, artifact: Path, merged, private, revision) -> str:
    existing = _existing_files(api, repo_id, private, revision)
    adapter = manifest["artifact"] == "adapter" and not merged  # else a whole model (merged, or full fine-tuning)
    clash = "config.json" if adapter else "adapter_config.json"
    if existing and clash in existing:  # an adapter beside a whole model, or back: a repo holding both is no model
        held, pushing = ("a whole model", "an adapter") if adapter else ("an adapter", "a whole model")
        raise PushError(
            f"{repo_id}{'@' + revision if revision else ''} holds {held} already; push {pushing} to another "
            "repository or branch (--revision)"
        )
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
