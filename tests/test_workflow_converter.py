"""The tests' workflow converter (tests/host/workflows.py) on ComfyUI 0.38's SaveVideo, whose ``format`` is a
dynamic combo: CI runs 0.3.75, so its /object_info entry is written here from 0.38's schema."""
from host.workflows import map_widgets, to_api


def option(key, required=None, optional=None):
    inputs = {"required": required or {}}
    if optional:
        inputs["optional"] = optional
    return {"key": key, "inputs": inputs}


def dynamic(*options, **extra):
    return ["COMFY_DYNAMICCOMBO_V3", {"options": list(options), **extra}]


ENCODING = dynamic(option("auto"), option("re-encode", {"crf": ["FLOAT", {"default": 23.0}]}))
CODEC = dynamic(option("auto"), option("h264", optional={"encoding": ENCODING}), option("av1"))
SAVE_VIDEO_038 = {"input": {
    "required": {"video": ["VIDEO", {}], "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                 "format": dynamic(*(option(k, {"codec": CODEC}) for k in ("auto", "mp4", "mkv", "webm")))},
    "optional": {"codec": dynamic(option("auto"), option("h264"), hidden=True)}},
    "input_order": {"required": ["video", "filename_prefix", "format"], "optional": ["codec"]},
    "output_node": True}


def test_dynamic_combo_values_become_dotted_inputs():
    plain = map_widgets({"widgets_values": ["StreamV2V/x", "auto", "auto"]}, SAVE_VIDEO_038)
    assert plain == {"filename_prefix": "StreamV2V/x", "format": "auto", "format.codec": "auto"}
    nested = map_widgets({"widgets_values": ["v/y", "mp4", "h264", "re-encode", 20.0, "auto"]}, SAVE_VIDEO_038)
    assert nested == {"filename_prefix": "v/y", "format": "mp4", "format.codec": "h264",
                      "format.codec.encoding": "re-encode", "format.codec.encoding.crf": 20.0, "codec": "auto"}


def test_a_workflow_with_0_38_save_video_converts():
    workflow = {"nodes": [
        {"id": 1, "type": "LoadVideo", "widgets_values": ["clip.mp4", "image"], "outputs": [{"type": "VIDEO"}]},
        {"id": 2, "type": "SaveVideo", "widgets_values": ["out/v", "webm", "av1"],
         "inputs": [{"name": "video", "type": "VIDEO", "link": 1}]}],
        "links": [[1, 1, 0, 2, 0, "VIDEO"]]}
    info = {"LoadVideo": {"input": {"required": {"file": [["clip.mp4"], {"video_upload": True}]}}},
            "SaveVideo": SAVE_VIDEO_038}
    prompt = to_api(workflow, info)
    assert prompt["2"]["inputs"] == {"video": ["1", 0], "filename_prefix": "out/v", "format": "webm",
                                     "format.codec": "av1"}
    assert prompt["1"]["inputs"] == {"file": "clip.mp4"}
