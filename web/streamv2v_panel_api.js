// window.StreamV2V: the small, stable API through which other extensions (MIDI, presets, OSC bridges, …) reach the
// performer panels on StreamV2VLoop nodes, without touching the panel's own files. Documented in web/README.md.
//
//   const off = window.StreamV2V.onPanel((panel) => { ... });   // every panel now and later
//   panel.session                      // the session name (URL-encoded, as in the routes)
//   panel.node                         // the LiteGraph node the panel sits on
//   panel.liveValues()                 // {running, can, current, inEffect}: the server's values (last poll)
//   await panel.setLive({ff_alpha: 0.5})   // -> {ok, error?, accepted?}: checked by the server; the panel follows
//   const remove = panel.addControl(element)   // mount an element in the panel's extension row
//   const off = panel.on("live" | "take" | "frame", (detail, panel) => { ... })
const panels = new Set();
const watchers = new Set();

function safely(callback, panel) {
  try {
    callback(panel);
  } catch (error) {
    console.error("StreamV2V: an onPanel callback failed", error);
  }
}

// What the panel file uses: add/delete panels as nodes come and go.
export const PANELS = {
  add(panel) {
    panels.add(panel);
    watchers.forEach((callback) => safely(callback, panel));
  },
  delete(panel) {
    panels.delete(panel);
  },
  forEach(fn) {
    panels.forEach(fn);
  },
};

if (!window.StreamV2V) {
  window.StreamV2V = Object.freeze({
    version: 1,
    panels: () => [...panels],
    panel: (session) => [...panels].find((p) => decodeURIComponent(p.session) === session) ?? null,
    onPanel(callback) {
      watchers.add(callback);
      panels.forEach((panel) => safely(callback, panel));
      return () => watchers.delete(callback);
    },
  });
}
