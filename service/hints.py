"""The "how to fix it" part of error messages, worded for whoever made the request.

A request the ``seqtune`` CLI made (it sends ``User-Agent: seqtune-cli/<version>``,
``seqtune.client.CLI_AGENT``; not imported here, since the service does not load the HTTP
client) gets the command to type (``seqtune studies``); any other caller gets the REST call
(``GET /v1/studies``). The service's request dependency
(``service.api.deps.caller``) sets ``CALLER`` from the header; code outside a request (a worker
calling the store) gets the REST wording.

Every hint is one row of ``HINTS``, so the two wordings of one hint sit side by side.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Literal

Caller = Literal["cli", "rest"]
CALLER: ContextVar[Caller] = ContextVar("seqtune_caller", default="rest")

# name -> (CLI wording, REST wording); ``{name}``-style fields are filled by ``hint``.
HINTS: dict[str, tuple[str, str]] = {
    "list_studies": ("list yours with `seqtune studies`", "list yours with GET /v1/studies"),
    "delete_study": ("`seqtune delete {study}`", "DELETE /v1/studies/{study}"),
    "stop_or_force": (
        "stop it first (`seqtune stop {study}`) or pass --force",
        "stop it first (PATCH status=stopped) or pass ?force=true",
    ),
    "trial_model": (
        "pick a trial of `seqtune best {study}` and download it with "
        "`seqtune model {study} --trial N`",
        "pick a trial of GET /v1/studies/{study}/best and download "
        "/v1/studies/{study}/trials/{{number}}/model",
    ),
    # The CLI has no verb for the budget yet: both wordings name the REST call.
    "raise_budget": (
        'raise it with PATCH {{"n_trials": ...}} (Client.update(name, n_trials=...)) first',
        'raise it with PATCH {{"n_trials": ...}} first',
    ),
    "list_datasets": (
        "list yours with `seqtune datasets list`",
        "list yours with GET /v1/datasets",
    ),
    "upload_dataset": (
        "upload it with `seqtune datasets upload FILE --name NAME` and write `name: NAME`",
        "upload it with POST /v1/datasets and use the id (or the name) it returns",
    ),
    "dataset_name_taken": (
        "choose another with --name, or delete the old one first "
        "(`seqtune datasets delete {dataset}`)",
        "send another name, or DELETE /v1/datasets/{dataset} first",
    ),
    "dataset_in_use": (
        "delete them first (`seqtune delete NAME`) or pass --force",
        "delete them first (DELETE /v1/studies/NAME) or pass ?force=true",
    ),
    "list_models": ("list yours with `seqtune models list`", "list yours with GET /v1/models"),
    "upload_model": (
        "upload it with `seqtune models upload FILE` and use the id it prints",
        "upload it with POST /v1/models and use the id it returns",
    ),
    "stop_studies": (
        "stop them first (`seqtune stop NAME`), then pass --force",
        "stop them first (PATCH /v1/studies/NAME status=stopped), then pass ?force=true",
    ),
}


def hint(name: str, **fields: object) -> str:
    """The hint ``name`` of ``HINTS`` in the current caller's wording, its fields filled in.
    KeyError for a name with no row."""
    cli, rest = HINTS[name]
    return (cli if CALLER.get() == "cli" else rest).format(**fields)


def caller_of(user_agent: str | None) -> Caller:
    """``"cli"`` for the ``seqtune`` CLI's User-Agent, else ``"rest"``."""
    return "cli" if (user_agent or "").startswith("seqtune-cli/") else "rest"
