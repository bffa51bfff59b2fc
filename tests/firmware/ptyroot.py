# micropython -i ptyroot.py: a "chip" for mpremote on the unix port. Replaces the
# root filesystem with littlefs on a file-backed flash ($PTYROOT_IMG, 4 KiB blocks),
# so mpremote's absolute paths (/main.py, /lib/...) land in that flash image as they
# would on an ESP32, then leaves the REPL to mpremote (over a pty).
import os
import sys

import vfs

sys.path.insert(0, os.getenv("PTYROOT_FIRMWARE"))
from hw.sim import FileFlash  # noqa: E402

fl = FileFlash(os.getenv("PTYROOT_IMG"), 128)
vfs.VfsLfs2.mkfs(fl)
fs = vfs.VfsLfs2(fl)
vfs.umount("/")
vfs.mount(fs, "/")
os.chdir("/")
print("ROOT READY")
