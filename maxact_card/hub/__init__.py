"""Everything that speaks to the Hugging Face Hub.

- `client.py`: the connection (endpoint, token, cache, offline mode) and the client's errors, translated
  into ours without quoting a server reply;
- `download.py`: resolve a model (a Hub repo or a local folder) to files on disk, with their sha256,
  and read repo state;
- `publish.py`: publish the card section and its files as one commit, on a pull request.

The names below are the package's interface; `from maxact_card import hub` and `hub.publish(...)`.
"""

from maxact_card.hub.client import is_repo_id
from maxact_card.hub.download import (
    BIN_FALLBACK_NOTE,
    ResolvedModel,
    WeightFile,
    estimate_weight_bytes,
    read_repo_file,
    repo_weight_state,
    resolve_model,
)
from maxact_card.hub.publish import PR_TITLE_PREFIX, PublishOutcome, check_publish_target, publish

__all__ = [
    "BIN_FALLBACK_NOTE",
    "PR_TITLE_PREFIX",
    "PublishOutcome",
    "ResolvedModel",
    "WeightFile",
    "check_publish_target",
    "estimate_weight_bytes",
    "is_repo_id",
    "publish",
    "read_repo_file",
    "repo_weight_state",
    "resolve_model",
]
