// StreamV2V live controls under the loop node's output: the prompt, ControlNet strength, FF alpha, blend frames
// and Clear bank of the running loop, sent to POST /streamv2v/loop/<session>/params (nodes/loop_params_routes.py).
// A change takes effect at the next frame that enters the stream, without restarting the loop; the server checks
// every value (a 400 names the field and the rule, and nothing changes) and the line below says what happened.
// The controls show the server's values, never a guess: they are filled from GET .../params when a take starts
// (also after a reload), a refused change snaps back to the server's value, a control that cannot act on this
// graph (no CLIP connected, no ControlNet, no Feature Fusion, no bank) is disabled with the reason as its tooltip,
// and the line "in effect" says which prompt (or schedule keyframe) the frame on screen was made with.
import { api } from "../../scripts/api.js";

const POLL_MS = 1000;
const NOT_RUNNING = "live controls act on a running loop: press Start";
const REASONS = {  // the server's rule for each capability (streamv2v_core/live/params.py)
  clip: "connect the checkpoint's CLIP to the loop's 'clip' input to change the prompt live",
  control: "the loop's conditioning holds no ControlNet (apply one with core 'Apply ControlNet')",
  fusion: "the loop's model has no StreamV2V Feature Fusion patch",
  bank: "the loop's model uses no feature bank",
};

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
  const shown = element("span", "min-width:2.6em;font-variant-numeric:tabular-nums;", Number(value).toFixed(2));
  input.addEventListener("input", () => { shown.textContent = Number(input.value).toFixed(2); });
  wrap.append(label, input, shown);
  return { wrap, input, shown };
}

// Enable a group of controls, or disable them with the reason on hover.
function able(elements, reason) {
  for (const e of elements) {
    e.disabled = !!reason;
    e.title = reason || e.dataset.title || "";
    e.style.opacity = reason ? "0.5" : "";
  }
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
      event.stopPropagation();  // typing here must not trigger the canvas' shortcuts (Ctrl+Enter queues)
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
    Object.assign(this.blend, { type: "number", min: 0, max: 1000, step: 1, value: blendWidget?.value ?? 8 });
    this.blend.dataset.title = "frames a new prompt is blended in over";
    blendLabel.append(this.blend, "frames");
    this.clear = element("button", "font-size:12px;padding:3px 10px;border-radius:6px;cursor:pointer;", "Clear bank");
    this.clear.addEventListener("click", () => this.post({ clear_bank: true }));
    row.append(this.strength.wrap, this.alpha.wrap, blendLabel, this.clear);
    this.effect = element("div", "font-size:12px;min-height:1.2em;opacity:0.9;white-space:nowrap;overflow:hidden;"
      + "text-overflow:ellipsis;");
    this.effect.className = "streamv2v-live-effect";
    this.note = element("div", "font-size:12px;min-height:1.2em;");
    this.note.className = "streamv2v-live-note";
    this.root.append(top, row, this.effect, this.note);
    this.state = null;  // the server's last answer to GET .../params
    this.polledAt = 0;
    this.newTake();
  }

  get url() {
    return `/streamv2v/loop/${this.panel.session}/params`;
  }

  // A take starts (or the panel joins one): nothing shown is kept from the last take; the server's values come next.
  newTake() {
    this.run = null;
    this.changesSeen = null;
    this.state = null;
    this.effect.textContent = "";
    this.note.textContent = "";
    this.applyCapabilities(null);
  }

  values() {
    const s = this.state;
    return { running: !!s?.running, can: s?.can ?? null, current: { ...(s?.current ?? {}) },
             inEffect: s?.in_effect ?? null };
  }

  sendPrompt() {
    const text = this.prompt.value.trim();
    if (!text) {
      this.say("type a prompt first", true);
      return;
    }
    this.post({ prompt: text, blend_frames: Number(this.blend.value) });
  }

  // One change; the answer (or the server's reason for a refusal) is shown on the line below. A refused change
  // snaps every control back to the server's values. -> {ok, error?, accepted?}
  async post(body) {
    let response, answer;
    try {
      response = await api.fetchApi(this.url, { method: "POST", body: JSON.stringify(body),
                                                headers: { "Content-Type": "application/json" } });
      answer = await response.json();
    } catch (error) {
      this.say(`not sent: ${error.message}`, true);
      await this.refreshSoon(true, true);
      return { ok: false, error: error.message };
    }
    if (!response.ok) {
      this.say(`not changed: ${answer.error}`, true);
      await this.refreshSoon(true, true);
      return { ok: false, error: answer.error };
    }
    this.say("sent: applies at the next frame");
    await this.refreshSoon(true);
    return { ok: true, accepted: answer.accepted };
  }

  say(text, error = false) {
    this.note.textContent = text;
    this.note.style.color = error ? "#ff8a80" : "";
  }

  // The running loop's values, its newest applied change and the prompt in effect, at most once a second (or now,
  // after a change). force: put every control back to the server's value (after a refusal).
  async refreshSoon(now = false, force = false) {
    const t = performance.now();
    if (!now && t - this.polledAt < POLL_MS) return;
    this.polledAt = t;
    let state;
    try {
      state = await (await api.fetchApi(this.url, { cache: "no-store" })).json();
    } catch (error) {
      return;
    }
    this.state = state;
    this.applyCapabilities(state.running ? state.can : null);
    if (!state.running) return;
    const fresh = state.run !== this.run;  // a new run of the loop (or the first look at this one): the server's values
    this.run = state.run;
    this.fill(state.current || {}, fresh || force, fresh);
    this.showEffect(state.in_effect);
    // The log holds applied changes and problems (a prompt the loop could not encode, a frame that came out
    // not finite): the newest one is shown, problems in red.
    const newest = state.log?.[state.log.length - 1];
    const seen = `${state.changes}/${state.problems}`;
    if (newest && seen !== this.changesSeen && !force) {
      this.say(newest.problem ? `frame ${newest.frame}: ${newest.problem}`
        : `applied at frame ${newest.frame}: ${newest.change}`, Boolean(newest.problem));
    }
    this.changesSeen = seen;
    this.panel.emit?.("live", this.values());
  }

  applyCapabilities(can) {
    able([this.prompt, this.send, this.blend], can ? (can.clip ? "" : REASONS.clip) : NOT_RUNNING);
    able([this.strength.input], can ? (can.control ? "" : REASONS.control) : NOT_RUNNING);
    able([this.alpha.input], can ? (can.fusion ? "" : REASONS.fusion) : NOT_RUNNING);
    able([this.clear], can ? (can.bank ? "" : REASONS.bank) : NOT_RUNNING);
  }

  // Show what the running loop uses now. Sliders follow the server when asked (a new take, a refusal); the prompt
  // box only on a new take or while empty (never overwrite what the performer is typing).
  fill(current, sliders, prompt) {
    if (current.prompt && (prompt || !this.prompt.value)) this.prompt.value = current.prompt;
    if (!sliders) return;
    if (current.control_strength != null) this.setSlider(this.strength, current.control_strength);
    if (current.ff_alpha != null) this.setSlider(this.alpha, current.ff_alpha);
    if (current.blend_frames != null) this.blend.value = current.blend_frames;
  }

  showEffect(effect) {
    this.effect.textContent = effect ? `in effect at frame ${effect.frame}: ${effect.prompt}` : "";
    this.effect.title = this.effect.textContent;
  }

  setSlider(control, value) {
    control.input.value = value;
    control.shown.textContent = Number(value).toFixed(2);
  }
}
