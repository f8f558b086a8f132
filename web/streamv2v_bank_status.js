// StreamV2V bank status: a line under every FeatureBank node, "N frames seen · X MiB held · last reset: why".
// The node reports its bank's status when it executes (output key "streamv2v_bank"); after every prompt the
// line is refreshed from GET /streamv2v/banks, because a cached FeatureBank node does not run again while the
// samplers keep filling its bank. Without either (bank never used on this server) the line stays empty.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "FeatureBank";
const MAX_REASON = 60;

function widgetValue(node, name, fallback) {
  const widget = node.widgets?.find((w) => w.name === name);
  return widget ? widget.value : fallback;
}

export function formatBankStatus(status) {
  const mib = (Number(status.bytes) || 0) / (1024 * 1024);
  let reason = String(status.last_reset ?? "");
  if (reason.length > MAX_REASON) reason = reason.slice(0, MAX_REASON - 1) + "…";
  const frames = Number(status.frames_seen) || 0;
  return `${frames} frame${frames === 1 ? "" : "s"} seen · ${mib.toFixed(mib < 10 ? 2 : 1)} MiB held · ` +
    `last reset: ${reason}`;
}

function setStatus(node, status) {
  node.streamv2vBankStatus = status;
  node.streamv2vBankText = formatBankStatus(status);
  node.setDirtyCanvas?.(true, false);
}

function featureBankNodes() {
  return (app.graph?._nodes ?? []).filter((n) => n.type === NODE_TYPE || n.comfyClass === NODE_TYPE);
}

let refreshing = null;
async function refreshAll() {
  const nodes = featureBankNodes();
  if (!nodes.length || refreshing) return refreshing;
  refreshing = (async () => {
    try {
      const response = await api.fetchApi("/streamv2v/banks", { cache: "no-store" });
      if (!response.ok) return;
      const { banks } = await response.json();
      const byName = new Map((banks ?? []).map((b) => [b.name, b]));
      for (const node of nodes) {
        const status = byName.get(String(widgetValue(node, "name", "default")).trim());
        if (status) setStatus(node, status);
      }
    } catch (error) {
      console.warn("StreamV2V: could not read bank status", error);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

app.registerExtension({
  name: "StreamV2V.BankStatus",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const status = output?.streamv2v_bank?.[0];
      if (status) setStatus(this, status);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.streamv2vBankText || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#9c9";
      ctx.textAlign = "left";
      ctx.fillText(this.streamv2vBankText, 4, this.size[1] + 16);
      ctx.restore();
    };
  },

  setup() {
    api.addEventListener("execution_success", () => refreshAll());
    api.addEventListener("executing", (event) => {
      if (event.detail == null) refreshAll();  // the queue finished a prompt
    });
    app.streamv2vRefreshBanks = refreshAll;
  },
});
