// StreamV2V instrument on the loop node's panel: more live controls (strength, seed, cfg, residual delta, negative
// prompt), 8 presets, and MIDI (Web MIDI: Chromium and Edge, in a secure context only: localhost or HTTPS).
//
// MIDI-learn: open "MIDI map", press a control's "learn", move a knob or press a pad: a CC drives a range control
// (0..127 mapped onto the control's range) or fires a button (value 64 and up); a note fires a button or recalls a
// preset. The mapping and the presets are kept in the node's properties, so they travel in the workflow JSON.
// Presets: a click recalls one (keys 1-8 while the panel has focus, MIDI notes, OSC /streamv2v/<session>/preset n);
// "Store" then a number snapshots the live controls into it. A recall is one change, blended like any other; the
// panel sends the workflow's presets to the running loop (POST .../presets) so OSC can recall them too.
// Hook used on the panel (web/streamv2v_webcam.js): node.streamv2vWebcam with .root, .session and .controls (the
// live controls: .post(body), .prompt, .blend, .strength, .alpha, .note).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { element, slider } from "./streamv2v_live_controls.js";

const MIDI_KEY = "streamv2v_midi";        // node.properties: { control id: { kind: "cc"|"note", channel, number } }
const PRESETS_KEY = "streamv2v_presets";  // node.properties: 8 snapshots (null: empty)
const PRESETS = 8;
const SYNC_MS = 2000;                     // how often the running loop's presets are compared with the workflow's
const SEND_MS = 40;                       // a knob sends ~100 values a second: the newest per control every 40 ms
const MAX_SEED = 2 ** 53 - 1;             // what a JSON number carries exactly
const EXTRA_HEIGHT = 130;                 // the instrument's rows under the live controls (the mapping view adds its own)
const CC = 0xb0, NOTE_ON = 0x90, NOTE_OFF = 0x80;

// What a MIDI message means: { kind, channel (1-16), number, value (0..127) } or null (clock, sysex, note off).
export function parseMidi(data) {
  if (!data || data.length < 3) return null;
  const type = data[0] & 0xf0, channel = (data[0] & 0x0f) + 1;
  if (type === CC) return { kind: "cc", channel, number: data[1], value: data[2] };
  if (type === NOTE_ON && data[2] > 0) return { kind: "note", channel, number: data[1], value: data[2] };
  if (type === NOTE_OFF || type === NOTE_ON) return null;
  return null;
}

export function ccToRange(value, min, max, step) {
  const raw = min + (value / 127) * (max - min);
  const snapped = step ? Math.round((raw - min) / step) * step + min : raw;
  return Math.min(max, Math.max(min, Number(snapped.toFixed(6))));
}

function describeBinding(b) {
  return b ? `${b.kind === "cc" ? "CC" : "note"} ${b.number} · ch ${b.channel}` : "—";
}

export class Instrument {
  constructor(panel) {
    this.panel = panel;
    this.node = panel.node;
    this.live = panel.controls;
    this.learning = null;
    this.storing = false;
    this.queued = new Map();   // field -> value waiting for its send slot
    this.sentAt = new Map();
    this.presetsSent = null;   // JSON of the presets the running loop has
    this.midi = null;
    this.controls = new Map(); // id -> { label, min, max, step, set(value) } or { label, fire() }
    this.build();
    this.defineControls();
    this.renderMapping();
    this.startMidi();
    this.syncTimer = setInterval(() => this.keepPresetsSynced(), SYNC_MS);
  }

  // A loop that starts (or a server that restarted) gets the workflow's presets, so OSC can recall them.
  async keepPresetsSynced() {
    const stored = this.presets.map((p, i) => (p ? i + 1 : 0)).filter(Boolean);
    if (!stored.length) return;
    try {
      const state = await (await api.fetchApi(`/streamv2v/loop/${this.panel.session}/params`, { cache: "no-store" })).json();
      if (state.running && JSON.stringify(state.presets || []) !== JSON.stringify(stored)) await this.syncPresets(true);
    } catch (error) { /* the server is away: next time */ }
  }

  close() {
    clearInterval(this.syncTimer);
  }

  get mapping() {
    this.node.properties = this.node.properties || {};
    return (this.node.properties[MIDI_KEY] = this.node.properties[MIDI_KEY] || {});
  }

  get presets() {
    this.node.properties = this.node.properties || {};
    const stored = this.node.properties[PRESETS_KEY];
    if (!Array.isArray(stored) || stored.length !== PRESETS) {
      this.node.properties[PRESETS_KEY] = Array.from({ length: PRESETS }, (_, i) => stored?.[i] ?? null);
    }
    return this.node.properties[PRESETS_KEY];
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
    this.root.append(row, this.negative, this.buildPresets(), this.buildMidi());
  }

  buildPresets() {
    const row = element("div", "display:flex;gap:4px;align-items:center;flex-wrap:wrap;");
    row.append(element("span", "", "presets"));
    this.presetButtons = [];
    for (let n = 1; n <= PRESETS; n++) {
      const b = element("button", "min-width:2.2em;padding:2px 6px;border-radius:6px;cursor:pointer;", String(n));
      b.addEventListener("click", () => (this.storing ? this.storePreset(n) : this.recall(n)));
      this.presetButtons.push(b);
      row.append(b);
    }
    this.storeButton = element("button", "padding:2px 8px;border-radius:6px;cursor:pointer;", "Store…");
    this.storeButton.addEventListener("click", () => this.setStoring(!this.storing));
    row.append(this.storeButton);
    this.showPresets();
    // Keys 1-8 recall while the panel has focus (not while typing in one of its boxes).
    this.panel.root.tabIndex = this.panel.root.tabIndex >= 0 ? this.panel.root.tabIndex : 0;
    this.panel.root.addEventListener("keydown", (event) => this.onKey(event));
    return row;
  }

  buildMidi() {
    const wrap = element("div", "display:flex;flex-direction:column;gap:2px;");
    const bar = element("div", "display:flex;gap:6px;align-items:center;");
    this.mapButton = element("button", "padding:2px 8px;border-radius:6px;cursor:pointer;", "MIDI map");
    this.mapButton.addEventListener("click", () => this.toggleMapping());
    this.midiStatus = element("span", "opacity:0.85;");
    this.midiStatus.className = "streamv2v-midi-status";
    bar.append(this.mapButton, this.midiStatus);
    this.mappingView = element("table", "display:none;border-collapse:collapse;font-size:12px;");
    this.mappingView.className = "streamv2v-midi-map";
    wrap.append(bar, this.mappingView);
    return wrap;
  }

  // The node grows by what the mapping view needs (the panel's picture shrinks otherwise).
  toggleMapping() {
    const before = this.mappingView.offsetHeight;
    this.mappingView.style.display = this.mappingView.style.display === "none" ? "" : "none";
    this.node.setSize([this.node.size[0], this.node.size[1] + this.mappingView.offsetHeight - before]);
    app.graph?.setDirtyCanvas?.(true, true);
  }

  defineControls() {
    const range = (id, label, control, field, min, max, step) => this.controls.set(id, {
      label, min, max, step, set: (value) => {
        control.input.value = value;
        control.shown.textContent = Number(value).toFixed(2);
        this.send(field, value);
      },
    });
    range("strength", "strength", this.strength, "strength", 0.01, 1, 0.01);
    range("cfg", "cfg", this.cfg, "cfg", 0, 15, 0.1);
    range("residual_delta", "residual delta", this.delta, "residual_delta", 0, 1, 0.05);
    range("control_strength", "ControlNet strength", this.live.strength, "control_strength", 0, 2, 0.05);
    range("ff_alpha", "FF alpha", this.live.alpha, "ff_alpha", 0, 1, 0.05);
    this.controls.set("blend_frames", { label: "blend frames", min: 0, max: 64, step: 1, set: (value) => {
      this.live.blend.value = value;
    } });
    this.controls.set("seed", { label: "seed (CC: 0..127)", min: 0, max: 127, step: 1, set: (value) => {
      this.seed.value = value;
      this.send("seed", value);
    } });
    this.controls.set("new_seed", { label: "new seed", fire: () => this.fireNewSeed() });
    this.controls.set("send_prompt", { label: "send prompt", fire: () => this.live.sendPrompt() });
    this.controls.set("clear_bank", { label: "clear bank", fire: () => this.post({ clear_bank: true }) });
    for (let n = 1; n <= PRESETS; n++) this.controls.set(`preset_${n}`, { label: `preset ${n}`, fire: () => this.recall(n) });
  }

  renderMapping() {
    this.mappingView.replaceChildren();
    for (const [id, control] of this.controls) {
      const tr = element("tr");
      tr.dataset.control = id;
      const learn = element("button", "padding:0 6px;border-radius:4px;cursor:pointer;",
                            this.learning === id ? "move a control…" : "learn");
      learn.className = "streamv2v-learn";
      learn.addEventListener("click", () => { this.learning = this.learning === id ? null : id; this.renderMapping(); });
      const forget = element("button", "padding:0 6px;border-radius:4px;cursor:pointer;", "×");
      forget.title = "forget this mapping";
      forget.addEventListener("click", () => { delete this.mapping[id]; this.changed(); });
      const cell = (content, css = "padding:1px 8px;") => { const td = element("td", css); td.append(content); return td; };
      tr.append(cell(control.label), cell(describeBinding(this.mapping[id])), cell(learn), cell(forget));
      this.mappingView.append(tr);
    }
  }

  changed() {
    this.renderMapping();
    app.graph?.setDirtyCanvas?.(true, true);  // the workflow has changed: it is saved with the mapping
  }

  // ---------------------------------------------------------------- MIDI
  async startMidi() {
    if (!window.isSecureContext || !navigator.requestMIDIAccess) {
      this.midiStatus.textContent = window.isSecureContext
        ? "MIDI: this browser has no Web MIDI (use Chromium or Edge)"
        : "MIDI needs a secure context: open ComfyUI as http://localhost or over HTTPS (Chromium or Edge)";
      return;
    }
    try {
      this.midi = await navigator.requestMIDIAccess();
    } catch (error) {
      this.midiStatus.textContent = `MIDI not allowed: ${error.message || error}`;
      return;
    }
    const listen = () => {
      for (const input of this.midi.inputs.values()) input.onmidimessage = (event) => this.onMidi(event.data);
      const names = [...this.midi.inputs.values()].map((i) => i.name);
      this.midiStatus.textContent = names.length ? `MIDI: ${names.join(", ")}` : "MIDI: no input connected";
    };
    this.midi.onstatechange = listen;
    listen();
  }

  onMidi(data) {
    const message = parseMidi(data);
    if (!message) return;
    if (this.learning) {
      this.bind(this.learning, message);
      return;
    }
    for (const [id, b] of Object.entries(this.mapping)) {
      if (b.kind === message.kind && b.channel === message.channel && b.number === message.number) {
        this.play(id, message);
      }
    }
  }

  bind(id, message) {
    for (const [other, b] of Object.entries(this.mapping)) {  // one control per knob or pad
      if (b.kind === message.kind && b.channel === message.channel && b.number === message.number) {
        delete this.mapping[other];
      }
    }
    this.mapping[id] = { kind: message.kind, channel: message.channel, number: message.number };
    this.learning = null;
    this.changed();
  }

  play(id, message) {
    const control = this.controls.get(id);
    if (!control) return;
    if (control.fire) {
      if (message.kind === "note" || message.value >= 64) control.fire();
      return;
    }
    control.set(ccToRange(message.value, control.min, control.max, control.step));
  }

  // ---------------------------------------------------------------- sending
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

  // ---------------------------------------------------------------- presets
  // What the running loop can change (a preset holds only what it can recall); unknown without a loop.
  async capabilities() {
    try {
      const state = await (await api.fetchApi(`/streamv2v/loop/${this.panel.session}/params`, { cache: "no-store" })).json();
      if (state.can) return state.can;
    } catch (error) { /* no loop: guess below */ }
    return { clip: Boolean(this.live.prompt.value.trim()) };
  }

  async snapshot() {
    const can = await this.capabilities();
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

  async storePreset(n) {
    this.presets[n - 1] = await this.snapshot();
    this.setStoring(false);
    this.showPresets();
    this.changed();
    this.syncPresets(true);
  }

  setStoring(on) {
    this.storing = on;
    this.storeButton.textContent = on ? "pick 1-8…" : "Store…";
  }

  showPresets() {
    this.presetButtons.forEach((b, i) => {
      const p = this.presets[i];
      b.style.opacity = p ? "1" : "0.45";
      b.title = p ? Object.entries(p).map(([k, v]) => `${k}: ${v}`).join("\n") : "empty: Store… then this number";
    });
  }

  async recall(n) {
    const preset = this.presets[n - 1];
    if (!preset) {
      this.live.note.textContent = `preset ${n} is empty: press Store… then ${n}`;
      return null;
    }
    this.show(preset);
    await this.syncPresets();
    return this.post(this.presetsSent ? { preset: n } : preset);
  }

  show(preset) {  // the controls show what the recall sets
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

  // The running loop gets the workflow's presets (for OSC recalls too); once per change of them.
  async syncPresets(force = false) {
    const json = JSON.stringify(this.presets);
    if (!force && this.presetsSent === json) return;
    try {
      const response = await api.fetchApi(`/streamv2v/loop/${this.panel.session}/presets`, {
        method: "POST", body: JSON.stringify({ presets: this.presets }), headers: { "Content-Type": "application/json" },
      });
      this.presetsSent = response.ok ? json : null;
    } catch (error) {
      this.presetsSent = null;
    }
  }

  onKey(event) {
    const tag = event.target?.tagName;
    if (tag === "TEXTAREA" || tag === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
    const n = Number(event.key);
    if (Number.isInteger(n) && n >= 1 && n <= PRESETS) {
      event.preventDefault();
      event.stopPropagation();  // not the canvas' shortcuts
      this.recall(n);
    }
  }
}

function widgetNumber(node, name, fallback) {
  const value = Number(node.widgets?.find((w) => w.name === name)?.value);
  return Number.isFinite(value) ? value : fallback;
}

// A workflow saved before the loop had its OSC/take inputs holds the upload button's value where osc_port is now:
// those inputs go back to their defaults (the frontend assigns saved values by position).
const INSTRUMENT_DEFAULTS = { osc_port: 0, osc_host: "127.0.0.1", record_take: true };

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
      this.streamv2vWebcam?.instrument?.renderMapping();
      this.streamv2vWebcam?.instrument?.showPresets();
      return result;
    };
  },
});
