// StreamV2V live controls under the loop node's output: the prompt, ControlNet strength, FF alpha, blend frames
// and Clear bank of the running loop, sent to POST /streamv2v/loop/<session>/params (nodes/loop_params_routes.py).
// A change takes effect at the next frame that enters the stream, without restarting the loop; the server checks
// every value (a 400 names the field and the rule, and nothing changes) and the line below says what happened.
// After a page reload the boxes are filled from GET .../params (the running loop's current values).
import { api } from "../../scripts/api.js";

const POLL_MS = 1000;

export function element(tag, css, text) {
  const e = document.createElement(tag);
  if (css) e.style.cssText = css;
  if (text !== undefined) e.textContent = text;
  return e;
}

export function slider(label, min, max, step, value) {
  const wrap = element("label", "display:flex;align-items:center;gap:4px;font-size:12px;white-space:nowrap;");
  const input = element("input", "width:110px;");
  Object.assign(input, { type: "range", min, max, step, value });
  const shown = element("span", "min-width:2.6em;font-variant-numeric:tabular-nums;", String(value));
  input.addEventListener("input", () => { shown.textContent = Number(input.value).toFixed(2); });
  wrap.append(label, input, shown);
  return { wrap, input, shown };
}

export class LiveControls {
  constructor(panel) {
    this.panel = panel;
    this.root = element("div", "display:flex;flex-direction:column;gap:4px;flex:0 0 auto;");
    this.root.className = "streamv2v-live";
    const top = element("div", "display:flex;gap:6px;align-items:stretch;");
    this.prompt = element("textarea", "flex:1;min-height:2.8em;resize:vertical;font:13px sans-serif;"
      + "background:#1b1b1b;color:#eee;border:1px solid #555;border-radius:4px;padding:4px;");
    this.prompt.className = "streamv2v-live-prompt";
    this.prompt.placeholder = "Live prompt (Ctrl+Enter sends it; needs the loop's 'clip' input connected)";
    this.prompt.addEventListener("keydown", (event) => {
      event.stopPropagation();  // typing here must not trigger the canvas' shortcuts
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) this.sendPrompt();
    });
    this.send = element("button", "font-size:13px;padding:4px 12px;border-radius:6px;cursor:pointer;", "Send prompt");
    this.send.addEventListener("click", () => this.sendPrompt());
    top.append(this.prompt, this.send);
    const row = element("div", "display:flex;gap:10px;align-items:center;flex-wrap:wrap;");
    this.strength = slider("ControlNet", 0, 2, 0.05, 1);
    this.alpha = slider("FF alpha", 0, 1, 0.05, 0.75);
    this.strength.input.addEventListener("change", () => this.post({ control_strength: Number(this.strength.input.value) }));
    this.alpha.input.addEventListener("change", () => this.post({ ff_alpha: Number(this.alpha.input.value) }));
    const blendLabel = element("label", "display:flex;align-items:center;gap:4px;font-size:12px;", "blend");
    this.blend = element("input", "width:4em;");
    const blendWidget = panel.node.widgets?.find((w) => w.name === "blend_frames");
    Object.assign(this.blend, { type: "number", min: 0, max: 1000, step: 1, value: blendWidget?.value ?? 8,
                                title: "frames a new prompt is blended in over" });
    blendLabel.append(this.blend, "frames");
    this.clear = element("button", "font-size:12px;padding:3px 10px;border-radius:6px;cursor:pointer;", "Clear bank");
    this.clear.addEventListener("click", () => this.post({ clear_bank: true }));
    row.append(this.strength.wrap, this.alpha.wrap, blendLabel, this.clear);
    this.note = element("div", "font-size:12px;min-height:1.2em;");
    this.note.className = "streamv2v-live-note";
    this.root.append(top, row, this.note);
    this.changesSeen = null;
    this.polledAt = 0;
    this.loaded = false;
  }

  get url() {
    return `/streamv2v/loop/${this.panel.session}/params`;
  }

  sendPrompt() {
    const text = this.prompt.value.trim();
    if (!text) {
      this.note.textContent = "type a prompt first";
      return;
    }
    this.post({ prompt: text, blend_frames: Number(this.blend.value) });
  }

  // One change; the answer (or the server's reason for a 400) is shown on the line below.
  async post(body) {
    try {
      const response = await api.fetchApi(this.url, { method: "POST", body: JSON.stringify(body),
                                                      headers: { "Content-Type": "application/json" } });
      const answer = await response.json();
      if (!response.ok) {
        this.note.textContent = `not changed: ${answer.error}`;
        this.note.style.color = "#ff8a80";
        return answer;
      }
      this.note.textContent = "sent: applies at the next frame";
      this.note.style.color = "";
      this.refreshSoon(true);
      return answer;
    } catch (error) {
      this.note.textContent = `not sent: ${error.message}`;
      this.note.style.color = "#ff8a80";
      return null;
    }
  }

  // The running loop's values and its newest applied change, at most once a second (or now, after a change).
  async refreshSoon(now = false) {
    const t = performance.now();
    if (!now && t - this.polledAt < POLL_MS) return;
    this.polledAt = t;
    let state;
    try {
      state = await (await api.fetchApi(this.url, { cache: "no-store" })).json();
    } catch (error) {
      return;
    }
    if (!state.running) return;
    this.fill(state.current || {});
    // The log holds applied changes and problems (a prompt the loop could not encode, a frame that came out
    // not finite): the newest one is shown, problems in red.
    const newest = state.log?.[state.log.length - 1];
    const seen = `${state.changes}/${state.problems}`;
    if (newest && seen !== this.changesSeen) {
      this.changesSeen = seen;
      this.note.textContent = newest.problem ? `frame ${newest.frame}: ${newest.problem}`
        : `applied at frame ${newest.frame}: ${newest.change}`;
      this.note.style.color = newest.problem ? "#ff8a80" : "";
    }
  }

  // After a reload: show what the running loop uses now (never overwrite what the performer is typing).
  fill(current) {
    if (this.loaded) return;
    this.loaded = true;
    if (current.prompt && !this.prompt.value) this.prompt.value = current.prompt;
    if (current.control_strength != null) this.setSlider(this.strength, current.control_strength);
    if (current.ff_alpha != null) this.setSlider(this.alpha, current.ff_alpha);
    if (current.blend_frames != null) this.blend.value = current.blend_frames;
  }

  setSlider(control, value) {
    control.input.value = value;
    control.shown.textContent = Number(value).toFixed(2);
  }
}
