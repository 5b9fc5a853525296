"""Video containers through PyAV: open a source (fsspec file object, streamed), read its header,
and set up an output that keeps the container, codec family, size, frame rate and timestamps.

Sources are opened as fsspec file objects, so PyAV reads (and seeks, for an MP4 whose index
sits at the end) by ranged reads: an S3 video is never downloaded whole. Archive members come
as bytes (the archive reader returns them whole, at most --max-member-bytes).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import av

from operators.storage import filesystem

# container by extension: the output keeps the input's (FFmpeg muxer names)
MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}
# decoder name -> encoders of the same family, best first (what this FFmpeg build has is used)
ENCODERS = {
    "h264": ("libx264", "h264"),
    "hevc": ("libx265", "hevc", "libx264"),
    "vp8": ("libvpx",),
    "vp9": ("libvpx-vp9",),
    "av1": ("libsvtav1", "libaom-av1", "libdav1d"),
    "mpeg4": ("mpeg4",),
    "mjpeg": ("mjpeg",),
}
# when the family cannot be encoded here: what each container takes
FALLBACK = {"webm": "libvpx-vp9", "avi": "mpeg4"}
DEFAULT_CRF = 23


class VideoDefect(Exception):
    """The video cannot be opened or decoded: becomes a VIDEO_DEFECT row."""


@dataclass
class VideoInfo:
    container: str  # FFmpeg's format name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # decoder name, e.g. h264
    width: int
    height: int
    fps: float
    frames: int  # declared by the container (0 if it does not say)
    duration_s: float
    bit_rate: int
    rotation: int  # display matrix, degrees counterclockwise (FFmpeg's sign; 0, 90, 180, 270)
    audio_streams: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def open_source(source_url: str, storage_options: dict | None, data: bytes | None = None):
    """A seekable binary file object of the video (closed by the caller)."""
    if data is not None:
        return io.BytesIO(data)
    fs, path = filesystem(source_url, storage_options)
    return fs.open(path, "rb", block_size=4 * 2**20)


def open_container(f) -> av.container.InputContainer:
    """The input container; VideoDefect if the bytes are empty or not a video FFmpeg reads."""
    try:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(0)
    except (OSError, ValueError):
        size = -1
    if size == 0:
        raise VideoDefect("empty file (0 bytes)")
    try:
        container = av.open(f, mode="r")
    except av.error.FFmpegError as exc:
        raise VideoDefect(f"not a readable video container: {exc}") from None
    if not container.streams.video:
        container.close()
        raise VideoDefect("no video stream in the container")
    return container


def probe(container: av.container.InputContainer) -> VideoInfo:
    """What the header says: read without decoding a frame (quotes and prices use this)."""
    v = container.streams.video[0]
    cc = v.codec_context
    rate = v.average_rate or v.guessed_rate or v.base_rate
    fps = float(rate) if rate else 0.0
    if v.duration is not None and v.time_base:
        duration = float(v.duration * v.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    frames = int(v.frames or 0) or (round(duration * fps) if duration and fps else 0)
    return VideoInfo(
        container=container.format.name, codec=cc.name, width=int(cc.width), height=int(cc.height), fps=fps,
        frames=frames, duration_s=duration, bit_rate=int(v.bit_rate or container.bit_rate or 0),
        rotation=_rotation(v), audio_streams=len(container.streams.audio),
    )


def _rotation(stream) -> int:
    """The display rotation the header states, where PyAV shows it (an old `rotate` tag); PyAV
    18 gives the display matrix on decoded frames only: `first_frame_rotation`."""
    rotate = (stream.metadata or {}).get("rotate")  # the tag is clockwise; the matrix counterclockwise
    return -int(rotate) % 360 if rotate and rotate.lstrip("-").isdigit() else 0


def first_frame_rotation(container: av.container.InputContainer) -> int | None:
    """The display rotation carried by the first decoded frame (None if none decodes). Phones
    store portrait video turned, with this matrix; the output must carry it too."""
    try:
        for frame in container.decode(video=0):
            return int(round(frame.rotation)) % 360
    except av.error.FFmpegError:
        return None
    return None


def probe_source(source_url: str, storage_options: dict | None, data: bytes | None = None) -> VideoInfo:
    with open_source(source_url, storage_options, data) as f, open_container(f) as container:
        return probe(container)


def choose_encoder(codec: str, muxer: str) -> str:
    """The encoder of the source's family if this FFmpeg has it, else one the container takes."""
    for name in ENCODERS.get(codec, ()) + (FALLBACK.get(muxer, "libx264"), "libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise VideoDefect(f"no encoder for {codec} in {muxer}")


def encoder_options(encoder: str, crf: int) -> dict[str, str]:
    """Quality options: a constant-quality CRF where the encoder has one."""
    if encoder in ("libx264", "libx265"):
        return {"crf": str(crf), "preset": "veryfast"}
    if encoder in ("libvpx", "libvpx-vp9"):
        return {"crf": str(min(63, crf + 8)), "b": "0", "deadline": "realtime", "cpu-used": "8"}
    if encoder in ("libsvtav1", "libaom-av1"):
        return {"crf": str(min(63, crf + 12))}
    return {}


def add_video_output(out: av.container.OutputContainer, src, info: VideoInfo, crf: int,
                     keep_bit_rate: bool, b_frames: bool = True) -> av.video.stream.VideoStream:
    """The output video stream: same size, rate and time base as `src`; CRF quality, or the
    source's bit rate with `keep_bit_rate`; the display rotation copied."""
    muxer = out.format.name.split(",")[0]
    encoder = choose_encoder(info.codec, muxer)
    rate = src.average_rate or src.guessed_rate or 25
    options = {} if keep_bit_rate else encoder_options(encoder, crf)
    if not b_frames:  # segments joined by stream copy: decode order = display order, no dts before a cut
        options["bf"] = "0"
    stream = out.add_stream(encoder, rate=rate, options=options)
    stream.width, stream.height = info.width, info.height
    stream.pix_fmt = "yuv420p" if encoder != "mjpeg" else "yuvj420p"
    stream.time_base = src.time_base  # timestamps are copied as they are
    stream.codec_context.time_base = src.time_base
    if keep_bit_rate and info.bit_rate:
        stream.bit_rate = info.bit_rate
    elif encoder == "mpeg4":  # no CRF: a fixed quantiser of similar quality
        stream.codec_context.qscale = 4
        stream.codec_context.flags |= "QSCALE"
    if info.rotation:
        try:
            stream.set_display_rotation(info.rotation)
        except Exception:  # an older FFmpeg: the frames are kept as stored, the tag only is lost
            stream.metadata["rotate"] = str(info.rotation)
    return stream
