// StreamV2V instrument on the loop node's panel: more live controls (strength, seed, cfg, residual delta, negative
// prompt), 8 presets (web/streamv2v_presets.js) and a MIDI map (web/streamv2v_midi.js: Web MIDI, Chromium and Edge,
// in a secure context only: localhost or HTTPS). MIDI-learn: open "MIDI map", press a control's "learn", move a knob
// or press a pad. The mapping and the presets are kept in the node's properties: they travel in the workflow JSON.
// Hook used on the panel (web/streamv2v_webcam.js): node.streamv2vWebcam with .root, .session and .controls (the
// live controls: .post(body), .prompt, .blend, .strength, .alpha, .note, .setSlider, .sendPrompt).
import { app } from "../../scripts/app.js";
import { element, slider } from "./streamv2v_live_controls.js";
import { MidiMap } from "./streamv2v_midi.js";
import { PRESETS, PresetBank } from "./streamv2v_presets.js";

const SEND_MS = 40;                       // a knob sends ~100 values a second: the newest per control every 40 ms
const MAX_SEED = 2 ** 53 - 1;             // what a JSON number carries exactly
const EXTRA_HEIGHT = 130;                 // the instrument's rows under the live controls (the mapping view adds its own)

export class Instrument {
  constructor(panel) {
    this.panel = panel;
    this.node = panel.node;
    this.live = panel.controls;
    this.queued = new Map();   // field -> value waiting for its send slot
    this.sentAt = new Map();
    this.build();
    this.bank = new PresetBank(this);
    this.midi = new MidiMap(this.node, this.controls());
    this.root.append(this.bank.root, this.midi.root);
  }

  build() {
    this.root = element("div", "display:flex;flex-direction:column;gap:4px;flex:0 0 auto;font-size:12px;");
    this.root.className = "streamv2v-instrument";
    const row = element("div", "display:flex;gap:10px;align-items:center;flex-wrap:wrap;");
    this.strength = slider("strength", 0.01, 1, 0.01, widgetNumber(this.node, "strength", 0.4));
    this.cfg = slider("cfg", 0, 15, 0.1, widgetNumber(this.node, "cfg", 1));
    this.delta = slider("delta", 0, 1, 0.05, widgetNumber(this.node, "residual_delta", 1));
    this.strength.input.addEventListener("change", () => this.send("strength", Number(this.strength.input.value)));
    this.cfg.input.addEventListener("change", () => this.send("cfg", Number(this.cfg.input.value)));
    this.delta.input.addEventListener("change", () => this.send("residual_delta", Number(this.delta.input.value)));
    const seedLabel = element("label", "display:flex;align-items:center;gap:4px;", "seed");
    this.seed = element("input", "width:8em;");
    Object.assign(this.seed, { type: "number", min: 0, step: 1, value: widgetNumber(this.node, "seed", 0) });
    this.seed.addEventListener("change", () => this.send("seed", Math.floor(Number(this.seed.value))));
    this.newSeed = element("button", "font-size:12px;padding:2px 8px;border-radius:6px;cursor:pointer;", "new seed");
    this.newSeed.addEventListener("click", () => this.fireNewSeed());
    seedLabel.append(this.seed, this.newSeed);
    row.append(this.strength.wrap, this.cfg.wrap, this.delta.wrap, seedLabel);
    this.negative = element("input", "flex:1;min-width:12em;background:#1b1b1b;color:#eee;border:1px solid #555;"
      + "border-radius:4px;padding:2px 4px;");
    this.negative.placeholder = "Live negative prompt (Enter sends it)";
    this.negative.className = "streamv2v-negative";
    this.negative.addEventListener("keydown", (event) => {
      event.stopPropagation();
      if (event.key === "Enter") this.post({ negative_prompt: this.negative.value });
    });
    this.root.append(row, this.negative);
  }


  // Every control MIDI can drive: { label, min, max, step, set(value) } (a range) or { label, fire() } (a button).
  controls() {
    const controls = new Map();
    const range = (id, label, control, min, max, step) => controls.set(id, {
      label, min, max, step, set: (value) => {
        this.live.setSlider(control, value);
        this.send(id, value);
      },
    });
    range("strength", "strength", this.strength, 0.01, 1, 0.01);
    range("cfg", "cfg", this.cfg, 0, 15, 0.1);
    range("residual_delta", "residual delta", this.delta, 0, 1, 0.05);
    range("control_strength", "ControlNet strength", this.live.strength, 0, 2, 0.05);
    range("ff_alpha", "FF alpha", this.live.alpha, 0, 1, 0.05);
    controls.set("blend_frames", { label: "blend frames", min: 0, max: 64, step: 1, set: (value) => {
      this.live.blend.value = value;
    } });
    controls.set("seed", { label: "seed (CC: 0..127)", min: 0, max: 127, step: 1, set: (value) => {
      this.seed.value = value;
      this.send("seed", value);
    } });
    controls.set("new_seed", { label: "new seed", fire: () => this.fireNewSeed() });
    controls.set("send_prompt", { label: "send prompt", fire: () => this.live.sendPrompt() });
    controls.set("clear_bank", { label: "clear bank", fire: () => this.post({ clear_bank: true }) });
    for (let n = 1; n <= PRESETS; n++) controls.set(`preset_${n}`, { label: `preset ${n}`, fire: () => this.bank.recall(n) });
    return controls;
  }

  changed() {
    app.graph?.setDirtyCanvas?.(true, true);  // the workflow has changed: it is saved with the presets
  }

  // The newest value per field, at most every SEND_MS (a knob turned fast is not a flood of changes).
  send(field, value) {
    this.queued.set(field, value);
    const wait = SEND_MS - (performance.now() - (this.sentAt.get(field) || 0));
    if (this.queued.size === 1 || wait <= 0) setTimeout(() => this.flush(), Math.max(0, wait));
  }

  flush() {
    if (!this.queued.size) return;
    const body = Object.fromEntries(this.queued);
    this.queued.clear();
    for (const field of Object.keys(body)) this.sentAt.set(field, performance.now());
    this.post(body);
  }

  post(body) {
    return this.live.post(body);
  }

  fireNewSeed() {
    const seed = Math.floor(Math.random() * MAX_SEED);
    this.seed.value = seed;
    this.send("seed", seed);
  }

  // The live controls as a preset (only what the running loop can change: ``can``, its capabilities).
  snapshot(can) {
    const shot = { strength: Number(this.strength.input.value), seed: Math.floor(Number(this.seed.value)),
                   cfg: Number(this.cfg.input.value), blend_frames: Number(this.live.blend.value) };
    const prompt = this.live.prompt.value.trim();
    if (prompt && can.clip) shot.prompt = prompt;
    if (can.clip) shot.negative_prompt = this.negative.value;
    if (can.residual) shot.residual_delta = Number(this.delta.input.value);
    if (can.control) shot.control_strength = Number(this.live.strength.input.value);
    if (can.fusion) shot.ff_alpha = Number(this.live.alpha.input.value);
    return shot;
  }

  show(preset) {  // the controls show what a recall sets
    const sliders = { strength: this.strength, cfg: this.cfg, residual_delta: this.delta,
                      control_strength: this.live.strength, ff_alpha: this.live.alpha };
    for (const [field, control] of Object.entries(sliders)) {
      if (preset[field] != null) this.live.setSlider(control, preset[field]);
    }
    if (preset.seed != null) this.seed.value = preset.seed;
    if (preset.prompt != null) this.live.prompt.value = preset.prompt;
    if (preset.negative_prompt != null) this.negative.value = preset.negative_prompt;
    if (preset.blend_frames != null) this.live.blend.value = preset.blend_frames;
  }

  close() {
    this.bank.close();
  }
}

function widgetNumber(node, name, fallback) {
  const value = Number(node.widgets?.find((w) => w.name === name)?.value);
  return Number.isFinite(value) ? value : fallback;
}

// A workflow saved before the loop had its OSC, take and idle_timeout inputs (0.3) holds the upload button's value
// where osc_port is now: those inputs go back to their defaults (the frontend assigns saved values by position).
const INSTRUMENT_DEFAULTS = { osc_port: 0, osc_host: "127.0.0.1", record_take: true, idle_timeout: 30 };

function repairOlderWorkflow(node) {
  const port = node.widgets?.find((w) => w.name === "osc_port");
  if (!port || (typeof port.value === "number" && Number.isFinite(port.value))) return;
  for (const w of node.widgets) if (w.name in INSTRUMENT_DEFAULTS) w.value = INSTRUMENT_DEFAULTS[w.name];
}

function attach(node) {
  const panel = node.streamv2vWebcam;
  if (!panel?.controls || panel.instrument) return;
  panel.instrument = new Instrument(panel);
  panel.controls.root.after(panel.instrument.root);
  node.setSize([node.size[0], node.size[1] + EXTRA_HEIGHT]);
}

app.registerExtension({
  name: "StreamV2V.Instrument",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "StreamV2VLoop") return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      queueMicrotask(() => attach(this));  // after the webcam panel (another extension) is attached
      return result;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.streamv2vWebcam?.instrument?.close();
      return removed?.apply(this, arguments);
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {  // a loaded workflow: its mapping and presets
      const result = configured?.apply(this, arguments);
      repairOlderWorkflow(this);
      this.streamv2vWebcam?.instrument?.midi.render();
      this.streamv2vWebcam?.instrument?.bank.show();
      return result;
    };
  },
});
