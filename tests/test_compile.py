"""The compiled UNet path (``nodes/compiled_unet.py``): modes, old workflows' booleans, and which errors fall back.

Compiled with dynamo's ``eager`` backend (tracing only: the same guards, graphs and error paths as inductor,
without generating code). Errors are injected by test patches inside the compiled call.
"""
import logging

import pytest
import torch

import comfy.model_management
from host import tiny_models
from streamv2v.nodes import compiled_unet
from streamv2v.nodes.compiled_unet import CUDA_GRAPHS, DEFAULT, OFF, compile_mode, device_mode
from streamv2v.nodes.loop_node import StreamV2VLoop
from streamv2v.nodes.sampler_nodes import StreamV2VSampler
from streamv2v.nodes.stream_engine import StreamSettings, run_stream


@pytest.fixture(scope="module")
def parts():
    return tiny_models.tiny_sd15_model(0), tiny_models.tiny_taesd_vae(1), tiny_models.random_conditioning("sd15", 1)


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    # pytest captures every log record; torch's structured trace log at DEBUG makes tracing ~80x slower.
    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", "eager")
    compiled_unet.forget_compiled()
    yield
    compiled_unet.forget_compiled()


def frames(n=2):
    return list(torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(0)))


def run(model, parts, mode=DEFAULT, n=2):
    _, vae, cond = parts
    outputs = []
    run_stream(model, cond, cond, vae, iter(frames(n)), StreamSettings(seed=1, compile=mode),
               lambda i, image: outputs.append(image))
    return torch.stack(outputs)


def raising(error: BaseException):
    """A model whose self-attention patch raises ``error`` (inside the compiled UNet call)."""
    def patch(n, context, value, extra_options):
        raise error

    def build(model):
        clone = model.clone()
        clone.set_model_attn1_patch(patch)
        return clone
    return build


def test_modes_and_saved_booleans_map_onto_the_modes():
    assert [compile_mode(v) for v in (True, False, None, "off", "default", "CUDA graphs", "cuda graphs")] == \
        [DEFAULT, OFF, OFF, OFF, DEFAULT, CUDA_GRAPHS, CUDA_GRAPHS]
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_mode("fast")
    StreamSettings(compile=True).check()
    with pytest.raises(ValueError, match="compile must be one of"):
        StreamSettings(compile="fast").check()
    # ComfyUI skips its own list check for inputs that validate_inputs names: a saved boolean passes.
    for node in (StreamV2VSampler, StreamV2VLoop):
        assert node.validate_inputs(compile=True) is True and node.validate_inputs(compile=False) is True
        assert node.validate_inputs(compile=CUDA_GRAPHS) is True
        assert "compile must be one of" in node.validate_inputs(compile="fast")


def test_cuda_graphs_on_a_cpu_device_runs_default_mode_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        assert device_mode(CUDA_GRAPHS, "cpu") == DEFAULT
        assert device_mode(CUDA_GRAPHS, "cpu") == DEFAULT
    assert caplog.text.count("CUDA graphs need a CUDA device") == 1
    assert device_mode(CUDA_GRAPHS, "cuda") == CUDA_GRAPHS and device_mode(True, "cuda") == DEFAULT


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory (test)"),
    comfy.model_management.InterruptProcessingException(),
    ValueError("the model's own error (test)"),
    KeyboardInterrupt(),
], ids=["out of memory", "interrupt", "model error", "KeyboardInterrupt"])
def test_errors_inside_the_compiled_call_propagate_as_without_compile(parts, error, caplog):
    model = raising(error)(parts[0])
    for mode in (OFF, DEFAULT, DEFAULT):  # uncompiled, compiled, compiled again (not silently turned off)
        with pytest.raises(type(error)) as raised:
            run(model, parts, mode)
        assert raised.value is error
    assert "compiling the UNet failed" not in caplog.text


def test_a_shape_error_found_while_tracing_is_raised_as_the_eager_error(parts):
    """Dynamo reports a shape error met while tracing as its own TorchRuntimeError: the eager call raises it."""
    def bad(n, context, value, extra_options):
        return n, context[..., :3], value[..., :3]
    model = parts[0].clone()
    model.set_model_attn1_patch(bad)
    messages = []
    for mode in (OFF, DEFAULT):
        with pytest.raises(RuntimeError) as raised:
            run(model, parts, mode)
        assert type(raised.value) is RuntimeError
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


def test_an_out_of_memory_error_wrapped_in_a_compile_error_is_unwrapped(parts, monkeypatch):
    def backend(graph, example_inputs):
        raise torch.OutOfMemoryError("out of memory while compiling (test)")
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", backend)
    with pytest.raises(torch.OutOfMemoryError, match="while compiling"):
        run(parts[0], parts)


def test_a_compile_error_falls_back_to_eager_once_with_its_type_in_the_log(parts, monkeypatch, caplog):
    calls = []

    def backend(graph, example_inputs):
        calls.append(1)
        raise RuntimeError("no compiler here (test)")
    eager = run(parts[0], parts, OFF)
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", backend)
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        first = run(parts[0], parts)
        second = run(parts[0], parts)  # the failure is remembered: no second attempt
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len(calls) == 1
    assert caplog.text.count("compiling the UNet failed") == 1
    assert "BackendCompilerFailed" in caplog.text and "no compiler here" in caplog.text
