// StreamV2V MIDI map for the instrument (web/streamv2v_instrument.js): Web MIDI (Chromium and Edge, secure contexts
// only: localhost or HTTPS), MIDI-learn for every control the instrument lists, the mapping kept in the node's
// properties (it travels in the workflow JSON) and shown in a mapping view.
import { app } from "../../scripts/app.js";
import { element } from "./streamv2v_live_controls.js";

const MIDI_KEY = "streamv2v_midi";        // node.properties: { control id: { kind: "cc"|"note", channel, number } }
const CC = 0xb0, NOTE_ON = 0x90;

// What a MIDI message means: { kind, channel (1-16), number, value (0..127) } or null (note off, clock, sysex).
export function parseMidi(data) {
  if (!data || data.length < 3) return null;
  const type = data[0] & 0xf0, channel = (data[0] & 0x0f) + 1;
  if (type === CC) return { kind: "cc", channel, number: data[1], value: data[2] };
  if (type === NOTE_ON && data[2] > 0) return { kind: "note", channel, number: data[1], value: data[2] };
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

function sameKnob(a, b) {
  return a.kind === b.kind && a.channel === b.channel && a.number === b.number;
}

// controls: Map id -> { label, min, max, step, set(value) } (a range) or { label, fire() } (a button)
export class MidiMap {
  constructor(node, controls) {
    this.node = node;
    this.controls = controls;
    this.learning = null;
    this.access = null;
    this.root = element("div", "display:flex;flex-direction:column;gap:2px;");
    const bar = element("div", "display:flex;gap:6px;align-items:center;");
    this.mapButton = element("button", "padding:2px 8px;border-radius:6px;cursor:pointer;", "MIDI map");
    this.mapButton.addEventListener("click", () => this.toggle());
    this.status = element("span", "opacity:0.85;");
    this.status.className = "streamv2v-midi-status";
    bar.append(this.mapButton, this.status);
    this.view = element("table", "display:none;border-collapse:collapse;font-size:12px;");
    this.view.className = "streamv2v-midi-map";
    this.root.append(bar, this.view);
    this.render();
    this.start();
  }

  get mapping() {
    this.node.properties = this.node.properties || {};
    return (this.node.properties[MIDI_KEY] = this.node.properties[MIDI_KEY] || {});
  }

  // The node grows by what the mapping view needs (the panel's picture shrinks otherwise).
  toggle() {
    const before = this.view.offsetHeight;
    this.view.style.display = this.view.style.display === "none" ? "" : "none";
    this.node.setSize([this.node.size[0], this.node.size[1] + this.view.offsetHeight - before]);
    app.graph?.setDirtyCanvas?.(true, true);
  }

  render() {
    this.view.replaceChildren();
    const cell = (content) => { const td = element("td", "padding:1px 8px;"); td.append(content); return td; };
    for (const [id, control] of this.controls) {
      const tr = element("tr");
      tr.dataset.control = id;
      const learn = element("button", "padding:0 6px;border-radius:4px;cursor:pointer;",
                            this.learning === id ? "move a control…" : "learn");
      learn.className = "streamv2v-learn";
      learn.addEventListener("click", () => { this.learning = this.learning === id ? null : id; this.render(); });
      const forget = element("button", "padding:0 6px;border-radius:4px;cursor:pointer;", "×");
      forget.title = "forget this mapping";
      forget.addEventListener("click", () => { delete this.mapping[id]; this.changed(); });
      tr.append(cell(control.label), cell(describeBinding(this.mapping[id])), cell(learn), cell(forget));
      this.view.append(tr);
    }
  }

  changed() {
    this.render();
    app.graph?.setDirtyCanvas?.(true, true);  // the workflow has changed: it is saved with the mapping
  }

  async start() {
    if (!window.isSecureContext || !navigator.requestMIDIAccess) {
      this.status.textContent = window.isSecureContext
        ? "MIDI: this browser has no Web MIDI (use Chromium or Edge)"
        : "MIDI needs a secure context: open ComfyUI as http://localhost or over HTTPS (Chromium or Edge)";
      return;
    }
    try {
      this.access = await navigator.requestMIDIAccess();
    } catch (error) {
      this.status.textContent = `MIDI not allowed: ${error.message || error}`;
      return;
    }
    const listen = () => {
      for (const input of this.access.inputs.values()) input.onmidimessage = (event) => this.onMessage(event.data);
      const names = [...this.access.inputs.values()].map((i) => i.name);
      this.status.textContent = names.length ? `MIDI: ${names.join(", ")}` : "MIDI: no input connected";
    };
    this.access.onstatechange = listen;
    listen();
  }

  onMessage(data) {
    const message = parseMidi(data);
    if (!message) return;
    if (this.learning) {
      this.bind(this.learning, message);
      return;
    }
    for (const [id, b] of Object.entries(this.mapping)) if (sameKnob(b, message)) this.play(id, message);
  }

  bind(id, message) {
    for (const [other, b] of Object.entries(this.mapping)) if (sameKnob(b, message)) delete this.mapping[other];
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
}
