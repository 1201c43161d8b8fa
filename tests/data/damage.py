"""Damages a file the way bit rot or a bad copy does: bytes changed in place, same size."""

import os


def flip_bytes(path: str, restore_mtime: bool = True, n: int = 16) -> bytes:
    """Inverts `n` bytes in the middle of the file at `path` (its size unchanged).

    Args:
      path: the file.
      restore_mtime: put the old mtime back (the damage is then invisible to size and
        mtime); else move the mtime on by a second (what a write does anyway, made certain
        on file systems with a coarse clock).
      n: how many bytes.

    Returns:
      The original bytes.
    """
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        old = f.read(n)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
    assert os.path.getsize(path) == st.st_size
    mtime = st.st_mtime_ns if restore_mtime else st.st_mtime_ns + 10**9
    os.utime(path, ns=(st.st_atime_ns, mtime))
    return old
