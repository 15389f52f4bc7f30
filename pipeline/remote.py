"""Network access for URL sources (fsspec): every operation bounded by a deadline.

A server that accepts a connection and never answers held the whole night for minutes. Every
network operation — connecting, each listing step, opening, each read of at most 1 MiB — runs
under :func:`deadline`; the protocol's own timeouts are set too where fsspec takes them.
"""

from __future__ import annotations

import io
import threading

# Extras of reidx that bring a protocol's optional packages (fsspec names the package for others).
PROTOCOL_EXTRAS = {"http": "reidx[http]", "https": "reidx[http]"}


class NetworkTimeout(TimeoutError):
    """A network operation of a URL source got no answer within its ``timeout_s``."""

    @staticmethod
    def message(what: str, timeout: float) -> str:
        return f"no answer from {what} within {timeout:g} s; check the server or raise timeout_s in the manifest"


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower()


def deadline(call, timeout: float, what: str):
    """``call()`` in a daemon thread, abandoned after ``timeout`` s: a silent server holds that thread, not the night."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="reidx-network", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NetworkTimeout(NetworkTimeout.message(what, timeout))
    error = outcome.get("error")
    if isinstance(error, TimeoutError) and not isinstance(error, NetworkTimeout):
        # the protocol's own timeout (set to the same timeout_s) fired just before the deadline:
        # the same event, so the same message
        raise NetworkTimeout(NetworkTimeout.message(what, timeout)) from error
    if error is not None:
        raise error
    return outcome.get("value")


def storage_options(uri: str, timeout: float) -> dict:
    """The protocol's own timeouts, where fsspec's implementation takes them (the deadline backs them up)."""
    scheme = protocol(uri)
    if scheme in ("http", "https"):
        import aiohttp  # ImportError: reported with the extra to install

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                    sock_read=timeout)}}
    if scheme in ("ftp", "sftp", "ssh"):
        return {"timeout": timeout}
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    return {}


def is_protocol_error(exc: BaseException) -> bool:
    return isinstance(exc, ImportError) or (isinstance(exc, ValueError) and "Protocol not known" in str(exc))


class DeadlineReader(io.RawIOBase):
    """A remote file whose every read and seek must finish within the timeout."""

    def __init__(self, f, timeout: float, what: str):
        self.f, self.timeout, self.what = f, timeout, what

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer) -> int:
        data = deadline(lambda: self.f.read(len(buffer)), self.timeout, self.what)
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset, whence=io.SEEK_SET):
        return deadline(lambda: self.f.seek(offset, whence), self.timeout, self.what)

    def tell(self):
        return self.f.tell()

    def close(self):
        if not self.closed:
            try:
                deadline(self.f.close, self.timeout, self.what)
            except Exception:  # noqa: BLE001 - closing a dead connection: nothing left to save
                pass
        super().close()
