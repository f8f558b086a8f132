"""UI-format workflows (what ComfyUI's Save / template browser use) -> API prompts (what POST /prompt takes).

    prompt = to_api(json.load(f), server.object_info(), swaps=TINY_SWAPS,
                    overrides={"LoadVideo": {"file": "clip.mp4"}, "ImageScale": {"width": 64, "height": 64}})

How widgets map: a node's ``widgets_values`` hold one value per widget input, in the schema's input order
(``input_order`` in /object_info: required, then optional); an input declared with
``control_after_generate`` (and, as the frontend does, any INT input named seed or noise_seed unless declared
otherwise) is followed by its control value ("fixed", "randomize", ...), which is skipped. The frontend adds
an upload combo's button (``image_upload`` / ``video_upload``) and DOM widgets after all of those, so values
past the node's widgets are ignored.
A dynamic combo (ComfyUI 0.38's SaveVideo ``format``) is followed by its chosen option's widgets, which the
prompt names with dots (``format.codec``).
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
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # ComfyUI 0.38: a combo whose choice brings its own widgets

TINY = {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd15", "seed": 0, "vae": "taesd"}}
TINY_SWAPS = {
    "CheckpointLoaderSimple": TINY,
    "StreamV2VToyModel": TINY,  # same outputs; keeps one tiny checkpoint in ComfyUI's cache for the workflows after
    "VAELoader": {**TINY, "outputs": {0: 2}},
    "LoraLoaderModelOnly": {"bypass": {0: "model"}},
    "ControlNetLoader": {"class_type": "TinyControlNetLoader", "inputs": {"seed": 0, "record": False}},
}


class WorkflowError(ValueError):
    pass


def _ordered(inputs: dict, order: dict | None = None) -> list[tuple[str, object, dict]]:
    """[(name, kind, options)] of an INPUT_TYPES-style dict, required first, in the frontend's order."""
    order = order or {g: list(inputs.get(g) or {}) for g in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            value = inputs[group][name]
            opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            out.append((name, value[0], opts))
    return out


def is_widget(kind, opts: dict) -> bool:
    """Whether the frontend shows this input as a widget (with a value in ``widgets_values``)."""
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES or kind == DYNAMIC_COMBO


def widget_inputs(spec: dict) -> list[tuple[str, dict]]:
    """[(name, options)] of the top-level inputs a node shows as widgets, in the frontend's order."""
    return [(name, {**opts, "control_after_generate": has_control(name, kind, opts)})
            for name, kind, opts in _ordered(spec["input"], spec.get("input_order")) if is_widget(kind, opts)]


def has_control(name: str, kind, opts: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this input (it does for INT inputs
    named seed/noise_seed unless the schema says control_after_generate=False)."""
    control = opts.get("control_after_generate")
    if control is None:
        control = kind == "INT" and name in ("seed", "noise_seed")
    return bool(control)


def map_widgets(node: dict, spec: dict) -> dict:
    """{input name: value} from a UI node's ``widgets_values``.

    A dynamic combo (ComfyUI 0.38's ``COMFY_DYNAMICCOMBO_V3``, e.g. SaveVideo's ``format``) is followed by the
    widgets of its chosen option, recursively; the prompt names them with dots (``format.codec``), as the
    frontend does and the server re-nests them.
    """
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some frontends store named values
        return dict(values)
    result: dict = {}
    _walk(_ordered(spec["input"], spec.get("input_order")), values, 0, "", result)
    return result


def _walk(items, values: list, i: int, prefix: str, result: dict) -> int:
    """Assign ``values[i:]`` to the widgets of ``items``; returns the next index."""
    for name, kind, opts in items:
        if not is_widget(kind, opts):
            continue
        if i >= len(values):
            break
        key = prefix + name
        result[key] = values[i]
        i += 1
        if has_control(name, kind, opts):
            i += 1
        if kind == DYNAMIC_COMBO:
            chosen = next((o for o in opts.get("options") or [] if o.get("key") == result[key]), None)
            if chosen is not None:
                i = _walk(_ordered(chosen.get("inputs") or {}), values, i, key + ".", result)
    return i


def to_api(workflow: dict, object_info: dict, swaps: dict | None = None, overrides: dict | None = None,
           allow_missing: bool = False) -> dict:
    """The API prompt for a UI-format ``workflow``; node ids are kept (as strings).

    ``allow_missing``: nodes of types the server does not have (another pack's, see ``missing_nodes``) are
    left out, and links from them kept, to check the rest of a workflow that needs that pack.
    """
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
            if allow_missing:
                continue
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


def missing_nodes(workflow: dict, object_info: dict) -> dict[int, str]:
    """{node id: pack} of nodes whose type the server lacks; each must name its pack (``properties.cnr_id``, as
    ComfyUI saves it and ComfyUI-Manager uses to offer the install), else WorkflowError."""
    missing = {}
    for node in workflow["nodes"]:
        if node["type"] in object_info or node["type"] in FRONTEND_ONLY or node["type"] == REROUTE:
            continue
        pack = (node.get("properties") or {}).get("cnr_id")
        if not pack:
            raise WorkflowError(f"node {node['id']}: type {node['type']!r} is not on the server and names no pack "
                                f"(properties.cnr_id)")
        missing[node["id"]] = pack
    return missing


def output_nodes(prompt: dict, object_info: dict) -> list[str]:
    """Ids of the prompt's output nodes (those ComfyUI executes on their own)."""
    return [nid for nid, e in prompt.items() if object_info[e["class_type"]].get("output_node")]
