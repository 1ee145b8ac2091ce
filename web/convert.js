// "Convert ControlNet nodes to ControlStack" (Extensions > ControlStack menu, and the command palette): rewrites
// the open graph's built-in ControlNet nodes into ControlStack nodes, in place and undoable (Ctrl+Z).
//
// The conversion itself is the server's (POST /controlstack/convert, convert/workflow.py, the one home of the
// rules): this file sends graphToPrompt()'s API graph and applies the answer to the live graph -- new nodes next to
// the ones they replace, widget values by name, links by input name, the replaced nodes removed -- then shows the
// report. Control inside subgraphs is left alone (the conversion names it).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const CONVERT_COMMAND = "ControlStack.ConvertControlNets";

function isLink(v) {
  return Array.isArray(v) && v.length === 2 && Number.isInteger(v[1]);
}

function tracker() {
  return app.extensionManager?.workflow?.activeWorkflow?.changeTracker ?? null;
}

function notify(severity, summary, detail) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) toast.add({ severity, summary, detail, life: 12000 });
  else console.log(`[ControlStack] ${summary}\n${detail}`);
}

/** Apply a conversion (the server's answer for `before`, graphToPrompt()'s output) to app.graph. */
function applyConversion(before, result) {
  const graph = app.graph;
  const { prompt, placed_near: placedNear, removed } = result;
  const touched = [...removed];
  for (const [id, node] of Object.entries(prompt)) {
    if (!(id in before)) continue;
    for (const [name, v] of Object.entries(node.inputs ?? {})) {
      if (JSON.stringify(v) !== JSON.stringify(before[id].inputs?.[name])) touched.push(id);
    }
  }
  const inSubgraph = touched.filter((id) => String(id).includes(":"));
  if (inSubgraph.length) throw new Error(`nodes inside a subgraph (${inSubgraph.join(", ")}): convert them there`);

  const created = new Map();
  const nodeOf = (id) => created.get(id) ?? graph.getNodeById(Number(id)) ?? graph.getNodeById(id);
  const offsets = new Map();
  for (const [id, spec] of Object.entries(prompt)) {
    if (id in before) continue;
    const node = globalThis.LiteGraph.createNode(spec.class_type);
    if (!node) throw new Error(`${spec.class_type} is not a registered node type`);
    if (spec._meta?.title) node.title = spec._meta.title;
    const near = nodeOf(placedNear[id]);
    const k = offsets.get(placedNear[id]) ?? 0;
    offsets.set(placedNear[id], k + 1);
    if (near) node.pos = [near.pos[0] + 30 * k, near.pos[1] + 30 * k];
    graph.add(node);
    created.set(id, node);
  }
  // widgets first (mode before layer values: a mode's preset rewrites them), then links
  for (const [id, spec] of Object.entries(prompt)) {
    if (!created.has(id)) continue;
    const node = created.get(id);
    const entries = Object.entries(spec.inputs ?? {}).filter(([, v]) => !isLink(v));
    entries.sort(([a], [b]) => (b === "mode") - (a === "mode"));
    for (const [name, value] of entries) {
      const w = node.widgets?.find((x) => x.name === name);
      if (!w) continue;
      w.value = value;
      w.callback?.(value);
    }
  }
  for (const [id, spec] of Object.entries(prompt)) {
    for (const [name, v] of Object.entries(spec.inputs ?? {})) {
      if (!isLink(v)) continue;
      if (!created.has(id) && JSON.stringify(v) === JSON.stringify(before[id]?.inputs?.[name])) continue;
      const target = nodeOf(id);
      const source = nodeOf(String(v[0]));
      if (!target || !source) throw new Error(`cannot link node ${v[0]} to node ${id}`);
      const slot = target.findInputSlot(name);
      if (slot < 0) throw new Error(`node ${id} (${spec.class_type}) has no input ${name}`);
      source.connect(v[1], target, slot);
    }
  }
  for (const id of removed) {
    const node = nodeOf(id);
    if (node) graph.remove(node);
  }
  graph.setDirtyCanvas(true, true);
}

/** Convert the open graph; resolves to the server's answer (with `applied`), for the menu and for tests. */
export async function convertOpenGraph() {
  const { output } = await app.graphToPrompt();
  const res = await api.fetchApi("/controlstack/convert", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: output }),
  });
  const result = await res.json();
  if (!res.ok) throw new Error(result.error ?? `HTTP ${res.status}`);
  result.applied = false;
  if (result.report.converted.length) {
    const t = tracker();
    t?.checkState?.();
    t?.beforeChange?.();
    try {
      applyConversion(output, result);
      result.applied = true;
    } finally {
      t?.afterChange?.();
    }
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
