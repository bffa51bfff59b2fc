# A flash chip in RAM for littlefs (MicroPython's extended block-device protocol),
# whose power can be cut after N program/erase operations: the Nth program writes only
# its first half (a torn page), and nothing after it reaches the "flash".
import vfs


class RamFlash:
    def __init__(self, blocks=128, bs=512):
        self.bs = bs
        self.n = blocks
        self.data = bytearray(blocks * bs)
        self.budget = None  # operations left before the power goes
        self.cut = False
        self.ops = 0
        self.erases = 0

    def _go(self):
        # -> True if this operation may happen in full
        if self.cut:
            return False
        self.ops += 1
        if self.budget is not None:
            if self.budget == 0:
                self.cut = True
                return False
            self.budget -= 1
        return True

    def reset(self):
        # a blank chip again, without a second 64 KiB allocation
        z = b"\xff" * self.bs
        for i in range(self.n):
            self.data[i * self.bs : (i + 1) * self.bs] = z
        self.budget = None
        self.cut = False
        self.ops = 0
        self.erases = 0

    def readblocks(self, n, buf, off=0):
        a = n * self.bs + off
        buf[:] = self.data[a : a + len(buf)]

    def writeblocks(self, n, buf, off=None):
        a = n * self.bs + (off or 0)
        if off is None:  # simple protocol: erase + write
            if not self._go():
                return 0
            self.erases += 1
            self.data[n * self.bs : (n + 1) * self.bs] = b"\xff" * self.bs
        elif not self._go():
            if self.cut and self.budget == 0:
                self.budget = -1
                h = len(buf) // 2
                self.data[a : a + h] = buf[:h]  # the torn half
            return 0
        self.data[a : a + len(buf)] = buf
        return 0

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:  # erase
            if self._go():
                self.erases += 1
                self.data[arg * self.bs : (arg + 1) * self.bs] = b"\xff" * self.bs
            return 0
        return 0

    def mount(self, at="/f", fresh=False):
        if fresh:
            vfs.VfsLfs2.mkfs(self)
        fs = vfs.VfsLfs2(self)
        vfs.mount(fs, at)
        return fs

    def umount(self, at="/f"):
        vfs.umount(at)
