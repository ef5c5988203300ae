"""The Ray auth token on this machine is a secret: readable by its owner alone (docs/design.md rule 18).

Ray 2.60's `ray.init()`, starting a local cluster, writes `~/.ray/auth_token` with the process
umask (0644 on most systems: readable by every local user, who could then submit jobs). Before
a command starts a local cluster, `protect_auth_token` creates the token itself, 0600, in Ray's
format (64 hex characters, 256 bits from `secrets`), and narrows an existing one to 0600.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def token_configured_elsewhere() -> bool:
    """Ray reads RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, before ~/.ray/auth_token."""
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))


def starts_local_cluster(address: str | None) -> bool:
    return (address in (None, "", "local")) and not os.environ.get("RAY_ADDRESS")


def protect_auth_token(address: str | None = None, path: Path | None = None) -> Path | None:
    """Narrow an existing token file to 0600; before a local cluster starts, create a missing
    one 0600 (so Ray never writes it with the umask). Returns the file when there is one."""
    path = path or default_token_path()
    if path.exists():
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) and path.stat().st_uid == os.getuid():
            path.chmod(0o600)
        return path
    if token_configured_elsewhere() or not starts_local_cluster(address):
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # written meanwhile by another process: narrow it instead
        return protect_auth_token(address, path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path
