"""Hugging Face hub models: `owner/name[@revision]` resolved into the local hub cache, safetensors only.

`huggingface_hub.snapshot_download` fetches the files `rac.models.streaming.model_revision` counts (config,
safetensors, tokenizer and chat-template files), never pickles or remote code; the snapshot folder is named
after the resolved commit, which the run fingerprint records. Online or offline is the user's environment
(HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME, HF_TOKEN); rac sets none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# What a hub model is downloaded with: the files `rac.models.streaming.model_revision` counts, less
# remote code. Never pickles (*.bin, *.pt, *.pth, *.ckpt, *.pkl) and never *.py.
HUB_ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
]
# fnmatch's `*` matches `/`: weights in sub-folders (e.g. `original/`) are not the model's weights.
HUB_IGNORE_PATTERNS = ["*/*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.py"]
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w][\w./-]*))?$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: its local folder and, for a Hugging Face hub model, the repo id and commit sha."""

    path: Path
    repo_id: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        """`owner/name@commit` for a hub model, else the folder."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id else str(self.path)


def hub_snapshot_of(folder: Path | str) -> tuple[str, str] | None:
    """(repo_id, commit) when `folder` is a snapshot of the hub cache layout
    (`.../models--owner--name/snapshots/<commit>`), else None."""
    path = Path(folder)
    repo_folder = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo_folder.startswith("models--"):
        return None
    parts = repo_folder[len("models--"):].split("--")
    if len(parts) != 2 or not all(parts) or not re.fullmatch(r"[0-9a-f]{40}", path.name):
        return None
    return "/".join(parts), path.name


def _hub_download_hint(repo: str, rev: str | None) -> str:
    revision = f" --revision {rev}" if rev else ""
    # covers every HUB_ALLOW_PATTERNS file, so an offline run finds the snapshot complete
    includes = " ".join(f"--include '{p}'" for p in ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"))
    return f"`hf download {repo}{revision} {includes}`"


def resolve_hub(key: str, repo: str, rev: str | None) -> ModelRef:
    """Download (or find in the hub cache) the weights, config and tokenizer files of a hub model.

    huggingface_hub reads HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_TOKEN from the
    environment itself; rac sets none of them."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hub model {key!r} (no local folder of that name either)"
    cache = constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(repo, revision=rev, allow_patterns=HUB_ALLOW_PATTERNS,
                                   ignore_patterns=HUB_IGNORE_PATTERNS)
    except IncompleteSnapshotError as exc:
        raise FileNotFoundError(
            f"{where}: the cached snapshot in {cache} is incomplete and the hub cannot be reached; "
            f"set HF_HUB_OFFLINE=0 to complete it, or download it first with {_hub_download_hint(repo, rev)}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode():
            raise FileNotFoundError(
                f"{where} is not in the hub cache {cache} and HF_HUB_OFFLINE is set; set HF_HUB_OFFLINE=0 "
                f"or download it first with {_hub_download_hint(repo, rev)}"
            ) from exc
        raise FileNotFoundError(
            f"{where}: the hub at {constants.ENDPOINT} cannot be reached and the model is not in the hub cache "
            f"{cache}; check the network or HF_ENDPOINT, or download it first with {_hub_download_hint(repo, rev)}"
        ) from exc
    except GatedRepoError as exc:
        raise FileNotFoundError(
            f"{where} is gated: accept its terms on the hub, then log in (`hf auth login`) or set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(
            f"{where}: no such repository on {constants.ENDPOINT} (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN); check the id"
        ) from exc
    except RevisionNotFoundError as exc:
        raise FileNotFoundError(
            f"{where}: repository {repo!r} has no revision {rev!r}; give a branch, tag or commit sha that exists"
        ) from exc
    except HFValidationError as exc:
        raise ValueError(f"{where}: {repo!r} is not a valid hub repository id ({exc})") from exc
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileNotFoundError(f"{where}: the hub at {constants.ENDPOINT} answered: {first}") from exc
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ValueError(f"{where} has no config.json (not a transformers model repository)")
    if not any(path.glob("*.safetensors")):
        raise ValueError(
            f"{where} has no *.safetensors weights (rac never loads *.bin / *.pt pickles); use a repository "
            "with safetensors weights, or convert the model and give its local folder"
        )
    return ModelRef(path, repo, path.name)
