// StreamV2V presets for the instrument (web/streamv2v_instrument.js): up to 8 snapshots of the live controls, kept
// in the node's properties (saved with the workflow). A click recalls one (keys 1-8 while the panel has focus, a
// learned MIDI note, OSC /streamv2v/<session>/preset n); "Store…" then a number snapshots the controls into it. A
// recall is one change, blended like any other. The running loop gets the workflow's presets (POST .../presets,
// checked there) so OSC can recall them too.
import { api } from "../../scripts/api.js";
import { element } from "./streamv2v_live_controls.js";

export const PRESETS = 8;
const PRESETS_KEY = "streamv2v_presets";  // node.properties: 8 snapshots (null: empty)
const SYNC_MS = 2000;                     // how often the running loop's presets are compared with the workflow's

// instrument: the Instrument (its node, panel, live controls, snapshot() and show(preset), post(body))
export class PresetBank {
  constructor(instrument) {
    this.instrument = instrument;
    this.node = instrument.node;
    this.storing = false;
    this.sent = null;  // JSON of the presets the running loop has
    this.root = element("div", "display:flex;gap:4px;align-items:center;flex-wrap:wrap;");
    this.root.append(element("span", "", "presets"));
    this.buttons = [];
    for (let n = 1; n <= PRESETS; n++) {
      const b = element("button", "min-width:2.2em;padding:2px 6px;border-radius:6px;cursor:pointer;", String(n));
      b.addEventListener("click", () => (this.storing ? this.store(n) : this.recall(n)));
      this.buttons.push(b);
      this.root.append(b);
    }
    this.storeButton = element("button", "padding:2px 8px;border-radius:6px;cursor:pointer;", "Store…");
    this.storeButton.addEventListener("click", () => this.setStoring(!this.storing));
    this.root.append(this.storeButton);
    this.show();
    // Keys 1-8 recall while the panel has focus (not while typing in one of its boxes).
    const panelRoot = instrument.panel.root;
    panelRoot.tabIndex = panelRoot.tabIndex >= 0 ? panelRoot.tabIndex : 0;
    panelRoot.addEventListener("keydown", (event) => this.onKey(event));
    this.timer = setInterval(() => this.keepSynced(), SYNC_MS);
  }

  get presets() {
    this.node.properties = this.node.properties || {};
    const stored = this.node.properties[PRESETS_KEY];
    if (!Array.isArray(stored) || stored.length !== PRESETS) {
      this.node.properties[PRESETS_KEY] = Array.from({ length: PRESETS }, (_, i) => stored?.[i] ?? null);
    }
    return this.node.properties[PRESETS_KEY];
  }

  get url() {
    return `/streamv2v/loop/${this.instrument.panel.session}`;
  }

  async store(n) {
    this.presets[n - 1] = await this.instrument.snapshot(await this.capabilities());
    this.setStoring(false);
    this.show();
    this.instrument.changed();
    this.sync(true);
  }

  // What the running loop can change (a preset holds only what it can recall); unknown without a loop.
  async capabilities() {
    try {
      const state = await (await api.fetchApi(`${this.url}/params`, { cache: "no-store" })).json();
      if (state.can) return state.can;
    } catch (error) { /* no loop: guess below */ }
    return { clip: Boolean(this.instrument.live.prompt.value.trim()) };
  }

  setStoring(on) {
    this.storing = on;
    this.storeButton.textContent = on ? "pick 1-8…" : "Store…";
  }

  show() {
    this.buttons.forEach((b, i) => {
      const p = this.presets[i];
      b.style.opacity = p ? "1" : "0.45";
      b.title = p ? Object.entries(p).map(([k, v]) => `${k}: ${v}`).join("\n") : "empty: Store… then this number";
    });
  }

  async recall(n) {
    const preset = this.presets[n - 1];
    if (!preset) {
      this.instrument.live.note.textContent = `preset ${n} is empty: press Store… then ${n}`;
      return null;
    }
    this.instrument.show(preset);
    await this.sync();
    return this.instrument.post(this.sent ? { preset: n } : preset);
  }

  async sync(force = false) {
    const json = JSON.stringify(this.presets);
    if (!force && this.sent === json) return;
    try {
      const response = await api.fetchApi(`${this.url}/presets`, {
        method: "POST", body: JSON.stringify({ presets: this.presets }), headers: { "Content-Type": "application/json" },
      });
      this.sent = response.ok ? json : null;
    } catch (error) {
      this.sent = null;
    }
  }

  // A loop that starts (or a server that restarted) gets the workflow's presets, so OSC can recall them.
  async keepSynced() {
    const stored = this.presets.map((p, i) => (p ? i + 1 : 0)).filter(Boolean);
    if (!stored.length) return;
    try {
      const state = await (await api.fetchApi(`${this.url}/params`, { cache: "no-store" })).json();
      if (state.running && JSON.stringify(state.presets || []) !== JSON.stringify(stored)) await this.sync(true);
    } catch (error) { /* the server is away: next time */ }
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

  close() {
    clearInterval(this.timer);
  }
}
