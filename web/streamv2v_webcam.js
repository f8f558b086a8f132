// StreamV2V performer panel on the StreamV2VLoop node (and the link-only StreamV2VWebcamEcho node).
//
// The browser's webcam goes to the server over one WebSocket (/streamv2v/webcam/<session>/ws, see
// nodes/loop/routes.py): the server says "ready" when its loop took the last frame, and the panel sends the next
// one at once. Restyled frames come back as they finish, each with the stamp of its source frame (the frame whose
// pixels they hold). The panel shows them large, with the frame rate and capture-to-display latency measured on
// this page's own clock only: a stamp this page did not send (an old page's, before a reload) is shown but never
// used for latency or for ordering.
// One Start/Stop toggle starts the camera and queues the workflow (unless the session's loop already runs), and
// stops both. A workflow the server refuses, or one that fails while it runs, shows its message here, the toggle
// returns to Start and the camera is released. After a reload of the editor, a panel whose tab was taking rejoins
// the session's running loop by itself (camera on again, no click). The stage page of the session
// (GET /streamv2v/stage/<session>: the output full window, for OBS, a projector or another machine; its URL is
// shown with a Copy button) is what "Pop out" opens, so it survives reloads of the editor.
// Live controls (web/streamv2v_live_controls.js) go to POST /streamv2v/loop/<session>/params.
// Other extensions hook in through window.StreamV2V (web/streamv2v_panel_api.js; see web/README.md).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LiveControls } from "./streamv2v_live_controls.js";
import { PANELS } from "./streamv2v_panel_api.js";
import { copyText, executionErrorText, queueGraph, rememberTake, stageUrl, wasTaking } from "./streamv2v_take.js";

const NODE_TYPES = new Set(["StreamV2VLoop", "StreamV2VWebcamEcho"]);
const BROWSER = "browser webcam";
const MAX_SIDE = 512;      // without width/height on the node, frames are scaled down to this before sending
const JPEG_QUALITY = 0.85;
const STAMP_BYTES = 8;     // little-endian float64: performance.now() at capture, on this page's clock
const WINDOW_MS = 2000;    // frame rate over the last 2 s
const LATENCIES = 60;      // latency: mean of the last 60 frames
const FRESH_MS = 50;       // a frame captured ahead is sent only if it is younger than this
const SENT_KEPT = 256;     // stamps this page sent and may still get back (bounded)
const TRACE_KEPT = 512;    // capture stamps sent and frames received, kept for tests and the hook API (bounded)
const REJOIN_DELAY_MS = 300;  // after a reload: let the workflow's widget values land before reading the session
const TEXT_PREVIEW = "$$node-text-preview";  // the frontend's progress-text widget (mirrored into our report line)
// Inputs that do nothing for a source: hidden while it is chosen (the tester's list for the browser webcam).
const HIDDEN_FOR = {
  "video file": ["camera_index", "fps"],
  "image folder": ["camera_index"],
  "camera": ["file", "every_nth"],
  [BROWSER]: ["file", "camera_index", "every_nth"],
  "take": ["camera_index"],  // a take replays its own frames: the file is the take's folder
};

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function widgetValue(node, name, fallback) {
  const w = widget(node, name);
  return w ? w.value : fallback;
}

function keep(list, item) {
  list.push(item);
  if (list.length > TRACE_KEPT) list.shift();
}

function element(tag, css, text) {
  const e = document.createElement(tag);
  if (css) e.style.cssText = css;
  if (text !== undefined) e.textContent = text;
  return e;
}

export class WebcamPanel {
  constructor(node) {
    this.node = node;
    this.isLoop = node.comfyClass === "StreamV2VLoop" || node.type === "StreamV2VLoop";
    this.stream = null;
    this.socket = null;
    this.taking = false;
    this.wanted = false;  // the server said "ready": send one frame as soon as the camera can give one
    this.prepared = null; // a frame captured ahead while the server works (see sendFrame)
    this.server = null;
    this.promptId = null; // the prompt this panel queued (its execution_error / execution_interrupted end the take)
    this.sent = new Map(); // stamp -> true for frames this page sent (latency and ordering use only these)
    this.listeners = new Map();  // event -> Set of callbacks (the hook API: "take", "frame", "live")
    this.resetStats();
    this.popup = null;
    this.build();
  }

  resetStats() {
    this.stats = { sent: 0, shown: 0, received: 0, fps: 0, latencyMs: null, latencies: [], captureMs: [] };
    this.trace = { sent: [], received: [] };  // [stamp], [[received at, stamp, ours]]: oldest dropped first
    this.shownAt = [];
    this.newestShown = -Infinity;
    this.sent.clear();
  }

  build() {
    this.root = element("div", "display:flex;flex-direction:column;gap:6px;width:100%;height:100%;min-height:0;"
      + "box-sizing:border-box;font:12px sans-serif;color:#ddd;");
    this.root.className = "streamv2v-webcam";
    const bar = element("div", "display:flex;gap:6px;align-items:center;flex-wrap:wrap;flex:0 0 auto;");
    this.toggleButton = this.button("● Start", () => this.toggle(),
      "font-size:15px;font-weight:600;padding:6px 16px;min-height:34px;border-radius:6px;border:0;"
      + "background:#2e7d32;color:#fff;cursor:pointer;");
    this.toggleButton.className = "streamv2v-toggle";
    this.popButton = this.button("Pop out ↗", () => this.popOut(),
      "font-size:13px;padding:6px 10px;min-height:34px;border-radius:6px;cursor:pointer;");
    this.popButton.title = "Open the stage page (the output full window; it survives reloads of this editor)";
    this.status = element("span", "font-size:13px;font-variant-numeric:tabular-nums;");
    this.status.className = "streamv2v-status";
    bar.append(this.toggleButton, this.popButton, this.status);
    this.video = element("video", "display:none;");
    this.video.muted = true;
    this.video.playsInline = true;
    this.output = element("canvas", "width:100%;flex:1 1 auto;min-height:120px;height:0;object-fit:contain;"
      + "background:#000;border-radius:4px;");
    this.output.className = "streamv2v-output";
    this.output.addEventListener("dblclick", () => this.popOut());
    this.capture = document.createElement("canvas");
    this.report = element("div", "font-size:12px;opacity:0.85;white-space:pre-wrap;max-height:3.6em;overflow:auto;"
      + "flex:0 0 auto;");
    this.report.className = "streamv2v-report";
    this.root.append(bar, this.buildStageLine(), this.video, this.output);
    if (this.isLoop) {
      this.controls = new LiveControls(this);
      this.root.append(this.controls.root);
    }
    this.extensions = element("div", "display:flex;gap:8px;align-items:center;flex-wrap:wrap;flex:0 0 auto;");
    this.extensions.className = "streamv2v-extensions";  // controls other extensions add (addControl)
    this.root.append(this.extensions, this.report);
  }

  // "Stage: <url> [Copy]": the page OBS (Browser Source), a projector or another machine opens.
  buildStageLine() {
    const line = element("div", "display:flex;gap:6px;align-items:center;font-size:12px;flex:0 0 auto;min-width:0;");
    this.stageLink = element("a", "color:#8ab4f8;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;"
      + "min-width:0;flex:0 1 auto;");
    this.stageLink.className = "streamv2v-stage-url";
    this.stageLink.target = "_blank";
    this.stageLink.title = "The stage page: open it in OBS (Browser Source), on a projector or on another machine "
      + "(there, use this server's network address instead of localhost). …/mjpeg is the same as an MJPEG stream "
      + "(OBS Media Source, VLC, ffmpeg).";
    const copy = this.button("Copy", async () => {
      copy.textContent = (await copyText(this.stageUrl())) ? "Copied" : "Copy failed";
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    }, "font-size:12px;padding:2px 8px;border-radius:5px;cursor:pointer;");
    copy.className = "streamv2v-stage-copy";
    line.append(element("span", "opacity:0.8;", "Stage:"), this.stageLink, copy);
    this.refreshStageLine();
    return line;
  }

  refreshStageLine() {
    const url = this.stageUrl();
    if (this.stageLink.href !== url) {
      this.stageLink.href = url;
      this.stageLink.textContent = url;
    }
  }

  button(label, onClick, css) {
    const b = element("button", css || "", label);
    b.addEventListener("click", onClick);
    return b;
  }

  get session() {
    return encodeURIComponent(String(widgetValue(this.node, "session", "webcam")));
  }

  get source() {
    return this.isLoop ? String(widgetValue(this.node, "source", BROWSER)) : BROWSER;
  }

  stageUrl() {
    return stageUrl(this.session);
  }

  socketUrl() {
    const url = new URL(api.apiURL(`/streamv2v/webcam/${this.session}/ws`), window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  // ------------------------------------------------------------------ the one-click take
  async toggle() {
    if (this.taking) await this.stopTake();
    else await this.startTake();
  }

  // join: only join a running loop (after a reload), never queue the workflow.
  async startTake(join = false) {
    this.taking = true;
    this.sawRunning = false;
    this.promptId = null;
    this.renderToggle();
    this.resetStats();
    this.controls?.newTake();
    rememberTake(this.session, true);
    if (this.source === BROWSER) await this.start();
    else this.connect();  // other sources: the socket still brings status (and frames for the webcam echo)
    if (!this.taking) return;
    if (await this.loopRunning()) this.say("the loop of this session already runs: joined it");
    else if (join) this.loopEnded("the loop of this session is no longer running");
    else await this.queue();
    this.emit("take", { taking: this.taking });
  }

  async queue() {
    this.say("queueing the workflow…");
    const queued = await queueGraph();
    if (queued.error) {
      this.failed(`not started: ${queued.error}`);
      return;
    }
    this.promptId = queued.promptId;
    if (this.taking && !this.sawRunning) this.say("queued: the loop starts when the queue reaches it");
  }

  // The take cannot go on (refused, failed, ended): the toggle says Start, the camera and the link are released.
  release() {
    this.taking = this.sawRunning = false;
    rememberTake(this.session, false);
    this.renderToggle();
    this.stream?.getTracks().forEach((track) => track.stop());
    this.stream = null;
    const socket = this.socket;
    this.socket = null;
    socket?.close();
    this.emit("take", { taking: false });
  }

  // The workflow was refused or failed: its message, in red, where the performer looks.
  failed(text) {
    this.release();
    this.say(text, true);
    this.report.textContent = text;
  }

  // The loop ended on its own (a file ran out, idle_timeout, an error, Stop from another page).
  loopEnded(text = "the loop ended") {
    this.release();
    this.say(text);
  }

  async stopTake() {
    this.taking = false;
    rememberTake(this.session, false);
    this.renderToggle();
    await this.stop();
    this.emit("take", { taking: false });
  }

  // After a reload: this tab was taking and the session's loop still runs: join it, camera on, no click.
  rejoinSoon() {
    clearTimeout(this.rejoinTimer);
    this.rejoinTimer = setTimeout(async () => {
      if (this.taking || !this.isLoop || !wasTaking(this.session)) return;
      if (await this.loopRunning()) await this.startTake(true);
      else rememberTake(this.session, false);
    }, REJOIN_DELAY_MS);
  }

  async loopRunning() {
    try {
      const response = await api.fetchApi(`/streamv2v/loop/${this.session}/status`, { cache: "no-store" });
      return !!(await response.json()).running;
    } catch (error) {
      return false;
    }
  }

  // ComfyUI's execution events for the prompt this panel queued.
  onExecution(type, detail) {
    if (!this.taking || !detail || detail.prompt_id !== this.promptId) return;
    if (type === "execution_error") this.failed(`failed: ${executionErrorText(detail)}`);
    else if (type === "execution_interrupted") this.loopEnded("cancelled (the MP4 keeps every frame written)");
  }

  renderToggle() {
    const b = this.toggleButton;
    b.textContent = this.taking ? "■ Stop" : "● Start";
    b.style.background = this.taking ? "#c62828" : "#2e7d32";
    b.title = this.taking ? "Stop the camera and the loop (the MP4 keeps every frame)"
      : "Start the camera (browser webcam) and queue the workflow";
  }

  // ------------------------------------------------------------------ camera and socket
  async start() {
    if (this.stream) return;
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (error) {
      this.failed(`webcam refused: ${error.message}`);
      return;
    }
    this.cameraFps = this.stream.getVideoTracks()[0]?.getSettings?.().frameRate ?? null;
    this.video.srcObject = this.stream;
    this.video.onplaying = () => this.sendFrame();
    await this.video.play();
    this.say("webcam on");
    this.connect();
  }

  connect() {
    if (this.socket) return;
    this.newestShown = -Infinity;  // a new link: order frames afresh
    const socket = new WebSocket(this.socketUrl());
    socket.binaryType = "arraybuffer";
    // the camera's own frame rate: a live recording's default grid (the loop's fps input 0)
    socket.onopen = () => this.cameraFps && socket.send(JSON.stringify({ type: "camera", fps: this.cameraFps }));
    socket.onmessage = (event) => {
      if (typeof event.data === "string") this.onText(JSON.parse(event.data));
      else this.onFrame(event.data);
    };
    socket.onclose = () => {
      if (this.socket === socket) this.socket = null;
      if (this.taking) setTimeout(() => this.taking && !this.socket && this.connect(), 1000);  // server restarted
    };
    this.socket = socket;
  }

  onText(message) {
    if (message.type === "ready") {
      this.wanted = true;
      this.sendFrame();
    } else if (message.type === "status") {
      this.server = message;
      if (message.running) this.sawRunning = true;
      else if (this.taking && this.sawRunning) this.loopEnded();
      this.render();
    }
  }

  // The size frames are sent at: the node's width x height when both are set (cropped to cover), else the
  // camera's, scaled down to MAX_SIDE.
  captureSize() {
    const w = Number(widgetValue(this.node, "width", 0)), h = Number(widgetValue(this.node, "height", 0));
    if (w > 0 && h > 0) return [w, h];
    const scale = Math.min(1, MAX_SIDE / Math.max(this.video.videoWidth, this.video.videoHeight));
    return [Math.round(this.video.videoWidth * scale), Math.round(this.video.videoHeight * scale)];
  }

  // One message: the capture time (8 bytes) and the frame as JPEG, at the size the node asks for.
  encodeFrame() {
    const stamp = performance.now();
    const [w, h] = this.captureSize();
    const vw = this.video.videoWidth, vh = this.video.videoHeight;
    const cover = Math.max(w / vw, h / vh);
    const sw = w / cover, sh = h / cover;
    this.capture.width = w;
    this.capture.height = h;
    this.capture.getContext("2d").drawImage(this.video, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, w, h);
    // toDataURL encodes at once on this thread; toBlob queues the encoding on a low-priority worker, which a
    // busy machine starves (half a second a frame measured on a loaded 2-core machine).
    const url = this.capture.toDataURL("image/jpeg", JPEG_QUALITY);
    const base64 = atob(url.slice(url.indexOf(",") + 1));
    const message = new Uint8Array(STAMP_BYTES + base64.length);
    new DataView(message.buffer).setFloat64(0, stamp, true);
    for (let i = 0; i < base64.length; i++) message[STAMP_BYTES + i] = base64.charCodeAt(i);
    this.stats.captureMs.push(performance.now() - stamp);
    if (this.stats.captureMs.length > LATENCIES) this.stats.captureMs.shift();
    return { stamp, message };
  }

  // On "ready": send the frame prepared after the last send if it is still fresh, else capture one now. When the
  // server asks often, the next frame is prepared while it works on this one, which takes the capture off the
  // link's critical path; its stamp is its capture time, so the latency shown includes the wait.
  sendFrame() {
    const socket = this.socket;
    if (!this.wanted || !this.stream || !socket || socket.readyState !== WebSocket.OPEN || !this.video.videoWidth) {
      return;
    }
    this.wanted = false;  // one frame per "ready": a second one would only replace this one on the server
    try {
      const now = performance.now();
      let frame = this.prepared;
      this.prepared = null;
      if (!frame || now - frame.stamp > FRESH_MS) frame = this.encodeFrame();
      socket.send(frame.message);
      this.remember(frame.stamp);
      keep(this.trace.sent, frame.stamp);
      this.stats.sent += 1;
      const gap = now - (this.lastSentAt ?? -Infinity);
      this.lastSentAt = now;
      if (gap < FRESH_MS) {
        setTimeout(() => {
          if (this.stream && !this.prepared && !this.wanted) this.prepared = this.encodeFrame();
        }, 0);
      }
    } catch (error) {
      this.say(`error: ${error.message}`, true);
    }
  }

  remember(stamp) {
    this.sent.set(stamp, true);
    if (this.sent.size > SENT_KEPT) this.sent.delete(this.sent.keys().next().value);
  }

  async onFrame(data) {
    const stamp = new DataView(data).getFloat64(0, true);
    const ours = this.sent.has(stamp);  // sent by this page: its clock, so latency and order mean something
    this.stats.received += 1;
    keep(this.trace.received, [performance.now(), stamp, ours]);
    const bitmap = await createImageBitmap(new Blob([data.slice(STAMP_BYTES)], { type: "image/jpeg" }));
    if (ours && stamp < this.newestShown) {  // a newer frame was decoded first: show the present
      bitmap.close();
      return;
    }
    if (ours) this.newestShown = stamp;
    this.draw(bitmap);
    const now = performance.now();
    const stats = this.stats;
    stats.shown += 1;
    this.output.dataset.frames = String(stats.shown);
    this.shownAt.push(now);
    while (this.shownAt.length && this.shownAt[0] < now - WINDOW_MS) this.shownAt.shift();
    stats.fps = this.shownAt.length > 1 ? (this.shownAt.length - 1) * 1000 / (now - this.shownAt[0]) : 0;
    if (ours) {
      stats.latencies.push(now - stamp);
      if (stats.latencies.length > LATENCIES) stats.latencies.shift();
      stats.latencyMs = stats.latencies.reduce((a, b) => a + b, 0) / stats.latencies.length;
    }
    this.render();
    this.emit("frame", { shown: stats.shown, latencyMs: stats.latencyMs });
  }

  draw(bitmap) {
    const canvas = this.output;
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
  }

  render() {
    const now = performance.now();
    if (now - (this.renderedAt ?? 0) < 250) return;  // the text at most 4 times a second: layout costs frames
    this.renderedAt = now;
    const s = this.stats, server = this.server;
    const parts = [`${s.fps.toFixed(1)} fps`];
    parts.push(s.latencyMs !== null ? `latency ${Math.round(s.latencyMs)} ms` : "latency –");
    parts.push(`sent ${s.sent}`, `shown ${s.shown}`);
    if (server) {
      const dropped = Object.values(server.dropped || {}).reduce((a, b) => a + b, 0);
      if (dropped) parts.push(`dropped ${dropped}`);
      if (!server.running) parts.push("waiting for the loop to run");
      else if (server.idle_s > 2) {
        const ends = server.idle_timeout ? ` (the loop ends at ${server.idle_timeout} s)` : "";
        parts.push(`no frame for ${Math.round(server.idle_s)} s${ends}`);
      }
    }
    this.say(parts.join(" · "));
    this.controls?.refreshSoon();
    this.refreshStageLine();
  }

  say(text, error = false) {
    this.status.textContent = text;
    this.status.style.color = error ? "#ff8a80" : "";
  }

  async stop() {
    this.stream?.getTracks().forEach((track) => track.stop());
    this.stream = null;
    const socket = this.socket;
    this.socket = null;
    socket?.close();
    try {
      if (this.promptId && !this.sawRunning) {  // still waiting in the queue: take it out, no take starts later
        await api.fetchApi("/queue", { method: "POST", body: JSON.stringify({ delete: [this.promptId] }) });
      }
      await api.fetchApi(`/streamv2v/loop/${this.session}/stop`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
      this.say("stopped");
    } catch (error) {
      this.say(`stop failed: ${error.message}`, true);
    }
  }

  // ------------------------------------------------------------------ pop-out: the stage page (projector)
  // Its own page (not drawn by this one), so it keeps receiving frames while the editor reloads or closes.
  popOut() {
    if (this.popup && !this.popup.closed) {
      this.popup.focus();
      return;
    }
    const popup = window.open(this.stageUrl(), `streamv2v_stage_${this.session}`, "width=960,height=600");
    if (!popup) {
      this.say("the pop-out window was blocked: allow pop-ups for this page, or open the stage URL", true);
      return;
    }
    this.popup = popup;
  }

  // ------------------------------------------------------------------ hook API (streamv2v_panel_api.js)
  liveValues() {
    return this.controls?.values() ?? { running: false, can: null, current: {}, inEffect: null };
  }

  setLive(change) {
    if (!this.controls) return Promise.resolve({ ok: false, error: "this node has no live controls" });
    return this.controls.post(change);
  }

  addControl(control) {
    this.extensions.append(control);
    return () => control.remove();
  }

  on(event, callback) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(callback);
    return () => this.listeners.get(event)?.delete(callback);
  }

  emit(event, detail) {
    for (const callback of this.listeners.get(event) ?? []) {
      try {
        callback(detail, this);
      } catch (error) {
        console.error(`StreamV2V panel: a "${event}" listener failed`, error);
      }
    }
  }

  // ------------------------------------------------------------------ the node around the panel
  mirrorProgressText(text) {
    const preview = widget(this.node, TEXT_PREVIEW);  // drawn over the panel otherwise: shown in our line instead
    if (preview && !preview.hidden) {
      preview.hidden = true;
      if (preview.element) preview.element.style.display = "none";
    }
    this.report.textContent = text;
  }

  showInputsFor() {
    if (!this.isLoop) return;
    const hidden = new Set(HIDDEN_FOR[this.source] || []);
    if (widgetValue(this.node, "control_hint", "none") !== "hint video") hidden.add("hint_file");
    const noFiles = hidden.has("file") && hidden.has("hint_file");
    let changed = false;
    for (const w of this.node.widgets || []) {
      const upload = w.type === "button" && /upload/i.test(String(w.name) + String(w.label ?? ""));
      if (!(w.name in WATCHED) && !upload) continue;
      changed = setHidden(w, upload ? noFiles : hidden.has(w.name)) || changed;
    }
    if (changed) {
      this.node.setSize([this.node.size[0], this.node.computeSize()[1]]);
      this.node.setDirtyCanvas?.(true, true);
    }
  }
}

// A hidden widget takes no row: ``hidden`` (the frontend skips it when drawing) and a zero size (its layout still
// counts the widget otherwise). The widget's own computeSize comes back when it is shown again.
function setHidden(w, hide) {
  if (!!w.hidden === hide) return false;
  w.hidden = hide;
  if (hide) {
    w.streamv2vComputeSize = w.computeSize;
    w.computeSize = () => [0, -4];
  } else {
    w.computeSize = w.streamv2vComputeSize;
    delete w.streamv2vComputeSize;
  }
  return true;
}

const WATCHED = Object.fromEntries(["file", "fps", "camera_index", "every_nth", "hint_file"].map((n) => [n, true]));

function attachPanel(node) {
  const panel = new WebcamPanel(node);
  node.streamv2vWebcam = panel;
  node.addDOMWidget("streamv2v_webcam", "streamv2v_webcam", panel.root, {
    serialize: false,
    getMinHeight: () => (panel.isLoop ? 520 : 260),
  });
  node.setSize([Math.max(node.size[0], panel.isLoop ? 640 : 360), Math.max(node.size[1], node.computeSize()[1])]);
  for (const name of ["source", "control_hint"]) {
    const w = widget(node, name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function () {
      const result = callback?.apply(this, arguments);
      panel.showInputsFor();
      return result;
    };
  }
  panel.showInputsFor();
  PANELS.add(panel);
  panel.rejoinSoon();  // a node made by loading a workflow: configured next, then its session is read
  return panel;
}

app.registerExtension({
  name: "StreamV2V.Webcam",
  async setup() {
    api.addEventListener("progress_text", (event) => {
      const { nodeId, text } = event.detail || {};
      const node = app.graph?.getNodeById?.(nodeId);
      node?.streamv2vWebcam?.mirrorProgressText(text);
    });
    for (const type of ["execution_error", "execution_interrupted"]) {
      api.addEventListener(type, (event) => PANELS.forEach((panel) => panel.onExecution(type, event.detail)));
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      attachPanel(this);
      return result;
    };
    const configured = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = configured?.apply(this, arguments);
      this.streamv2vWebcam?.showInputsFor();  // a loaded workflow's source
      this.streamv2vWebcam?.rejoinSoon();  // after a reload: its session's loop may still run
      return result;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      if (this.streamv2vWebcam?.taking) this.streamv2vWebcam.stopTake();
      else if (this.streamv2vWebcam?.stream) this.streamv2vWebcam.stop();
      this.streamv2vWebcam?.popup?.close();
      PANELS.delete(this.streamv2vWebcam);
      return removed?.apply(this, arguments);
    };
  },
});
