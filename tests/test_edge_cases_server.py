"""Issue 19: what a new user and an attacker still broke, each case against the real ComfyUI server.

Files read through symlinks, images whose header promises huge pixels, memory and /interrupt with
8K sources, two-call samplers reading their own frame, a cancelled loop re-running others, bank names
that cannot be cleared, ``%date:...%`` prefixes.
"""
import json
import urllib.error
import urllib.request

import pytest

from test_server_bank import latent_of

TINY = {"1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd15", "seed": 0, "vae": "taesd"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a watercolor painting"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def http(server, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def ksampler(node_id, model, sampler, prefix):
    return {node_id: {"class_type": "KSampler", "inputs": {
                "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 3,
                "steps": 4, "cfg": 2.0, "sampler_name": sampler, "scheduler": "karras", "denoise": 1.0}},
            f"s{node_id}": {"class_type": "SaveLatent", "inputs": {"samples": [node_id, 0],
                                                                   "filename_prefix": f"latents/{prefix}"}}}


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpmpp_sde"])
def test_two_call_samplers_give_frame_0_exactly_the_unpatched_result(comfy_server, sampler):
    """heun & co. evaluate step i's second call at step i+1's sigma: its bank write must not be read by the
    same frame (it attended to itself: 3.5e-3 of scale off on a fresh bank)."""
    name = f"two-call-{sampler}"
    http(comfy_server, "DELETE", f"/streamv2v/banks/{name}")
    prompt = {**TINY,
              "10": {"class_type": "FeatureBank", "inputs": {"name": name, "mode": "dyme", "size": 1, "interval": 1,
                                                             "seed": 0}},
              "11": {"class_type": "ExtendedAttentionPatch", "inputs": {"model": ["1", 0], "bank": ["10", 0],
                                                                        "blocks": "all"}},
              "12": {"class_type": "FeatureFusionPatch", "inputs": {"model": ["11", 0], "bank": ["10", 0],
                                                                    "alpha": 0.75, "threshold": 0.0, "blocks": "all"}},
              **ksampler("20", ["12", 0], sampler, f"{sampler}_bank"), **ksampler("30", ["1", 0], sampler, f"{sampler}_plain")}
    entry = comfy_server.run(prompt)
    outputs = entry["outputs"]
    banked = latent_of(comfy_server, {"outputs": {"s20": outputs["s20"]}})
    plain = latent_of(comfy_server, {"outputs": {"s30": outputs["s30"]}})
    assert (banked - plain).abs().max().item() == 0.0
    # The frame's writes did land (after its last call): the next frame sees them.
    status = {b["name"]: b for b in http(comfy_server, "GET", "/streamv2v/banks")[1]["banks"]}[name]
    assert status["frames_seen"] == 1 and status["entries"] > 0
