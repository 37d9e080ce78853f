"""Helpers shared by the reliability tests (issue 6; test_odd_images.py, test_odd_names.py,
test_folder_shapes.py, test_skip_and_strict.py, test_interruptions.py, test_environment_faults.py,
test_bundle_safety.py) and test_compare.py: colours, the tiny CLI options, image builders and the
forked `headstart` child.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
TINY = ("--strategy", "feature-extraction", "--backbone", "small_cnn", "--weights", "none", "--image-size", "32",
        "--workers", "0")


def _rgb(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (4, 4)).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), RED).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


BOMBS = {
    "png_10_gigapixel.png": _png_header_only(100_000, 100_000),
    "png_just_over.png": _png_header_only(9_460, 9_460),  # 89,491,600: just above MAX_PIXELS
    "jpeg.jpg": _jpeg_claiming(65_500, 65_500),
    "gif.gif": _gif_claiming(65_535, 65_535),
    "bmp.bmp": _bmp_claiming(100_000, 50_000),
}


def _png(path: Path, colour=(10, 20, 30), size=(4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "PNG")
    return path


class CliChild:
    """`headstart ARGS` in a child process forked from this one, so torch is not imported again (about
    7 s a process here). It is a real process with its own pid, so real signals kill or interrupt it.
    One torch thread, as in this process, so both run the same kernels: features compare bitwise.
    """

    def __init__(self, tmp_path: Path, *args, fault: str | None = None, new_session: bool = False):
        import tempfile

        self.out = Path(tempfile.mkstemp(dir=tmp_path, prefix=".stdout-")[1])
        self.err = Path(tempfile.mkstemp(dir=tmp_path, prefix=".stderr-")[1])
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                import signal

                # A fresh interpreter's Ctrl-C behaviour, whatever handler an earlier test left in pytest.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if new_session:
                    os.setsid()  # its own process group, as a shell gives a foreground command
                os.dup2(os.open(self.out, os.O_WRONLY), 1)
                os.dup2(os.open(self.err, os.O_WRONLY), 2)  # decoding workers write here too
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                os.environ.pop("HEADSTART_FAULT", None)
                if fault:
                    os.environ["HEADSTART_FAULT"] = fault
                from headstart import cli, faults

                faults._counts.clear()
                import torch

                torch.set_num_threads(1)
                code = cli.main([str(a) for a in args])
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        import time

        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"headstart child did not finish in {timeout}s: {self.err.read_text()}")
            time.sleep(0.05)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out, err = self.out.read_text(errors="replace"), self.err.read_text(errors="replace")
        self.out.unlink()
        self.err.unlink()
        return code, out, err
