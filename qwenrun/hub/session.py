"""The hub as huggingface_hub sees it: endpoint, offline mode, headers, errors in our words.

Contract: every environment variable that changes how qwenrun talks to the hub is read here,
when a function is called (huggingface_hub reads some of them once, at import): `HF_ENDPOINT`,
`HF_HUB_OFFLINE` (and `TRANSFORMERS_OFFLINE`), `HF_TOKEN` through huggingface_hub's own token
lookup (the cache's place is `config.hf_hub_cache`'s; the download timeout,
`HF_HUB_DOWNLOAD_TIMEOUT`, huggingface_hub's own, which `transfer` asks for). `hub_errors` turns
huggingface_hub's and httpx2's exceptions into `QwenrunError`s that name the repo and say what
to do (a hub that cannot be reached at all is a `HubUnreachableError`: the cache may do). The
token goes only to the hub's own origin (`headers_for`); nothing here logs or prints it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import errors as hf_errors

from qwenrun import __version__, errors

if TYPE_CHECKING:
    from huggingface_hub import HfApi

DEFAULT_ENDPOINT = "https://huggingface.co"


class HubUnreachableError(errors.DownloadError):
    """The hub could not be reached at all (no network, DNS, refused): the cache may still do."""


# ------------------------------------------------------------------------------ environment


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """`HF_ENDPOINT`, read now (huggingface_hub itself reads it once, at import); one that is
    not an http(s) URL is a UsageError that says so (not a failed connection to retry)."""
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    parts = urlsplit(endpoint)
    try:
        parts.port  # noqa: B018  # raises on a port out of range
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.UsageError(
            f"HF_ENDPOINT={endpoint!r} is not a URL",
            hint=f"set it to the hub's address, such as {DEFAULT_ENDPOINT}, or unset it",
        )
    return endpoint


def offline() -> bool:
    """`HF_HUB_OFFLINE=1` (or transformers' `TRANSFORMERS_OFFLINE`), read now."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def token_set() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def api() -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), library_name="qwenrun", library_version=__version__)


def hub_headers() -> dict[str, str]:
    """huggingface_hub's headers (token, user agent), asking for the raw bytes."""
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(library_name="qwenrun", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # sizes and Range offsets are of the raw bytes
    return headers


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def headers_for(url: str) -> dict[str, str]:
    """The hub's headers for a URL on the hub's own origin; none for any other host."""
    if not same_origin(url, hub_endpoint()):
        return {"Accept-Encoding": "identity"}
    return hub_headers()


# ------------------------------------------------------------------------------ errors


_AUTH_HINT = (
    "for a gated or private repo, accept its terms on the hub and set HF_TOKEN "
    "to an access token with read permission"
)


@contextlib.contextmanager
def hub_errors(repo: str, what: str) -> Iterator[None]:
    """Turn huggingface_hub's and httpx2's exceptions into qwenrun's, with the repo named."""
    try:
        yield
    except hf_errors.OfflineModeIsEnabled as err:
        raise errors.OfflineError(
            f"offline mode is on (HF_HUB_OFFLINE) and {what} needs the hub",
            hint="unset HF_HUB_OFFLINE, or use a model that is already downloaded (qwenrun list)",
        ) from err
    except hf_errors.GatedRepoError as err:
        raise auth_error(repo, err.response.status_code) from err
    except hf_errors.RepositoryNotFoundError as err:
        status = err.response.status_code
        if status in (401, 403):
            raise auth_error(repo, status) from err
        raise errors.ModelNotFoundError(
            f"no repo {repo} on the hub ({hub_endpoint()})",
            hint="check the name: it is owner/repo, as on the hub's page",
        ) from err
    except hf_errors.RevisionNotFoundError as err:
        raise errors.ModelNotFoundError(f"{repo} has no such revision") from err
    except hf_errors.RemoteEntryNotFoundError as err:
        raise errors.DownloadError(
            f"{what}: the hub lists a file of {repo} that it then does not serve",
            hint="run the pull again later; the repo may be in the middle of an update",
        ) from err
    except hf_errors.HfHubHTTPError as err:
        status = err.response.status_code
        if status in (401, 403):
            raise auth_error(repo, status) from err
        raise errors.DownloadError(
            f"{what}: the hub answered HTTP {status} for {repo}",
            hint="try again later; qwenrun resumes where it stopped",
        ) from err
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as err:
        raise HubUnreachableError(
            f"cannot reach the hub at {hub_endpoint()} ({what})",
            hint="check the network connection; downloaded models still work (qwenrun list)",
        ) from err
    except httpx2.TransportError as err:
        raise errors.DownloadError(
            f"{what}: the connection to the hub failed ({type(err).__name__})",
            hint="try again; qwenrun resumes where it stopped",
        ) from err


def auth_error(repo: str, status: int) -> errors.AuthError:
    if token_set():
        return errors.AuthError(
            f"the hub refused access to {repo} with the token in HF_TOKEN (HTTP {status})",
            hint="check that the token is valid, has read access, and that you accepted "
            "the repo's terms on its page",
        )
    return errors.AuthError(
        f"the hub refused access to {repo} without a token (HTTP {status}): "
        "it is gated or private, or does not exist",
        hint=_AUTH_HINT,
    )
