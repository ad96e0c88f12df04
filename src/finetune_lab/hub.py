"""Is a model or dataset id on the Hugging Face Hub? One request with a short timeout, so that a mistyped id (or no
network) is reported in seconds, not after the libraries' retries (about 23 s for a dataset)."""

from __future__ import annotations

# Seconds to wait for the Hub's answer; an unknown id is answered at once, so only a silent network waits this long.
TIMEOUT_S = 5.0


def unavailable(repo_id: str, repo_type: str) -> str | None:
    """Why `repo_id` (a `model` or `dataset` repo) cannot be loaded from the Hub, or None when it is there (gated
    repos included: the loader reports access itself) or offline mode forbids asking (the loader then fails fast on
    its own)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=TIMEOUT_S)
    except (GatedRepoError, OfflineModeIsEnabled):
        return None
    except RepositoryNotFoundError:
        return "not found on the Hugging Face Hub (or private: log in with `hf auth login`)"
    except HFValidationError:
        return "not a valid Hugging Face Hub id"
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", "no status")
        return f"the Hugging Face Hub answered with an error ({status})"
    except Exception as error:  # noqa: BLE001 - connection refused, DNS failure, timeout: all mean no answer
        return f"the Hugging Face Hub did not answer within {TIMEOUT_S:g} s ({type(error).__name__})"
    return None
