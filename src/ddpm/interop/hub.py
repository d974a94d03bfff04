"""Models on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION]`` as a checkpoint source, and uploads.

A Hub model is fetched with ``huggingface_hub.snapshot_download`` into the Hub client's own cache
(``HF_HUB_CACHE`` / ``HF_HOME``), limited to safetensors, JSON and Markdown files: pickled
weights are never downloaded, and no repository code is ever run (there is no
``trust_remote_code`` here). ``HF_HUB_OFFLINE=1`` reads the cache only. A snapshot is one of

* a ddpm checkpoint repository: a ``.safetensors`` file with ddpm metadata at its top, which
  every command that takes ``--checkpoint`` reads (:func:`resolve_checkpoint_source`);
* a diffusers ``DDPMPipeline`` repository (``model_index.json``), which ``ddpm import`` converts
  (:func:`diffusers_snapshot`).

Anything else, and a missing, gated or unreachable repository, is refused in one line.
``huggingface_hub`` comes with diffusers (the ``diffusers`` extra); it is imported only here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..checkpoint import read_metadata
from ..errors import CheckpointError, ConfigError

__all__ = ["HUB_SCHEME", "ALLOW_PATTERNS", "parse_hub_source", "hub_snapshot", "repository_kind",
           "resolve_checkpoint_source", "diffusers_snapshot", "openai_state_dict_source", "resolve_hub_args",
           "push_to_hub"]

HUB_SCHEME = "hf://"
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.md"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
INSTALL_HINT = "pip install huggingface_hub (it comes with pip install 'ddpm[diffusers]')"


def _hub():
    try:
        import huggingface_hub          # here: optional dependency (the hub extra)
    except ImportError:
        raise ConfigError(f"Hugging Face Hub models need the huggingface_hub package: {INSTALL_HINT}") from None
    return huggingface_hub


def parse_hub_source(text: str, *, bare: bool = False) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of ``hf://OWNER/NAME[@REVISION]``; with ``bare``, also of
    ``OWNER/NAME[@REVISION]`` when no local path of that name exists. None: a local path."""
    if text.startswith(HUB_SCHEME):
        rest = text[len(HUB_SCHEME):]
    elif bare and not Path(text).exists() and _REPO_ID.fullmatch(text.partition("@")[0]):
        rest = text
    else:
        return None
    repo_id, at, revision = rest.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (at and not revision):
        raise ConfigError(f"{text!r} is not a Hub model: write hf://OWNER/NAME or hf://OWNER/NAME@REVISION")
    return repo_id, revision or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a Hub model repository (downloaded, or from the cache)."""
    hub = _hub()
    from huggingface_hub import errors      # here: optional dependency (the hub extra)

    name = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(hub.snapshot_download(repo_id=repo_id, revision=revision, repo_type="model",
                                          allow_patterns=ALLOW_PATTERNS, local_files_only=_offline()))
    except errors.GatedRepoError:
        raise CheckpointError(f"{name} is gated: accept its conditions on huggingface.co/{repo_id}, then log in "
                              "(hf auth login)") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no such model repository on the Hub (or it is private: log in with "
                              "hf auth login)") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{name}: the repository has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        raise CheckpointError(f"{name} is not in the local Hub cache and {why}; download it once with a "
                              "network connection") from None
    except errors.HfHubHTTPError as exc:
        raise CheckpointError(f"the Hub refused {name}: {str(exc).strip().splitlines()[0]}") from None
    except errors.HTTPError as exc:                       # a proxy or connection failure the client re-raises
        raise CheckpointError(f"{name}: the Hub cannot be reached ({exc.__class__.__name__})") from None


def _ddpm_checkpoints(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            read_metadata(path)
        except CheckpointError:
            continue
        found.append(path)
    return found


def repository_kind(folder: Path, name: str) -> str:
    """``"diffusers"`` (a DDPMPipeline) or ``"ddpm"`` (a checkpoint file); anything else is refused."""
    index = folder / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            cls = None
        if cls == "DDPMPipeline":
            return "diffusers"
        raise CheckpointError(f"{name} is a diffusers {cls or 'pipeline'} repository; ddpm reads DDPMPipeline "
                              "repositories and ddpm checkpoints only")
    if _ddpm_checkpoints(folder):
        return "ddpm"
    config = folder / "config.json"
    what = "no ddpm checkpoint and no model_index.json"
    if config.is_file():
        try:
            meta = json.loads(config.read_text())
            what = f"a {meta.get('_class_name') or meta.get('model_type') or 'model of another kind'}"
        except (OSError, ValueError, AttributeError):
            pass
    raise CheckpointError(f"{name} holds {what}: not a ddpm checkpoint repository (a .safetensors file with "
                          "ddpm metadata) or a diffusers DDPMPipeline")


def resolve_checkpoint_source(text: str, *, bare: bool = False) -> str:
    """A ``--checkpoint`` value as a local path: unchanged when local, the checkpoint file of a Hub
    ddpm repository otherwise. A DDPMPipeline repository is refused with the import that converts it."""
    parsed = parse_hub_source(text, bare=bare)
    if parsed is None:
        return text
    folder = hub_snapshot(*parsed)
    if repository_kind(folder, text) == "diffusers":
        raise CheckpointError(f"{text} is a diffusers DDPMPipeline; convert it once with: "
                              f"ddpm import {text} --out FILE.safetensors")
    found = _ddpm_checkpoints(folder)
    if len(found) > 1:
        raise CheckpointError(f"{text} holds {len(found)} ddpm checkpoints ({', '.join(p.name for p in found)}); "
                              "ddpm reads repositories with one")
    return str(found[0])


def diffusers_snapshot(text: str, *, bare: bool = False) -> Path:
    """The snapshot folder of a Hub DDPMPipeline repository, for ``ddpm import``."""
    parsed = parse_hub_source(text, bare=bare)
    if parsed is None:
        return Path(text)
    folder = hub_snapshot(*parsed)
    if repository_kind(folder, text) == "ddpm":
        raise CheckpointError(f"{text} is already a ddpm checkpoint; give it to --checkpoint as it is")
    return folder


def openai_state_dict_source(text: str) -> str:
    """The local ``.safetensors`` file of a Hub repository holding an OpenAI (improved- or
    guided-diffusion) state dict converted to safetensors, for ``ddpm import --format openai
    hf://OWNER/NAME``; a local path unchanged. Only safetensors are fetched (:data:`ALLOW_PATTERNS`):
    a ``.pt`` is a pickle, and ddpm never loads one from the network."""
    parsed = parse_hub_source(text)
    if parsed is None:
        return text
    folder = hub_snapshot(*parsed)
    if (folder / "model_index.json").is_file():
        raise CheckpointError(f"{text} is a diffusers pipeline repository; import it with --format diffusers")
    ours = set(_ddpm_checkpoints(folder))
    found = [p for p in sorted(folder.glob("*.safetensors")) if p not in ours]
    if not found and ours:
        raise CheckpointError(f"{text} is already a ddpm checkpoint; give it to --checkpoint as it is")
    if not found:
        raise CheckpointError(f"{text} holds no .safetensors file; ddpm never loads a .pt (a pickle) from the Hub: "
                              "import a local copy you trust, or a repository of its safetensors conversion")
    if len(found) > 1:
        raise CheckpointError(f"{text} holds {len(found)} .safetensors files ({', '.join(p.name for p in found)}); "
                              "download the one you want (hf download) and import that file")
    return str(found[0])


def resolve_hub_args(args) -> None:
    """Replace an ``hf://`` ``--checkpoint`` (any command but import) or ``--init`` (train) by its local
    checkpoint file."""
    for name in ("checkpoint", "init"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith(HUB_SCHEME) and args.command != "import":
            setattr(args, name, resolve_checkpoint_source(value))


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, api=None) -> str:
    """Upload ``folder`` (an exported model, with its model card README.md) to the Hub model
    repository ``repo_id``, created when absent; the token is the usual login's. Returns its URL."""
    if not _REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"--push-to-hub {repo_id!r}: give OWNER/NAME")
    hub = _hub()
    from huggingface_hub import errors      # here: optional dependency (the hub extra)

    api = api if api is not None else hub.HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload a ddpm model (ddpm export)")
    except errors.LocalTokenNotFoundError:
        raise ConfigError("--push-to-hub needs a Hugging Face login: run hf auth login (or set HF_TOKEN); "
                          f"the exported folder {folder} is kept") from None
    except errors.HfHubHTTPError as exc:
        raise CheckpointError(f"the Hub refused the upload to {repo_id}: {str(exc).strip().splitlines()[0]}; "
                              f"the exported folder {folder} is kept") from None
    except (OSError, errors.HTTPError) as exc:            # no network: a connection error, not an HTTP status
        raise CheckpointError(f"could not reach the Hub to upload to {repo_id} ({exc.__class__.__name__}); "
                              f"the exported folder {folder} is kept") from None
    return f"https://huggingface.co/{repo_id}"
