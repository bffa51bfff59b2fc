# micropython ptyls.py <image>: every file in a flash image with its sha256
import binascii
import hashlib
import sys

import vfs

sys.path.insert(0, sys.argv[2])
from hw.sim import FileFlash  # noqa: E402

vfs.mount(vfs.VfsLfs2(FileFlash(sys.argv[1], 128)), "/img")


def walk(d):
    import os

    for name, kind, *_ in os.ilistdir(d):
        p = d + "/" + name
        if kind == 0x4000:
            walk(p)
        else:
            with open(p, "rb") as f:
                h = hashlib.sha256(f.read()).digest()
            print(p[4:], binascii.hexlify(h).decode())


walk("/img")
