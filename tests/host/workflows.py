"""UI-format workflows (what ComfyUI's Save / template browser use) -> API prompts (what POST /prompt takes).

    prompt = to_api(json.load(f), server.object_info(), swaps=TINY_SWAPS,
                    overrides={"LoadVideo": {"file": "clip.mp4"}, "ImageScale": {"width": 64, "height": 64}})

How widgets map: a node's ``widgets_values`` hold one value per widget input, in the schema's input order
(``input_order`` in /object_info: required, then optional); an input declared with
``control_after_generate`` (and, as the frontend does, any INT input named seed or noise_seed unless declared
otherwise) is followed by its control value ("fixed", "randomize", ...), and an upload
combo (``image_upload`` / ``video_upload``) may be followed by the upload button's value: both are skipped.
A linked input takes the link; its widget value (if any) is dropped.

Frontend-only nodes (Note, MarkdownNote, PrimitiveNode, ...) are dropped; Reroute nodes are followed; muted
nodes (mode 2) are dropped and bypassed nodes (mode 4) pass their first input of the same type through.

``swaps`` replaces node classes (the tests' tiny random-weight loaders stand in for model files):
``{"Class": {"class_type": New, "inputs": {...}, "outputs": {old_slot: new_slot}}}`` swaps a node, and
``{"Class": {"bypass": {old_slot: "input name"}}}`` removes it, wiring that input's source through.
``overrides`` sets inputs by class name after conversion (small sizes, short clips, frame caps).
"""
from __future__ import annotations

import copy

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode"}  # PrimitiveInt & co. are real server nodes
REROUTE = "Reroute"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_KEYS = ("image_upload", "video_upload", "audio_upload", "upload")

TINY = {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd15", "seed": 0, "vae": "taesd"}}
TINY_SWAPS = {
    "CheckpointLoaderSimple": TINY,
    "VAELoader": {**TINY, "outputs": {0: 2}},
    "LoraLoaderModelOnly": {"bypass": {0: "model"}},
}


class WorkflowError(ValueError):
    pass


def widget_inputs(spec: dict) -> list[tuple[str, dict]]:
    """[(name, options)] of the inputs a node shows as widgets, in the frontend's order."""
    order = spec.get("input_order") or {g: list(spec["input"].get(g, {})) for g in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            value = spec["input"][group][name]
            kind = value[0]
            opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, {**opts, "control_after_generate": has_control(name, kind, opts)}))
    return out


def has_control(name: str, kind, opts: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this input (it does for INT inputs
    named seed/noise_seed unless the schema says control_after_generate=False)."""
    control = opts.get("control_after_generate")
    if control is None:
        control = kind == "INT" and name in ("seed", "noise_seed")
    return bool(control)


def map_widgets(node: dict, spec: dict) -> dict:
    """{input name: value} from a UI node's ``widgets_values``."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some frontends store named values
        return dict(values)
    names = widget_inputs(spec)
    expected = len(names) + sum(1 for _, o in names if o.get("control_after_generate"))
    extra = len(values) - expected  # upload button values, when present
    result, i = {}, 0
    for name, opts in names:
        if i >= len(values):
            break
        result[name] = values[i]
        i += 1
        if opts.get("control_after_generate"):
            i += 1
        if extra > 0 and any(opts.get(k) for k in UPLOAD_KEYS):
            i += 1
            extra -= 1
    return result


def to_api(workflow: dict, object_info: dict, swaps: dict | None = None, overrides: dict | None = None) -> dict:
    """The API prompt for a UI-format ``workflow``; node ids are kept (as strings)."""
    swaps = swaps or {}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")

    def input_link(node, name):
        for inp in node.get("inputs") or []:
            if inp["name"] == name and inp.get("link") is not None:
                return links[inp["link"]]
        return None

    def source(node_id, slot):
        """[id, slot] feeding from (node_id, slot) after reroutes, bypasses and swaps; None for no value."""
        node = nodes[node_id]
        kind = node["type"]
        if kind == REROUTE:
            up = next((i["link"] for i in node.get("inputs") or [] if i.get("link") is not None), None)
            return source(*links[up]) if up is not None else None
        if kind in FRONTEND_ONLY:
            return None  # a primitive: its value is already in the target's widgets_values
        if node.get("mode") == 4:  # bypassed: pass the first input of the output's type through
            out_type = node["outputs"][slot]["type"]
            for inp in node.get("inputs") or []:
                if inp.get("type") == out_type and inp.get("link") is not None:
                    return source(*links[inp["link"]])
            return None
        swap = swaps.get(kind)
        if swap and "bypass" in swap:
            up = input_link(node, swap["bypass"][slot])
            if up is None:
                raise WorkflowError(f"node {node_id} ({kind}): bypassed input {swap['bypass'][slot]!r} is not linked")
            return source(*up)
        if swap:
            slot = swap.get("outputs", {}).get(slot, slot)
        return [str(node_id), slot]

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in FRONTEND_ONLY or kind == REROUTE or node.get("mode") in (2, 4):
            continue
        swap = swaps.get(kind)
        if swap and "bypass" in swap:
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node_id}: type {kind!r} is not registered on the server")
        inputs = map_widgets(node, object_info[kind])
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            src = source(*links[inp["link"]])
            if src is not None:
                inputs[inp["name"]] = src
            elif not inp.get("widget"):
                inputs.pop(inp["name"], None)
        entry = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title") or kind}}
        if swap:
            entry = {"class_type": swap["class_type"], "inputs": copy.deepcopy(swap.get("inputs", {})),
                     "_meta": {"title": f"{kind} (swapped for {swap['class_type']})"}}
        prompt[str(node_id)] = entry
    for kind, values in (overrides or {}).items():
        for entry in prompt.values():
            if entry["class_type"] == kind:
                entry["inputs"].update(copy.deepcopy(values))
    return prompt


def output_nodes(prompt: dict, object_info: dict) -> list[str]:
    """Ids of the prompt's output nodes (those ComfyUI executes on their own)."""
    return [nid for nid, e in prompt.items() if object_info[e["class_type"]].get("output_node")]
