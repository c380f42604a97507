"""A trivial pyfuse3 + trio filesystem: one read-only file, ``hello``.

Run as ``python hellofs.py MOUNTPOINT``; prints ``ready`` once mounted and
exits when the mountpoint is unmounted.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

CONTENT = b"hello from a pyfuse3 + trio filesystem\n"
HELLO_INODE = pyfuse3.ROOT_INODE + 1


class HelloFs(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
        elif inode == HELLO_INODE:
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_nlink = 1
            entry.st_size = len(CONTENT)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"hello":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(HELLO_INODE)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"hello", await self.getattr(HELLO_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != HELLO_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return CONTENT[off:off + size]


def main(mountpoint: str) -> None:
    options = set(pyfuse3.default_options)
    options.add("fsname=hellofs")
    pyfuse3.init(HelloFs(), mountpoint, options)
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main(sys.argv[1])
