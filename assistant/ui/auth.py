"""UI login accounts: a JSON users file of scrypt password hashes, each with its own random salt.

The file never holds a password. It is written atomically and re-read when it changes on disk, so
`bedside users add` takes effect on a running server without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from pathlib import Path
from typing import Any

from assistant.errors import BedsideError
from assistant.fileio import atomic_write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
FIRST_ACCOUNT = "admin"

# scrypt cost: n=2**14, r=8 needs 16 MiB and about 50 ms per check on one core, the interactive-login
# setting recommended in the scrypt paper (Percival, 2009).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32
SALT_BYTES = 16


def hash_password(password: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R,
                  p: int = SCRYPT_P) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * 2,
                          dklen=KEY_BYTES)


def validate_username(name: str) -> str:
    if not USERNAME.match(name or ""):
        raise BedsideError(f"user name {name!r} is invalid; use 1-64 letters, digits, '.', '_', '@' or '-', "
                           "starting with a letter or digit")
    return name


def validate_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise BedsideError(f"the password has {len(password)} characters; use at least {MIN_PASSWORD_CHARS}")
    if len(password) > MAX_PASSWORD_CHARS:
        raise BedsideError(f"the password has {len(password)} characters; use at most {MAX_PASSWORD_CHARS}")
    return password


def generate_password() -> str:
    """Return a random password of about 128 bits, URL-safe so it survives copy and paste."""
    return secrets.token_urlsafe(16)


class UserStore:
    """The accounts in one users file; `verify` is the login check the UI hands to Gradio."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._users: dict[str, dict[str, Any]] = {}
        self._loaded_stamp: tuple[int, int] | None = None
        # checked against when the user name is unknown, so a miss costs the same time as a wrong password
        self._decoy = {"salt": secrets.token_hex(SALT_BYTES), "hash": "00" * KEY_BYTES,
                       "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}

    def exists(self) -> bool:
        return self.path.is_file()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BedsideError(f"users file {str(self.path)!r} cannot be read ({err}); fix or delete it and "
                               "recreate accounts with `bedside users add NAME`") from err
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, dict) or data.get("format") != FORMAT_VERSION:
            raise BedsideError(f"users file {str(self.path)!r} is not a bedside users file (format "
                               f"{FORMAT_VERSION}); fix or delete it and recreate accounts with "
                               "`bedside users add NAME`")
        return users

    def users(self) -> dict[str, dict[str, Any]]:
        """Return the accounts, re-reading the file when its modification time or size changed."""
        with self._lock:
            stamp = self._stamp()
            if stamp != self._loaded_stamp:
                self._users = self._read()
                self._loaded_stamp = stamp
            return dict(self._users)

    def names(self) -> list[str]:
        return sorted(self.users())

    def verify(self, username: str, password: str) -> bool:
        """Check a login in constant time with respect to the stored hash."""
        try:
            users = self.users()
        except BedsideError:
            logger.exception("login rejected: the users file cannot be read")
            return False
        record = users.get(username) if isinstance(username, str) else None
        entry = record or self._decoy
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            return False
        try:
            computed = hash_password(password, bytes.fromhex(entry["salt"]), int(entry["n"]), int(entry["r"]),
                                     int(entry["p"]))
            expected = bytes.fromhex(entry["hash"])
        except (KeyError, TypeError, ValueError):
            logger.error("login rejected: the record of user %r in %s is malformed", username, self.path)
            return False
        matches = hmac.compare_digest(computed, expected)
        if record is None or not matches:
            logger.warning("failed login for user %r", username)
            return False
        logger.info("user %r logged in", username)
        return True

    def set_password(self, username: str, password: str, replace: bool = False) -> None:
        """Add an account, or change its password when `replace` is true; writes the file atomically."""
        validate_username(username)
        validate_password(password)
        with self._lock:
            users = self._read()
            if username in users and not replace:
                raise BedsideError(f"user {username!r} already exists in {str(self.path)!r}; "
                                   "pass --replace to set a new password")
            salt = secrets.token_bytes(SALT_BYTES)
            users[username] = {
                "algorithm": "scrypt",
                "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                "salt": salt.hex(),
                "hash": hash_password(password, salt).hex(),
                "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            self._write(users)

    def remove(self, username: str) -> None:
        with self._lock:
            users = self._read()
            if username not in users:
                raise BedsideError(f"user {username!r} not found in {str(self.path)!r}; "
                                   f"existing users: {', '.join(sorted(users)) or 'none'}")
            del users[username]
            self._write(users)

    def _write(self, users: dict[str, dict[str, Any]]) -> None:
        # atomic_write_json writes through mkstemp, so the file is created readable by its owner only
        atomic_write_json(self.path, {"format": FORMAT_VERSION, "users": users})
        self._users = users
        self._loaded_stamp = self._stamp()


def create_first_account(store: UserStore) -> tuple[str, str] | None:
    """Create the single local account when no users file exists; return (name, password) or None.

    The password is returned once for the caller to show; only its hash is kept.
    """
    if store.exists():
        return None
    password = generate_password()
    store.set_password(FIRST_ACCOUNT, password)
    logger.info("created users file %s with account %r", store.path, FIRST_ACCOUNT)
    return FIRST_ACCOUNT, password
