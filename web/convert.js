// "Convert ControlNet nodes to ControlStack" (Extensions > ControlStack menu, and the command palette): rewrites
// the open graph's built-in ControlNet nodes into ControlStack nodes, in place and undoable (Ctrl+Z).
//
// The conversion itself is the server's (POST /controlstack/convert, convert/ui_format.py + convert/workflow.py, the
// one home of the rules): this file sends the serialized workflow (subgraph definitions included), loads the
// converted workflow the server answers into the open workflow as one undoable change, and shows the report. So the
// menu command and the CLI write the same file.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const CONVERT_COMMAND = "ControlStack.ConvertControlNets";

function tracker() {
  return app.extensionManager?.workflow?.activeWorkflow?.changeTracker ?? null;
}

function notify(severity, summary, detail) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) toast.add({ severity, summary, detail, life: 12000 });
  else console.log(`[ControlStack] ${summary}\n${detail}`);
}

/** Load the converted workflow into the open one as one change: Ctrl+Z gives the original back. */
async function loadAsOneChange(converted) {
  const t = tracker();
  t?.checkState?.(); // the graph as it is now is the undo point
  // Loading into the same workflow is how the tracker's own undo works (ChangeTracker.updateState): while
  // _restoringState is set, the load does not reset the tracker to the loaded graph as if it were a new file.
  if (t) t._restoringState = true;
  try {
    await app.loadGraphData(converted, false, false, app.extensionManager?.workflow?.activeWorkflow ?? null, {
      showMissingModelsDialog: false,
      showMissingNodesDialog: false,
      checkForRerouteMigration: false,
    });
  } finally {
    if (t) t._restoringState = false;
  }
  t?.checkState?.(); // ... and the converted graph the change after it
}

/** Convert the open workflow; resolves to the server's answer (with `applied`), for the menu and for tests. */
export async function convertOpenGraph() {
  const graph = app.rootGraph ?? app.graph; // the whole workflow, also while a subgraph is open on the canvas
  const res = await api.fetchApi("/controlstack/convert", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ workflow: graph.serialize() }),
  });
  const result = await res.json();
  if (!res.ok) throw new Error(result.error ?? `HTTP ${res.status}`);
  result.applied = false;
  if (result.report.converted.length) {
    await loadAsOneChange(result.workflow);
    result.applied = true;
  }
  const { converted, unchanged } = result.report;
  notify(
    unchanged.length ? "warn" : "success",
    `ControlStack: ${converted.length} sampler(s) converted, ${unchanged.length} left unchanged`,
    [...converted.map((c) => `converted: ${c}`), ...unchanged.map((u) => `unchanged: ${u}`)].join("\n") ||
      "no built-in ControlNet nodes in this graph",
  );
  return result;
}

app.registerExtension({
  name: "ControlStack.Convert",
  commands: [
    {
      id: CONVERT_COMMAND,
      label: "Convert ControlNet nodes to ControlStack",
      function: async () => {
        try {
          await convertOpenGraph();
        } catch (e) {
          notify("error", "ControlStack: conversion failed", String(e?.message ?? e));
        }
      },
    },
  ],
  menuCommands: [{ path: ["Extensions", "ControlStack"], commands: [CONVERT_COMMAND] }],
});

globalThis.ControlStackConvert = { convertOpenGraph, CONVERT_COMMAND };
