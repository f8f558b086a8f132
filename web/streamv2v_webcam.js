// StreamV2V webcam: captures the browser's webcam for the StreamV2VLoop node ("browser webcam" source),
// posts frames to /streamv2v/webcam/<session>/frame, and shows the restyled frames live in the node.
// "Stop" asks the running loop of the node's session to finish (it keeps its MP4), for any source.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SEND_FPS = 12;        // frames posted per second at most (the server keeps only the newest)
const MAX_SIDE = 512;       // frames are scaled down to this before sending

function widgetValue(node, name, fallback) {
  const widget = node.widgets?.find((w) => w.name === name);
  return widget ? widget.value : fallback;
}

class WebcamPanel {
  constructor(node) {
    this.node = node;
    this.stream = null;
    this.timer = null;
    this.busy = false;
    this.sent = 0;
    this.root = document.createElement("div");
    this.root.className = "streamv2v-webcam";
    this.root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;";
    const bar = document.createElement("div");
    bar.style.cssText = "display:flex;gap:4px;align-items:center;font-size:11px;";
    this.startButton = this.button("Start webcam", () => this.start());
    this.stopButton = this.button("Stop", () => this.stop());
    this.status = document.createElement("span");
    this.status.className = "streamv2v-status";
    bar.append(this.startButton, this.stopButton, this.status);
    this.video = document.createElement("video");
    this.video.muted = true;
    this.video.playsInline = true;
    this.video.style.display = "none";
    this.output = document.createElement("img");
    this.output.className = "streamv2v-output";
    this.output.alt = "restyled frames appear here";
    this.output.style.cssText = "width:100%;object-fit:contain;min-height:64px;background:#111;";
    this.canvas = document.createElement("canvas");
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

  async start() {
    if (this.stream) return;
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (error) {
      this.status.textContent = `webcam refused: ${error.message}`;
      return;
    }
    this.video.srcObject = this.stream;
    await this.video.play();
    this.status.textContent = "webcam on";
    this.timer = setInterval(() => this.tick(), 1000 / SEND_FPS);
  }

  async tick() {
    if (this.busy || !this.video.videoWidth) return;
    this.busy = true;
    try {
      const scale = Math.min(1, MAX_SIDE / Math.max(this.video.videoWidth, this.video.videoHeight));
      this.canvas.width = Math.round(this.video.videoWidth * scale);
      this.canvas.height = Math.round(this.video.videoHeight * scale);
      this.canvas.getContext("2d").drawImage(this.video, 0, 0, this.canvas.width, this.canvas.height);
      const blob = await new Promise((resolve) => this.canvas.toBlob(resolve, "image/jpeg", 0.85));
      await api.fetchApi(`/streamv2v/webcam/${this.session}/frame`, { method: "POST", body: blob });
      this.sent += 1;
      const reply = await api.fetchApi(`/streamv2v/webcam/${this.session}/output`, { cache: "no-store" });
      if (reply.status === 200) {
        const done = reply.headers.get("X-StreamV2V-Frames");
        const url = URL.createObjectURL(await reply.blob());
        this.output.onload = () => URL.revokeObjectURL(url);
        this.output.src = url;
        this.output.dataset.frames = done;
        this.status.textContent = `sent ${this.sent}, restyled ${done}`;
      }
    } catch (error) {
      this.status.textContent = `error: ${error.message}`;
    } finally {
      this.busy = false;
    }
  }

  async stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.stream?.getTracks().forEach((track) => track.stop());
    this.stream = null;
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
    if (nodeData.name !== "StreamV2VLoop") return;
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
