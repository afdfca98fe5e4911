"""Downloading a file so that nothing half-written or unverified ever sits at its final path.

The bytes stream into `<dest>.part`; only a complete file whose sha256 matches is renamed onto
`dest` (a rename within one folder is atomic). Any failure removes the `.part` file.
"""

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path, expected, source):
    """Delete `path` and raise if its sha256 is not `expected` (None: nothing to check)."""
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        Path(path).unlink(missing_ok=True)
        raise DownloadError(f"{source}: sha256 {actual} does not match the expected {expected} (a damaged or "
                            "different file); nothing was kept")


def download(url, dest, sha256=None, timeout=10.0):
    """Fetch `url` into `dest`, verified against `sha256` when given.

    `timeout` bounds the connection and every read, so an offline machine fails in seconds.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            # Said once the server answers: a machine that cannot connect prints the error alone.
            print(f"minibert: downloading {url}", file=sys.stderr)
            total = int(response.headers.get("Content-Length") or 0)
            received = _copy_with_progress(response, out, total, dest.name)
        if total and received != total:
            raise DownloadError(f"{url}: connection closed after {received} of {total} bytes")
        check_sha256(part, sha256, url)
        os.replace(part, dest)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{url}: {getattr(reason, 'strerror', None) or reason or type(reason).__name__}") from None
    finally:
        part.unlink(missing_ok=True)
    return dest


def _copy_with_progress(response, out, total, label):
    received, shown = 0, 0.0
    while block := response.read(CHUNK):
        out.write(block)
        received += len(block)
        if time.monotonic() - shown > 1.0:
            shown = time.monotonic()
            of = f" of {total / 1e6:.1f} MB ({100 * received / total:.0f}%)" if total else " MB"
            print(f"\r  {label}: {received / 1e6:.1f}{of}", end="", file=sys.stderr, flush=True)
    if shown:
        print(file=sys.stderr)
    return received
