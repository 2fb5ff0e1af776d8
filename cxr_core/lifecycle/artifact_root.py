"""Experiments whose artifacts go where the tracking setup says.

An experiment keeps the artifact root it was created with. After a local demo (sqlite,
artifacts in a local folder) the same experiment seen through a tracking server that proxies
artifacts to S3 still points at the local folder: every new artifact would silently bypass
S3. :func:`experiment_for_tracking` detects that and picks an experiment that fits.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def is_local_root(location: str | None) -> bool:
    """A folder on whichever machine happens to log (file: URI or plain path)."""
    if not location:
        return False
    scheme = urlparse(location).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and location[1:2] == ":")  # C:\\...


def experiment_for_tracking(client: Any, name: str, tracking_uri: str,
                            remote_label: str = "server") -> str:
    """``name``, or ``name-<remote_label>`` when ``name`` exists with a local artifact root
    while a tracking server (which stores artifacts itself, e.g. in S3) is in use. Creating
    the alternative is left to the caller (ensure_experiment)."""
    if not is_server(tracking_uri):
        return name
    exp = client.get_experiment_by_name(name)
    if exp is None or not is_local_root(exp.artifact_location):
        return name
    alt = f"{name}-{remote_label}"
    other = client.get_experiment_by_name(alt)
    if other is not None and is_local_root(other.artifact_location):
        from cxr_core.errors import ConfigError

        raise ConfigError(
            f"experiments {name!r} and {alt!r} both keep artifacts in local folders "
            f"({exp.artifact_location}); set CXR_EXPERIMENT_NAME to a new name so the tracking "
            "server creates one whose artifacts go to its artifact store")
    log.warning("experiment %r keeps artifacts in %s, not in the tracking server's store: "
                "logging to %r instead (set CXR_EXPERIMENT_NAME to choose)", name,
                exp.artifact_location, alt)
    return alt
