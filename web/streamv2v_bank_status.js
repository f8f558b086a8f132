// StreamV2V bank status: under every FeatureBank node, a line "N frames seen · X MiB held · last reset: why"
// and a "Clear bank" button. It is a DOM widget, so it shows with the classic canvas and with the Vue node
// renderer ("Nodes 2.0", which never calls onDrawForeground), and for FeatureBank nodes inside subgraphs:
// every FeatureBank node registers itself when it is created, wherever it lives.
// The node reports its bank when it executes (output key "streamv2v_bank"); after every prompt the line is
// refreshed from GET /streamv2v/banks, because a cached FeatureBank node does not run again while the
// samplers keep filling its bank.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "FeatureBank";
const MAX_REASON = 90;
const bankNodes = new Set(); // every FeatureBank node in a graph on the page (the root or a subgraph)

function widgetValue(node, name, fallback) {
  const widget = node.widgets?.find((w) => w.name === name);
  return widget ? widget.value : fallback;
}

function bankName(node) {
  return String(widgetValue(node, "name", "default")).trim();
}

export function formatBankStatus(status) {
  const mib = (Number(status.bytes) || 0) / (1024 * 1024);
  let reason = String(status.last_reset ?? "");
  if (reason.length > MAX_REASON) reason = reason.slice(0, MAX_REASON - 1) + "…";
  const frames = Number(status.frames_seen) || 0;
  return `${frames} frame${frames === 1 ? "" : "s"} seen · ${mib.toFixed(mib < 10 ? 2 : 1)} MiB held · ` +
    `last reset: ${reason}`;
}

class StatusLine {
  constructor(node) {
    this.node = node;
    this.root = document.createElement("div");
    this.root.className = "streamv2v-bank-status";
    this.root.style.cssText = "display:flex;gap:6px;align-items:center;font:11px sans-serif;color:#9c9;" +
      "width:100%;min-height:22px;overflow:hidden;";
    this.text = document.createElement("span");
    this.text.className = "streamv2v-bank-status-text";
    this.text.style.cssText = "flex:1;white-space:normal;word-break:break-word;";
    this.text.textContent = "no frames yet";
    this.button = document.createElement("button");
    this.button.className = "streamv2v-bank-clear";
    this.button.textContent = "Clear bank";
    this.button.title = "Forget this bank's frames now (the next frame starts a new stream)";
    this.button.style.cssText = "font-size:11px;padding:1px 6px;";
    this.button.addEventListener("click", (event) => {
      event.stopPropagation();
      this.clear();
    });
    this.root.append(this.text, this.button);
  }

  show(status) {
    this.node.streamv2vBankStatus = status;
    this.node.streamv2vBankText = formatBankStatus(status);
    this.text.textContent = this.node.streamv2vBankText;
    this.text.title = String(status.last_reset ?? "");
    this.node.setDirtyCanvas?.(true, false);
  }

  async clear() {
    const name = encodeURIComponent(bankName(this.node));
    try {
      // A JSON body: the server takes state changes only with it (a page of another site cannot send one unasked).
      const response = await api.fetchApi(`/streamv2v/banks/${name}/clear`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
      if (response.ok) this.show((await response.json()).status);
      else if (response.status === 404) this.text.textContent = "nothing to clear yet (the bank is made on the first run)";
      else this.text.textContent = `could not clear: ${(await response.json().catch(() => ({}))).error ?? response.status}`;
    } catch (error) {
      this.text.textContent = `could not clear: ${error.message}`;
    }
  }
}

// A node is registered when it is added to a graph (the root graph or a subgraph) and forgotten when no graph
// holds it any more: loading another workflow, or moving the node into a subgraph, does not always call
// onRemoved, so nothing may outlive the page's graphs.
function pruneBankNodes() {
  for (const node of bankNodes) {
    if (!node.graph || node.graph.getNodeById?.(node.id) !== node) bankNodes.delete(node);
  }
}

let refreshing = null;
async function refreshAll() {
  pruneBankNodes();
  if (!bankNodes.size || refreshing) return refreshing;
  refreshing = (async () => {
    try {
      const response = await api.fetchApi("/streamv2v/banks", { cache: "no-store" });
      if (!response.ok) return;
      const { banks } = await response.json();
      const byName = new Map((banks ?? []).map((b) => [b.name, b]));
      for (const node of bankNodes) {
        const status = byName.get(bankName(node));
        if (status) node.streamv2vStatusLine?.show(status);
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

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const line = new StatusLine(this);
      this.streamv2vStatusLine = line;
      this.addDOMWidget("streamv2v_bank_status", "streamv2v_bank_status", line.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => 26,
      });
      return result;
    };

    const onAdded = nodeType.prototype.onAdded;
    nodeType.prototype.onAdded = function () {
      const result = onAdded?.apply(this, arguments);
      bankNodes.add(this);
      refreshAll();
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      bankNodes.delete(this);
      return onRemoved?.apply(this, arguments);
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const status = output?.streamv2v_bank?.[0];
      if (status) this.streamv2vStatusLine?.show(status);
    };
  },

  setup() {
    api.addEventListener("execution_success", () => refreshAll());
    api.addEventListener("executing", (event) => {
      if (event.detail == null) refreshAll(); // the queue finished a prompt
    });
    app.streamv2vRefreshBanks = refreshAll;
    app.streamv2vBankNodes = bankNodes;
  },
});
