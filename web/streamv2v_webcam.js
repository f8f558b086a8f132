// StreamV2V webcam: captures the browser's webcam for the StreamV2VLoop node ("browser webcam" source) and the
// StreamV2VWebcamEcho node, over one WebSocket (/streamv2v/webcam/<session>/ws, see nodes/webcam_routes.py):
// the server says "ready" when its loop took the last frame, and the panel sends the next one at once (no fixed
// frame cap: as fast as the server takes them). Restyled frames come back as they finish, each with the capture
// time of its source frame, so the panel shows the link's frame rate and capture-to-display latency.
// "Stop" asks the running loop of the node's session to finish (it keeps its MP4), for any source.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["StreamV2VLoop", "StreamV2VWebcamEcho"]);
const MAX_SIDE = 512;      // without width/height on the node, frames are scaled down to this before sending
const JPEG_QUALITY = 0.85;
const STAMP_BYTES = 8;     // little-endian float64: performance.now() at capture
const WINDOW_MS = 2000;    // frame rate over the last 2 s
const LATENCIES = 60;      // latency: mean of the last 60 frames
const FRESH_MS = 50;       // a frame captured ahead is sent only if it is younger than this

function widgetValue(node, name, fallback) {
  const widget = node.widgets?.find((w) => w.name === name);
  return widget ? widget.value : fallback;
}

class WebcamPanel {
  constructor(node) {
    this.node = node;
    this.stream = null;
    this.socket = null;
    this.wanted = false;  // the server said "ready": send one frame as soon as the camera can give one
    this.prepared = null; // a frame captured ahead while the server works (see sendFrame)
    this.server = null;
    this.stats = { sent: 0, shown: 0, fps: 0, latencyMs: null, latencies: [], captureMs: [] };
    this.shownAt = [];
    this.newestShown = -Infinity;
    this.root = document.createElement("div");
    this.root.className = "streamv2v-webcam";
    this.root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;";
    const bar = document.createElement("div");
    bar.style.cssText = "display:flex;gap:4px;align-items:center;font-size:11px;flex-wrap:wrap;";
    this.startButton = this.button("Start webcam", () => this.start());
    this.stopButton = this.button("Stop", () => this.stop());
    this.status = document.createElement("span");
    this.status.className = "streamv2v-status";
    bar.append(this.startButton, this.stopButton, this.status);
    this.video = document.createElement("video");
    this.video.muted = true;
    this.video.playsInline = true;
    this.video.style.display = "none";
    this.output = document.createElement("canvas");
    this.output.className = "streamv2v-output";
    this.output.style.cssText = "width:100%;object-fit:contain;min-height:64px;background:#111;";
    this.capture = document.createElement("canvas");
    this.root.append(bar, this.video, this.output);
  }

  button(label, onClick) {
    const b = document.createElement("button");
    b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  }

  get session() {
    return encodeURIComponent(String(widgetValue(this.node, "session", "webcam")));
  }

  socketUrl() {
    const url = new URL(api.apiURL(`/streamv2v/webcam/${this.session}/ws`), window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  async start() {
    if (this.stream) return;
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (error) {
      this.status.textContent = `webcam refused: ${error.message}`;
      return;
    }
    this.video.srcObject = this.stream;
    this.video.onplaying = () => this.sendFrame();
    await this.video.play();
    this.status.textContent = "webcam on: queue the prompt";
    this.connect();
  }

  connect() {
    const socket = new WebSocket(this.socketUrl());
    socket.binaryType = "arraybuffer";
    socket.onmessage = (event) => {
      if (typeof event.data === "string") this.onText(JSON.parse(event.data));
      else this.onFrame(event.data);
    };
    socket.onclose = () => {
      if (this.socket === socket) this.socket = null;
      if (this.stream) setTimeout(() => this.stream && !this.socket && this.connect(), 1000);  // server restarted
    };
    this.socket = socket;
  }

  onText(message) {
    if (message.type === "ready") {
      this.wanted = true;
      this.sendFrame();
    }
    else if (message.type === "status") {
      this.server = message;
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
    if (!this.wanted || !socket || socket.readyState !== WebSocket.OPEN || !this.video.videoWidth) return;
    this.wanted = false;  // one frame per "ready": a second one would only replace this one on the server
    try {
      const now = performance.now();
      let frame = this.prepared;
      this.prepared = null;
      if (!frame || now - frame.stamp > FRESH_MS) frame = this.encodeFrame();
      socket.send(frame.message);
      this.stats.sent += 1;
      const gap = now - (this.lastSentAt ?? -Infinity);
      this.lastSentAt = now;
      if (gap < FRESH_MS) {
        setTimeout(() => {
          if (this.stream && !this.prepared && !this.wanted) this.prepared = this.encodeFrame();
        }, 0);
      }
    } catch (error) {
      this.status.textContent = `error: ${error.message}`;
    }
  }

  async onFrame(data) {
    const stamp = new DataView(data).getFloat64(0, true);
    const bitmap = await createImageBitmap(new Blob([data.slice(STAMP_BYTES)], { type: "image/jpeg" }));
    if (stamp < this.newestShown) {  // a newer frame was decoded first: show the present
      bitmap.close();
      return;
    }
    this.newestShown = Number.isNaN(stamp) ? this.newestShown : stamp;
    if (this.output.width !== bitmap.width || this.output.height !== bitmap.height) {
      this.output.width = bitmap.width;
      this.output.height = bitmap.height;
    }
    this.output.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    const now = performance.now();
    const stats = this.stats;
    stats.shown += 1;
    this.output.dataset.frames = String(stats.shown);
    this.shownAt.push(now);
    while (this.shownAt.length && this.shownAt[0] < now - WINDOW_MS) this.shownAt.shift();
    stats.fps = this.shownAt.length > 1 ? (this.shownAt.length - 1) * 1000 / (now - this.shownAt[0]) : 0;
    if (!Number.isNaN(stamp)) {
      stats.latencies.push(now - stamp);
      if (stats.latencies.length > LATENCIES) stats.latencies.shift();
      stats.latencyMs = stats.latencies.reduce((a, b) => a + b, 0) / stats.latencies.length;
    }
    this.render();
  }

  render() {
    const now = performance.now();
    if (now - (this.renderedAt ?? 0) < 250) return;  // the text at most 4 times a second: layout costs frames
    this.renderedAt = now;
    const s = this.stats, server = this.server;
    const parts = [`${s.fps.toFixed(1)} fps`];
    if (s.latencyMs !== null) parts.push(`latency ${Math.round(s.latencyMs)} ms`);
    parts.push(`sent ${s.sent}`, `shown ${s.shown}`);
    if (server) {
      const dropped = Object.values(server.dropped || {}).reduce((a, b) => a + b, 0);
      if (dropped) parts.push(`dropped ${dropped}`);
      if (!server.running) parts.push("waiting for the loop to run");
      else if (server.idle_s > 2) parts.push(`no frame for ${Math.round(server.idle_s)} s`);
    }
    this.status.textContent = parts.join(" · ");
  }

  async stop() {
    this.stream?.getTracks().forEach((track) => track.stop());
    this.stream = null;
    const socket = this.socket;
    this.socket = null;
    socket?.close();
    try {
      await api.fetchApi(`/streamv2v/loop/${this.session}/stop`, { method: "POST" });
      this.status.textContent = "stopped";
    } catch (error) {
      this.status.textContent = `stop failed: ${error.message}`;
    }
  }
}

app.registerExtension({
  name: "StreamV2V.Webcam",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const panel = new WebcamPanel(this);
      this.streamv2vWebcam = panel;
      this.addDOMWidget("streamv2v_webcam", "streamv2v_webcam", panel.root, { serialize: false });
      this.setSize([Math.max(this.size[0], 320), this.size[1] + 260]);
      return result;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.streamv2vWebcam?.stop();
      return removed?.apply(this, arguments);
    };
  },
});
