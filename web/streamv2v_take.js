// StreamV2V take helpers for the performer panel (web/streamv2v_webcam.js): queueing the workflow with the
// server's answer in hand, the words for a failure, the stage URL, and what this tab remembers across a reload.
//
// The panel queues the workflow itself (not through app.queuePrompt, which answers only true/false and shows its
// own dialog): POST /prompt's answer (the prompt id, or the error and every node error of a failed validation) is
// what the panel shows and what it matches ComfyUI's execution_error / execution_interrupted events against.
// Widgets' beforeQueued/afterQueued callbacks (e.g. a seed set to "randomize") run as ComfyUI runs them.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAKE_KEY = "streamv2v.take.";  // + session: this tab was taking (sessionStorage: per tab, kept over a reload)

function graphNodes() {
  return app.graph?.nodes ?? app.graph?._nodes ?? [];
}

function runWidgetCallbacks(which) {
  for (const node of graphNodes()) {
    for (const w of node.widgets ?? []) w[which]?.();
  }
}

// Queue the graph as the Queue button would; {promptId} or {error: text naming the failed nodes and inputs}.
export async function queueGraph() {
  runWidgetCallbacks("beforeQueued");
  let answer;
  try {
    const prompt = await app.graphToPrompt();
    answer = await api.queuePrompt(0, prompt);
  } catch (error) {
    return { error: promptErrorText(error.response ?? { error: { message: error.message } }) };
  }
  if (answer?.node_errors && Object.keys(answer.node_errors).length) return { error: promptErrorText(answer) };
  runWidgetCallbacks("afterQueued");
  app.canvas?.draw?.(true, true);
  return { promptId: answer?.prompt_id ?? null };
}

// POST /prompt's failure body -> "Apply ControlNet (node 12) control_net_name: 'x.safetensors' not in []; ...".
// A node's own check (validate_inputs) is reported once per input it takes ("session - <text>", "file - <text>"):
// each text is said once.
export function promptErrorText(response) {
  const lines = new Set();
  for (const [id, failure] of Object.entries(response?.node_errors ?? {})) {
    for (const e of failure.errors ?? []) {
      const input = e.extra_info?.input_name;
      let text = String(e.details || e.message || "");
      if (input && text.startsWith(`${input} - `)) text = text.slice(input.length + 3);
      else if (input && !text.startsWith(input)) text = `${input}: ${text}`;
      lines.add(`${failure.class_type ?? "node"} (node ${id}): ${text}`);
    }
  }
  if (lines.size) return [...lines].join("; ");
  const error = response?.error;
  if (typeof error === "string") return error;
  return [error?.message, error?.details].filter(Boolean).join(": ") || "the server refused the workflow";
}

// ComfyUI's execution_error event -> "KSampler (node 3): the message".
export function executionErrorText(detail) {
  return `${detail.node_type ?? "node"} (node ${detail.node_id}): ${detail.exception_message ?? "failed"}`;
}

// The stage page of a session, as another window, OBS or another machine on the network opens it.
export function stageUrl(session) {
  const path = `/streamv2v/stage/${session}`;
  const route = api.fileURL ? api.fileURL(path) : `${api.api_base ?? ""}${path}`;
  return new URL(route, window.location.href).href;
}

export function rememberTake(session, taking) {
  try {
    if (taking) sessionStorage.setItem(TAKE_KEY + session, "1");
    else sessionStorage.removeItem(TAKE_KEY + session);
  } catch (error) {
    // storage refused (private mode): the panel then never rejoins by itself
  }
}

export function wasTaking(session) {
  try {
    return sessionStorage.getItem(TAKE_KEY + session) === "1";
  } catch (error) {
    return false;
  }
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (error) {  // no clipboard permission (plain HTTP on another machine): select-and-copy
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand?.("copy") ?? false;
    area.remove();
    return ok;
  }
}
