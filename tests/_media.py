"""
Small real media files for tests, made by the real ffmpeg (Debian package
C{ffmpeg}); tests that need them skip with L{SKIP_MEDIA} when it is missing.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet.utils import getProcessOutputAndValue

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
SKIP_MEDIA = None if FFMPEG and FFPROBE else "ffmpeg/ffprobe not installed (Debian package ffmpeg)"


async def make_clip(path: str, seconds: float = 2.0, title: str | None = None) -> None:
    """
    An MP4 of C{seconds}: 320x240 MPEG-4 video at 25 fps and a 44.1 kHz mono
    AAC tone, with C{title} in the container's tags.
    """
    assert FFMPEG is not None
    args = [
        "-hide_banner", "-loglevel", "error",
        "-f", "lavfi", "-i", f"testsrc=duration={seconds}:size=320x240:rate=25",
        "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
        "-c:v", "mpeg4", "-q:v", "5", "-c:a", "aac", "-movflags", "+faststart",
    ]  # fmt: skip
    if title is not None:
        args += ["-metadata", f"title={title}"]
    _, err, code = await getProcessOutputAndValue(FFMPEG, [*args, "-y", path], env=os.environ)
    if code != 0:
        raise RuntimeError(f"ffmpeg failed ({code}): {err.decode(errors='replace')}")
