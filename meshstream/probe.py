# -*- test-case-name: tests.test_probe -*-
"""
What a file is, for its manifest's C{meta}: title, MIME type, duration,
bitrate and a summary of its streams.

L{describe} runs C{ffprobe} (from FFmpeg) on the file when it is installed
and turns its JSON into metadata with L{media_meta}, a pure function.  Without
ffprobe, or for a file ffprobe cannot read (or reads as something that is not
audio or video: text, a still image), the metadata falls back to a title
from the file name and a MIME type from its extension.  Nothing here fails
because of ffprobe: a missing, failing, hanging or babbling ffprobe only
means less metadata.

C{meta} keys written::

  title       str    --title, else the container's title tag, else the file name without extension
  mime_type   str    from the container (and its streams) when known, else from the extension
  duration    float  seconds                                    (media only)
  bitrate     int    bits per second, average over the file     (media only)
  streams     list   [{"type": "video", "codec": "h264", "width": 1280, "height": 720},
                      {"type": "audio", "codec": "aac", "sample_rate": 48000, "channels": 2}]

Blocking (a child process, waited for): for command-line tools, or a thread.
"""

from __future__ import annotations

import json
import math
import mimetypes
import os
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from meshstream.tracker.catalog import MAX_TITLE, clean_bitrate, clean_duration

#: Seconds ffprobe may take before it is killed (it reads headers, so a
#: healthy run takes well under a second even on a large file).
PROBE_TIMEOUT = 30.0
#: The largest ffprobe output read (the JSON of thousands of streams).
MAX_PROBE_OUTPUT = 4 * 1024 * 1024
MAX_STREAMS = 16
DEFAULT_MIME = "application/octet-stream"

# Demuxers that read files which are not audio or video.
_NON_MEDIA_FORMATS = frozenset({"tty", "bin", "xbin", "adf", "idf", "image2", "lavfi"})
# Codecs of the text-art demuxers above.
_NON_MEDIA_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})
# What WebM may carry; a Matroska file of nothing else is served as WebM.
_WEBM_CODECS = frozenset({"vp8", "vp9", "av1", "vorbis", "opus", "webvtt"})

# ffprobe's format_name -> (MIME with video, MIME of audio only).
_CONTAINERS: Mapping[str, tuple[str, str]] = {
    "mp3": ("audio/mpeg", "audio/mpeg"),
    "ogg": ("video/ogg", "audio/ogg"),
    "flac": ("audio/flac", "audio/flac"),
    "wav": ("audio/wav", "audio/wav"),
    "aac": ("audio/aac", "audio/aac"),
    "aiff": ("audio/aiff", "audio/aiff"),
    "amr": ("audio/amr", "audio/amr"),
    "avi": ("video/x-msvideo", "video/x-msvideo"),
    "flv": ("video/x-flv", "video/x-flv"),
    "mpegts": ("video/mp2t", "video/mp2t"),
    "mpeg": ("video/mpeg", "audio/mpeg"),
    "asf": ("video/x-ms-asf", "audio/x-ms-wma"),
    "mxf": ("application/mxf", "application/mxf"),
}
_ISO_BMFF = "mov,mp4,m4a,3gp,3g2,mj2"
_MATROSKA = "matroska,webm"


def _number(value: object) -> float | None:
    """ffprobe writes most numbers as strings; None unless finite."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _positive_int(value: object) -> int | None:
    n = _number(value)
    return int(n) if n is not None and n > 0 and n.is_integer() else None


def _tag(tags: object, name: str) -> str | None:
    """A tag by case-insensitive name (Matroska writes TITLE, MP4 title)."""
    if not isinstance(tags, dict):
        return None
    for key, value in tags.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def _clip_title(text: str | None) -> str | None:
    """Whitespace runs (control characters included) to one space; at most L{MAX_TITLE} characters."""
    if text is None:
        return None
    words = "".join(" " if not ch.isprintable() else ch for ch in text).split()
    title = " ".join(words)[:MAX_TITLE].strip()
    return title or None


def file_title(path: str) -> str:
    """The file name without its extension (or the whole name, if that leaves nothing)."""
    base = os.path.basename(path)
    return _clip_title(os.path.splitext(base)[0]) or _clip_title(base) or "untitled"


def guess_mime(path: str) -> str:
    return mimetypes.guess_type(os.path.basename(path), strict=False)[0] or DEFAULT_MIME


def _streams(probe: Mapping[str, Any]) -> list[dict[str, Any]]:
    streams = probe.get("streams")
    if not isinstance(streams, list):
        return []
    return [s for s in streams if isinstance(s, dict) and isinstance(s.get("codec_type"), str)]


def _is_cover(stream: Mapping[str, Any]) -> bool:
    disposition = stream.get("disposition")
    return isinstance(disposition, dict) and disposition.get("attached_pic") == 1


def _playable(streams: Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [
        s
        for s in streams
        if s["codec_type"] == kind and not _is_cover(s) and s.get("codec_name") not in _NON_MEDIA_CODECS
    ]


def _container_mime(probe: Mapping[str, Any], fmt: Mapping[str, Any], has_video: bool) -> str | None:
    name = fmt.get("format_name")
    if name == _ISO_BMFF:
        brand = (_tag(fmt.get("tags"), "major_brand") or "").strip().lower()
        if brand == "qt":
            return "video/quicktime"
        if brand.startswith("3g2"):
            return "video/3gpp2" if has_video else "audio/3gpp2"
        if brand.startswith("3g"):
            return "video/3gpp" if has_video else "audio/3gpp"
        return "video/mp4" if has_video else "audio/mp4"
    if name == _MATROSKA:
        codecs = {s.get("codec_name") for s in _streams(probe)}
        family = "webm" if codecs and codecs <= _WEBM_CODECS else "x-matroska"
        return f"video/{family}" if has_video else f"audio/{family}"
    if isinstance(name, str) and name in _CONTAINERS:
        with_video, audio_only = _CONTAINERS[name]
        return with_video if has_video else audio_only
    return None


def _stream_summary(stream: Mapping[str, Any]) -> dict[str, Any]:
    kind = stream["codec_type"]
    out: dict[str, Any] = {"type": kind[:32]}
    codec = stream.get("codec_name")
    if isinstance(codec, str):
        out["codec"] = codec[:64]
    if kind == "video":
        for key in ("width", "height"):
            n = _positive_int(stream.get(key))
            if n is not None:
                out[key] = n
    elif kind == "audio":
        for key in ("sample_rate", "channels"):
            n = _positive_int(stream.get(key))
            if n is not None:
                out[key] = n
    return out


def media_meta(probe: object, path: str, size: int, title: str | None = None) -> dict[str, Any]:
    """
    The C{meta} of the file at C{path} (C{size} bytes) from ffprobe's JSON
    (C{-print_format json -show_format -show_streams}, decoded), or from the
    name alone when C{probe} is None or not the answer of a media file.

    @param title: given by the publisher; wins over the container's.
    """
    fmt = probe.get("format") if isinstance(probe, dict) else None
    streams = _streams(probe) if isinstance(probe, dict) else []
    video, audio = _playable(streams, "video"), _playable(streams, "audio")
    format_name = fmt.get("format_name") if isinstance(fmt, dict) else None
    media = (
        isinstance(probe, dict)
        and isinstance(fmt, dict)
        and isinstance(format_name, str)
        and format_name not in _NON_MEDIA_FORMATS
        and not format_name.endswith("_pipe")  # still images
        and bool(video or audio)
    )
    meta: dict[str, Any] = {}
    if not media:
        meta["title"] = _clip_title(title) or file_title(path)
        meta["mime_type"] = guess_mime(path)
        return meta
    assert isinstance(probe, dict) and isinstance(fmt, dict)
    meta["title"] = _clip_title(title) or _clip_title(_tag(fmt.get("tags"), "title")) or file_title(path)
    meta["mime_type"] = _container_mime(probe, fmt, bool(video)) or guess_mime(path)
    duration = _number(fmt.get("duration"))
    if duration is None:
        durations = [_number(s.get("duration")) for s in video + audio]
        duration = max((d for d in durations if d is not None), default=None)
    duration = clean_duration(duration) if duration else None
    if duration is not None:
        meta["duration"] = duration
    bitrate = clean_bitrate(_positive_int(fmt.get("bit_rate")))
    if bitrate is None and duration:
        bitrate = clean_bitrate(round(size * 8 / duration)) if size else None
    if bitrate is not None:
        meta["bitrate"] = bitrate
    meta["streams"] = [_stream_summary(s) for s in (video + audio)[:MAX_STREAMS]]
    return meta


def run_ffprobe(path: str, ffprobe: str, timeout: float = PROBE_TIMEOUT) -> object | None:
    """
    ffprobe's decoded JSON about C{path}, or None if it could not run, failed,
    took longer than C{timeout} seconds (it is killed) or wrote something
    other than at most L{MAX_PROBE_OUTPUT} bytes of JSON.
    """
    # "file:" so that a name with a colon or a leading dash is read as a file.
    target = "file:" + os.path.abspath(path)
    argv = [ffprobe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams", target]
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except (OSError, ValueError):
        return None
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        output = proc.stdout.read(MAX_PROBE_OUTPUT + 1)
        if len(output) > MAX_PROBE_OUTPUT:
            proc.kill()
        code = proc.wait()
    finally:
        timer.cancel()
        proc.stdout.close()  # type: ignore[union-attr]
    if code != 0 or len(output) > MAX_PROBE_OUTPUT:
        return None
    try:
        result: object = json.loads(output)
    except (ValueError, RecursionError):
        return None
    return result


def find_ffprobe() -> str | None:
    """The ffprobe on C{PATH}, if any."""
    return shutil.which("ffprobe")


def describe(
    path: str, title: str | None = None, ffprobe: str | None = None, timeout: float = PROBE_TIMEOUT
) -> dict[str, Any]:
    """
    The C{meta} of the file at C{path} (see the module docstring).

    @param ffprobe: the ffprobe executable (see L{find_ffprobe}); None to
        describe the file from its name only.
    """
    probe = run_ffprobe(path, ffprobe, timeout) if ffprobe else None
    return media_meta(probe, path, os.path.getsize(path), title)
