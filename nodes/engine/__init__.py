"""The ComfyUI bridge of the stream engine: settings, streams, the engine's model clone, the run.

Node modules use only what is exported here; the algorithms themselves are in
``streamv2v_core`` (pure torch).
"""
from .conditioning import check_frame_rows
from .run import run_stream
from .settings import (BANK_START_CHOICES, CONTINUE, FRESH, IN_FLIGHT, StreamSettings, check_frame_size,
                       check_stream_inputs, smallest_frame)
from .streams import STREAMS, bank_status, banks_of, stream_of

__all__ = ["BANK_START_CHOICES", "CONTINUE", "FRESH", "IN_FLIGHT", "STREAMS", "StreamSettings", "bank_status", "banks_of",
           "check_frame_rows", "check_frame_size", "check_stream_inputs", "run_stream", "smallest_frame", "stream_of"]
