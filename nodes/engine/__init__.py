"""The ComfyUI bridge of the stream engine: settings, streams, the engine's model clone, the run.

Node modules import the engine only from here; the algorithms themselves are in
``streamv2v_core`` (pure torch).
"""
from .bank_wrappers import patched_clone
from .compiled_unet import COMPILE_MODES, CUDA_GRAPHS, DEFAULT, OFF, compile_mode
from .conditioning import check_frame_rows
from .run import run_stream
from .settings import (BANK_START_CHOICES, CONTINUE, FRESH, IN_FLIGHT, StreamSettings, check_frame_size,
                       check_stream_inputs, smallest_frame)
from .streams import STREAMS, bank_status, banks_of, stream_of

__all__ = ["BANK_START_CHOICES", "COMPILE_MODES", "CONTINUE", "CUDA_GRAPHS", "DEFAULT", "FRESH", "IN_FLIGHT", "OFF",
           "STREAMS", "StreamSettings", "bank_status", "banks_of", "check_frame_rows", "check_frame_size",
           "check_stream_inputs", "compile_mode", "patched_clone", "run_stream", "smallest_frame", "stream_of"]
