"""The compiled UNet path (``nodes/engine/compiled_unet.py``): modes, old workflows' booleans, and which errors fall back.

Compiled with dynamo's ``eager`` backend (tracing only: the same guards, graphs and error paths as inductor,
without generating code). Errors are injected by test patches inside the compiled call.
"""
import logging
import re

import pytest
import torch

import comfy.model_management
from host import tiny_models
from streamv2v.nodes.engine import compiled_unet
from streamv2v.nodes.engine.compiled_unet import CUDA_GRAPHS, DEFAULT, OFF, compile_mode, device_mode
from streamv2v.nodes.loop.node import StreamV2VLoop
from streamv2v.nodes.sampler_nodes import StreamV2VSampler
from streamv2v.nodes.engine import StreamSettings, run_stream


@pytest.fixture(scope="module")
def parts():
    return tiny_models.tiny_sd15_model(0), tiny_models.tiny_taesd_vae(1), tiny_models.random_conditioning("sd15", 1)


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    # pytest captures every log record; torch's structured trace log at DEBUG makes tracing ~80x slower.
    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", "eager")
    compiled_unet.release_compiled("test")  # dynamo's caches too: no test counts another's graph variants
    yield
    compiled_unet.forget_compiled()


def frames(n=2):
    return list(torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(0)))


def layouts_met(parts):
    """Run the call layouts of ``run`` once (compiled mode runs a layout's first call eagerly; the padded
    stream batch has one layout, met in a run's first call and compiled in its second)."""
    run(parts[0], parts, DEFAULT)


def run(model, parts, mode=DEFAULT, n=2):
    _, vae, cond = parts
    outputs = []
    run_stream(model, cond, cond, vae, iter(frames(n)), StreamSettings(seed=1, compile=mode),
               lambda out: outputs.append(out.image))
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
    layouts_met(parts)
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
    layouts_met(parts)
    messages = []
    for mode in (OFF, DEFAULT):
        with pytest.raises(RuntimeError) as raised:
            run(model, parts, mode)
        assert type(raised.value) is RuntimeError
        messages.append(re.sub(r"\d+", "#", str(raised.value)))  # compiled, the stream batch is padded: other sizes
    assert messages[0] == messages[1]


def test_an_out_of_memory_error_wrapped_in_a_compile_error_is_unwrapped(parts, monkeypatch):
    def backend(graph, example_inputs):
        raise torch.OutOfMemoryError("out of memory while compiling (test)")
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", backend)
    with pytest.raises(torch.OutOfMemoryError, match="while compiling"):
        layouts_met(parts)


def test_a_compile_error_falls_back_to_eager_once_with_its_type_in_the_log(parts, monkeypatch, caplog):
    calls = []

    def backend(graph, example_inputs):
        calls.append(1)
        raise RuntimeError("no compiler here (test)")
    eager = run(parts[0], parts, OFF)
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", backend)
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        first = run(parts[0], parts)  # its first call meets the layout, its second compiles: fails, runs eagerly
        assert len(calls) == 1
        second = run(parts[0], parts)  # the failure is remembered: no second attempt
    # The same frames (a compiled run pads its filling and draining calls: float32 rounding of a larger batch).
    assert torch.equal(first, second)
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-4)
    assert len(calls) == 1
    assert caplog.text.count("compiling the UNet failed") == 1
    assert "BackendCompilerFailed" in caplog.text and "no compiler here" in caplog.text


def test_a_chunked_attention_backend_is_named_in_the_log_when_compiling():
    import comfy.ldm.modules.attention as attention

    assert compiled_unet.attention_warning(attention.attention_pytorch) is None
    assert compiled_unet.attention_warning() is None  # the test host runs ComfyUI with PyTorch attention
    for loop, name in ((attention.attention_sub_quad, "sub-quadratic"), (attention.attention_split, "split")):
        warning = compiled_unet.attention_warning(loop)
        assert name in warning and "--use-pytorch-cross-attention" in warning


def test_graph_variants_are_bounded_and_steady_state_never_recompiles():
    """A DyMe(1) stream at 2 steps, bank updated every 3rd frame (calls with and without a bank write): every
    call has the stream's one layout (the stream batch padded to its rows while it fills and drains, the bank
    read at its capacity with a mask), so fresh runs, continued runs, refills of frames in flight and steady
    state share one graph, compiled once, in the first run's second call. No graph breaks (PyTorch
    attention). The compiled frames equal the eager ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
    from streamv2v.nodes.engine import CONTINUE, FRESH, IN_FLIGHT
    from streamv2v.streamv2v_core import BANKS

    BANKS.remove("compile-variants")
    handle = FeatureBankNode.execute("compile-variants", "dyme", 1, 3, 0).args[0]
    model = ExtendedAttentionPatch.execute(tiny_models.micro_sd15_model(0), handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    vae, cond = tiny_models.tiny_taesd_vae(1), tiny_models.random_conditioning("sd15", 1)
    clip = list(torch.rand(10, 32, 32, 3, generator=torch.Generator().manual_seed(2)))

    def stream(mode, start, images):
        out = []
        run_stream(model, cond, cond, vae, iter(images), StreamSettings(steps=2, bank_start=start, compile=mode),
                   lambda o: out.append(o.image))
        return torch.stack(out)

    torch._dynamo.reset()
    counters.clear()
    graphs = []
    outputs = {}
    for mode in (OFF, DEFAULT):
        outputs[mode] = [stream(mode, FRESH, clip), stream(mode, FRESH, clip), stream(mode, CONTINUE, clip[:4]),
                         stream(mode, IN_FLIGHT, clip[4:7]), stream(mode, IN_FLIGHT, clip[7:])]
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [0, 1], graphs  # before the fixed layout: 4 for a fresh run + the refill of frames in flight
    assert counters["frames"]["total"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    for compiled, eager in zip(outputs[DEFAULT], outputs[OFF]):  # eager calls are not padded: float32 rounding
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


def test_per_frame_prompts_hints_strengths_and_live_alpha_vary_data_not_graphs():
    """What per-frame conditioning passes each call (each frame's prompt rows, ControlNet hint, control scale and
    a live FF alpha) is data: after the first fresh run met its layouts, a stream whose every frame carries other
    values compiles nothing new (no graph for a value), and the compiled frames equal the eager ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from nodes import ControlNetApplyAdvanced
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
    from streamv2v.nodes.engine import FRESH
    from streamv2v.streamv2v_core import BANKS
    from streamv2v.streamv2v_core.stream.conditioning import FrameConditioning

    BANKS.remove("compile-per-frame")
    handle = FeatureBankNode.execute("compile-per-frame", "dyme", 1, 2, 0).args[0]
    model = ExtendedAttentionPatch.execute(tiny_models.tiny_sd15_model(0), handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    vae, cond = tiny_models.tiny_taesd_vae(1), tiny_models.random_conditioning("sd15", 1)
    g = torch.Generator().manual_seed(4)
    images, hints = torch.rand(8, 64, 64, 3, generator=g), torch.rand(8, 64, 64, 3, generator=g)
    prompts = [[[cond[0][0] + 0.1 * i, {}]] for i in range(8)]
    pos, _ = ControlNetApplyAdvanced().apply_controlnet(cond, cond, tiny_models.tiny_controlnet(3), hints[:1],
                                                        1.0, 0.0, 1.0)

    def stream(mode, shift):
        def frame(entering):  # frame i: its own prompt, hint, strength and alpha
            index = entering.index
            return FrameConditioning(positive=[[prompts[index][0][0] + shift, {}]], hint=hints[index:index + 1],
                                     control_scale=0.5 + 0.1 * index + shift,
                                     fusion_alpha=0.5 + 0.05 * index + shift)
        out = []
        run_stream(model, pos, pos, vae, iter(images), StreamSettings(steps=2, bank_start=FRESH, compile=mode),
                   lambda o: out.append(o.image), conditioning=frame)
        return torch.stack(out)

    torch._dynamo.reset()
    counters.clear()
    eager = stream(OFF, 0.013)
    stream(DEFAULT, 0.0)  # every layout met (a layout's first call runs eagerly)
    stream(DEFAULT, 0.0)  # every layout compiled
    before = counters["stats"]["unique_graphs"]
    compiled = stream(DEFAULT, 0.013)  # other prompts, hints, strengths and alphas
    assert before > 0 and counters["stats"]["unique_graphs"] == before, "a per-frame value made a graph of its own"
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- CUDA graphs that cannot crash a show

def test_cuda_graphs_run_default_mode_under_cuda_malloc_async_and_name_the_fix(monkeypatch, caplog):
    """ComfyUI turns on cudaMallocAsync by default (its cuda_malloc.py); inductor's CUDA-graph trees cannot run
    with it. The allocator query is stubbed (no CUDA here)."""
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        assert device_mode(CUDA_GRAPHS, "cuda") == DEFAULT
        assert device_mode(CUDA_GRAPHS, "cuda") == DEFAULT
        assert device_mode(DEFAULT, "cuda") == DEFAULT and device_mode(OFF, "cuda") == OFF
    assert caplog.text.count("--disable-cuda-malloc") == 1 and "cudaMallocAsync" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    assert device_mode(CUDA_GRAPHS, "cuda") == CUDA_GRAPHS


def test_cuda_graphs_run_default_mode_for_a_model_loaded_partially_or_dynamically(parts, caplog):
    """Low VRAM (ComfyUI moves weights during the forward) is known at call time; newer ComfyUI's dynamic
    VRAM patchers say so with ``is_dynamic()``."""
    base = parts[0].model
    wrapper = compiled_unet.CompiledUNet(CUDA_GRAPHS, backend="inductor")
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        assert wrapper._key(base) == ("inductor", CUDA_GRAPHS)
        base.model_lowvram = True
        try:
            assert wrapper._key(base) == ("inductor", DEFAULT)
        finally:
            base.model_lowvram = False

        class Dynamic:
            def is_dynamic(self):
                return True
        assert compiled_unet.cuda_graphs_blocker(Dynamic()) == compiled_unet.DYNAMIC_VRAM_MESSAGE
    assert "loaded it partially" in caplog.text and compiled_unet.cuda_graphs_blocker(parts[0]) is None


@pytest.fixture(scope="module")
def micro():
    """The small SD1.5-shaped UNet, TAESD, conditioning: with 1 step every call has the same layout, so a run of
    n frames compiles at most one graph (its first call runs eagerly, its second compiles)."""
    return tiny_models.micro_sd15_model(0), tiny_models.tiny_taesd_vae(1), tiny_models.random_conditioning("sd15", 1)


def run1(micro, mode=DEFAULT, n=3, size=32):
    model, vae, cond = micro
    outputs = []
    frames = list(torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(0)))
    run_stream(model, cond, cond, vae, iter(frames), StreamSettings(seed=1, steps=1, compile=mode),
               lambda out: outputs.append(out.image))
    return torch.stack(outputs)


def test_a_runtime_error_of_the_first_compiled_call_falls_back_and_the_frame_is_made_eagerly(micro, monkeypatch,
                                                                                            caplog):
    """Compiling succeeds but running the compiled graph fails (as CUDA-graph trees do under cudaMallocAsync:
    a plain RuntimeError): that call is run again eagerly, compiling stops, the show goes on unchanged."""
    compiled_runs = []

    def backend(graph, example_inputs):
        def run(*args):
            compiled_runs.append(1)
            raise RuntimeError("cudaMallocAsync does not yet support checkPoolLiveAllocations (test)")
        return run
    eager = run1(micro, OFF)
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", backend)
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        first, second = run1(micro), run1(micro)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len(compiled_runs) == 1 and compiled_unet.STATS.fallbacks == 1 and compiled_unet.STATS.compiled == 0
    assert caplog.text.count("compiling the UNet failed") == 1 and "checkPoolLiveAllocations" in caplog.text


def test_the_model_compiled_by_core_torch_compile_model_is_not_compiled_twice(parts, caplog):
    """Core's TorchCompileModel (comfy_extras/nodes_torch_compile.py, an APPLY_MODEL wrapper keyed
    "torch.compile" and ``model_options["torch_compile_kwargs"]``, 0.3.75 and newer): StreamV2V's compile is
    skipped with a line that says what to do; ``off`` leaves core's compile alone."""
    import comfy.patcher_extension
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    core = TorchCompileModel.execute(parts[0], "inductor").args[0]
    assert compiled_unet.core_compile_present(core) and not compiled_unet.core_compile_present(parts[0])
    apply, forward = comfy.patcher_extension.WrappersMP.APPLY_MODEL, comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        for mode in (DEFAULT, OFF):
            clone = core.clone()
            assert compiled_unet.install_compile(clone, mode) == OFF
            assert not clone.get_wrappers(apply, compiled_unet.COMPILE_KEY)
            assert not clone.get_wrappers(forward, compiled_unet.COMPILE_KEY)
            assert clone.get_wrappers(apply, compiled_unet.CORE_COMPILE_KEY)  # core's own stays
    assert caplog.text.count("already goes through") == 1 and "remove TorchCompileModel" in caplog.text
    clone = parts[0].clone()
    assert compiled_unet.install_compile(clone, DEFAULT) == DEFAULT and clone.get_wrappers(apply, compiled_unet.COMPILE_KEY)


def test_free_memory_releases_the_compiled_graphs(micro):
    """ComfyUI's Free memory (``free_all``, the /free observer) drops the compiled functions, met layouts and
    dynamo's caches (with the CUDA-graph trees) on the compile thread: the next run compiles again."""
    from torch._dynamo.utils import counters

    from streamv2v.nodes.bank_routes import free_all

    counters.clear()
    run1(micro)
    assert compiled_unet.STATS.compiled == 2 and counters["frames"]["total"] > 0 and compiled_unet._FUNCTIONS
    free_all("test: Free memory")
    compiled_unet.COMPILER.run(lambda: None)  # the reset queued on the compile thread has run
    assert not compiled_unet._FUNCTIONS and compiled_unet.STATS.compiled == 0
    counters.clear()
    run1(micro)  # the first call meets its layout anew (eager), the second compiles again
    assert compiled_unet.STATS.eager == 1 and compiled_unet.STATS.compiled == 2 and counters["frames"]["total"] > 0


def test_cancel_during_the_first_compile_takes_effect_at_once_and_the_compile_finishes_in_the_background(
        micro, monkeypatch):
    """The compile runs on the compile thread; the worker polls ComfyUI's interrupt flag: Cancel raises while the
    compile is still running (a backend held until the test lets it go), the next run goes on eagerly while the
    abandoned compile finishes, and the one after uses what it compiled (no second compile)."""
    import threading

    import comfy.model_management

    entered, release, compiles = threading.Event(), threading.Event(), []

    def backend(graph, example_inputs):
        compiles.append(1)
        entered.set()
        assert release.wait(300), "the test never let the compile finish"
        return graph.forward

    def cancel_when_compiling():
        if entered.wait(300):
            comfy.model_management.interrupt_current_processing(True)
    monkeypatch.setattr(compiled_unet, "COMPILE_BACKEND", backend)
    eager = run1(micro, OFF)
    canceller = threading.Thread(target=cancel_when_compiling)
    canceller.start()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run1(micro)
        assert not release.is_set() and compiled_unet.COMPILER.busy()  # Cancel did not wait for the compile
        during = run1(micro)  # the abandoned compile still runs: this run is eager
        assert compiled_unet.STATS.compiled == 0 and torch.equal(during, eager)
    finally:
        release.set()
        canceller.join()
        comfy.model_management.interrupt_current_processing(False)
    compiled_unet.COMPILER.run(lambda: None)  # the abandoned call has finished
    assert not compiled_unet.COMPILER.busy()
    after = run1(micro)
    assert compiled_unet.STATS.compiled == 3  # every call (its layout was met before)
    assert len(compiles) == 1  # with the graph the abandoned call compiled
    torch.testing.assert_close(after, eager, rtol=0, atol=1e-5)


def test_past_the_recompile_limit_a_new_layout_runs_eagerly_with_a_log_line_and_compiled_ones_keep_running(
        micro, monkeypatch, caplog):
    """Dynamo's recompile limit (32 graph variants; 1 here) used to send new variants back to eager Python
    silently: now the new layout runs eagerly with one log line, the graphs compiled before keep running."""
    monkeypatch.setattr(compiled_unet, "RECOMPILE_LIMIT", 1)
    run1(micro)
    assert compiled_unet.STATS.compiled == 2
    with caplog.at_level(logging.WARNING, logger="streamv2v"):
        larger = run1(micro, size=48)  # another latent size: a second graph variant, past the limit of 1
    assert compiled_unet.STATS.fallbacks == 1 and compiled_unet.STATS.compiled == 2
    assert caplog.text.count("recompile limit") == 1 and "compiling the UNet failed" not in caplog.text
    assert torch.equal(larger, run1(micro, OFF, size=48))
    run1(micro)
    assert compiled_unet.STATS.compiled == 5  # 32x32 compiled again from its first call (met before)
