"""Sharing a saved model folder on the Hub: a thin layer over `huggingface_hub`.

The token comes from where `huggingface_hub` looks (`HF_TOKEN`, `huggingface-cli login`); rrm-hub never
prints it or writes it anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..errors import RRMError

SHARED_FILES = ("config.json", "model.safetensors", "rrm_head.safetensors", "README.md", "metrics.json",
                "robustness.png")
REQUIRED_FILES = ("config.json", "model.safetensors", "README.md")


def upload_plan(folder: str | Path) -> list[str]:
    """The files of `folder` that `push_folder` uploads, after checking that it is a complete model repo."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RRMError(f"'{folder}' is not a folder; give the --output-dir of a finished run")
    missing = [name for name in REQUIRED_FILES if not (folder / name).exists()]
    if missing:
        raise RRMError(f"'{folder}' lacks {', '.join(missing)}; it is not a finished rrm-hub output folder")
    try:
        json.loads((folder / "config.json").read_text())
        ModelCard.load(folder / "README.md")
    except (ValueError, OSError) as err:
        raise RRMError(f"'{folder}' has an unreadable config.json or README.md ({err}); re-run the recipe") from None
    return [name for name in SHARED_FILES if (folder / name).exists()]


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """Before a long run that ends with a push: the Hub is reachable and a token is there (whose user is returned);
    a one-line error otherwise, before any work is done."""
    from huggingface_hub.errors import LocalTokenNotFoundError

    try:
        return HfApi(token=token).whoami()["name"]
    except OfflineModeIsEnabled:
        raise RRMError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE=1 is set, so the run could not push when done; "
                       "unset it, or drop --push-to-hub and push later with recipes/push.py") from None
    except LocalTokenNotFoundError:
        raise RRMError(f"--push-to-hub {repo_id}: no Hugging Face token; log in (hf auth login) or set HF_TOKEN, "
                       "or drop --push-to-hub and push later with recipes/push.py") from None
    except (HfHubHTTPError, OSError) as err:
        raise RRMError(f"--push-to-hub {repo_id}: the Hub cannot be reached or refused the token "
                       f"({type(err).__name__}); check the connection and the token, or push later with "
                       "recipes/push.py") from None


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload robust model trained with rrm-hub",
    token: str | None = None,
) -> str:
    """Create `repo_id` if needed and upload the model files of `folder`; returns the commit URL."""
    files = upload_plan(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                   allow_patterns=files, commit_message=commit_message)
    except OfflineModeIsEnabled:
        raise RRMError("cannot push while HF_HUB_OFFLINE=1; unset it, or push later with recipes/push.py") from None
    except HfHubHTTPError as err:
        raise RRMError(f"the Hub refused the upload to '{repo_id}' ({type(err).__name__}); check the id and "
                       "that your token may write (huggingface-cli login)") from None
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)


def results_card(model: str | None, metrics: dict, dataset: str, revision: str | None = None) -> ModelCard:
    """The card of `model` (a Hub repo, through the Hugging Face cache; or a local folder) with the measured
    robustness as its `model-index` results; results of the same name and dataset are replaced, others kept."""
    from huggingface_hub import ModelCardData
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    from .cards import eval_results

    folder = Path(model) if model else None
    try:
        if folder is not None and folder.is_dir():
            card = ModelCard.load(folder / "README.md") if (folder / "README.md").exists() else None
        else:
            card = ModelCard.load(hf_hub_download(model, "README.md", revision=revision)) if model else None
    except (EntryNotFoundError, RepositoryNotFoundError):
        card = None  # a repo without a card gets a new one
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise RRMError(f"the card of '{model}' is not in the local Hugging Face cache; go online once, or give a "
                       "local folder") from None
    except (ValueError, yaml.YAMLError) as err:
        raise RRMError(f"the card of '{model}' has unreadable metadata ({str(err).splitlines()[0][:120]}); fix its "
                       "README.md first") from None
    if card is None:
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
    name = str(model or "model").rstrip("/").split("/")[-1]
    measured = eval_results(metrics, dataset)
    replaced = {(r.metric_name, r.dataset_type) for r in measured}
    kept = [r for r in card.data.eval_results or [] if (r.metric_name, r.dataset_type) not in replaced]
    card.data.eval_results = kept + measured
    card.data.model_name = card.data.model_name or name
    return card


def push_results(card: ModelCard, repo_id: str, *, create_pr: bool = True, revision: str | None = None,
                 token: str | None = None) -> str:
    """Upload `card` as the README.md of `repo_id` (as a pull request unless `create_pr` is False); returns its URL."""
    try:
        return str(card.push_to_hub(repo_id, token=token, revision=revision, create_pr=create_pr,
                                    commit_message="Add robustness results measured with rrm-hub"))
    except OfflineModeIsEnabled:
        raise RRMError("cannot push while HF_HUB_OFFLINE=1; unset it, or use --dry-run to see the card") from None
    except HfHubHTTPError as err:
        raise RRMError(f"the Hub refused the card for '{repo_id}' ({type(err).__name__}); check the id and that your "
                       "token may open pull requests (or write, with --no-pr)") from None
