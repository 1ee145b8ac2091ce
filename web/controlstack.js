// ControlStack frontend extension (plain ES module, loaded by ComfyUI through WEB_DIRECTORY = "./web").
//
// - ControlStackControlScale: a draggable bar chart of the per-layer multipliers (in_00..in_11, middle), kept in
//   sync with the node's number widgets both ways; the mode presets redraw the bars, dragging switches to "custom".
// - ControlStackApplyHint: shows the hint actually used (server event `controlstack.hint_preview`), is coloured by
//   its position in the stack (1st, 2nd, 3rd ... along the MODEL chain) and carries a "#k" badge.
// - ControlStackSampler: its control report comes back as normal ui.images; the frontend shows it like any output.
// - ControlStackLoadControlNet: a badge with the file's kind and family (GET /controlstack/describe, read from the
//   tensor names, no weights) as soon as a file is picked, and a colour per kind; ApplyHint repeats the kind of the
//   control file it is fed in its "#k" badge.
// - Tooltips on every ControlStack widget (from the node definition, with fallbacks written here).
// Nothing here talks to anything but the ComfyUI server that served the page.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXT = "ControlStack.Web";
const SCALE_NODE = "ControlStackControlScale";
const HINT_NODE = "ControlStackApplyHint";
const SAMPLER_NODE = "ControlStackSampler";
const HINT_EVENT = "controlstack.hint_preview";
const LOAD_NODE = "ControlStackLoadControlNet";
const UNION_NODE = "ControlStackUnionType";

/**
 * The ControlScale layer names (shallow -> deep, middle last) and the "prompt is more important" decay. Defined once,
 * in Python (nodes/controlnet_nodes.py ControlScale, controlnet/stack.py PROMPT_DECAY): they arrive with the node
 * definition (/object_info, the `controlstack` options of the `mode` input) and are filled in when it registers.
 */
export const scaleSchema = { layers: null, promptDecay: null };

function readScaleSchema(nodeData) {
  const meta = nodeData?.input?.required?.mode?.[1]?.controlstack;
  if (!Array.isArray(meta?.layers) || !meta.layers.length || typeof meta.prompt_decay !== "number") {
    console.error(`${EXT}: ${SCALE_NODE} definition lacks mode.controlstack {layers, prompt_decay}; no chart`);
    return;
  }
  scaleSchema.layers = meta.layers.map(String);
  scaleSchema.promptDecay = meta.prompt_decay;
}
export const MODE_BALANCED = "balanced";
export const MODE_PROMPT = "prompt is more important";
export const MODE_CONTROL = "ControlNet is more important";
export const MODE_CUSTOM = "custom";
export const MODE_SOFT = "soft weights";

/**
 * Values a preset gives each layer widget; null for "custom" (the user's values stay). `soft` ({base, flip}) are
 * the node's soft-weight widgets, used by "soft weights".
 */
export function presetValues(mode, count = scaleSchema.layers?.length ?? 0, soft = null) {
  if (mode === MODE_PROMPT || mode === MODE_SOFT) {
    // Guess mode / soft weights: base ** (n - 1 - i), the deepest layer (middle) gets 1.0 (flipped: base ** i);
    // as controlnet/stack.py mode_scales.
    const base = mode === MODE_SOFT ? Number(soft?.base ?? scaleSchema.promptDecay) : scaleSchema.promptDecay;
    if (base == null || Number.isNaN(base)) return null;
    const values = Array.from({ length: count }, (_, i) => base ** (count - 1 - i));
    return mode === MODE_SOFT && soft?.flip ? values.reverse() : values;
  }
  if (mode === MODE_BALANCED || mode === MODE_CONTROL) return Array(count).fill(1.0);
  return null;
}

function close(a, b) {
  return Math.abs(Number(a) - Number(b)) < 5e-4;
}

// ---------------------------------------------------------------------------------------------------------------
// Layer-scale bar chart
// ---------------------------------------------------------------------------------------------------------------

const CHART_NAME = "layer_scales_chart";
const CHART_HEIGHT = 96;
const CHART_MARGIN = 15;
const CHART_PAD_TOP = 16; // room for the mode label
const CHART_PAD_BOTTOM = 14; // room for the layer labels

function layerWidgets(node) {
  return (scaleSchema.layers ?? []).map((name) => node.widgets?.find((w) => w.name === name)).filter(Boolean);
}

function modeWidget(node) {
  return node.widgets?.find((w) => w.name === "mode");
}

/** The node's soft-weight widgets ({base, flip}) for presetValues. */
function softOf(node) {
  const find = (name) => node.widgets?.find((w) => w.name === name)?.value;
  return { base: find("base_multiplier"), flip: !!find("flip_weights") };
}

function chartOf(node) {
  return node.widgets?.find((w) => w.name === CHART_NAME);
}

/** Nodes 2.0 (Vue nodes, setting Comfy.VueNodes.Enabled): the frontend mirrors the setting here. */
function vueNodesOn() {
  return !!globalThis.LiteGraph?.vueNodesMode;
}

/**
 * Redraw after a value change. Classic: the graph canvas. Nodes 2.0 draws a custom widget on its own <canvas>
 * (WidgetLegacy.vue) only when mounted, resized or when it sets `triggerDraw`, so ask for it.
 */
function redraw(node) {
  node.graph?.setDirtyCanvas?.(true, true);
  chartOf(node)?.triggerDraw?.();
}

// > 0 while a value is set by a program (this extension, app.loadApiJson): such a set keeps the mode. Nodes 2.0
// calls widget callbacks with the value only, for user edits too, so the call's arguments cannot tell them apart.
let programmatic = 0;

function valueRange(widget) {
  const min = Number(widget?.options?.min ?? 0);
  const max = Number(widget?.options?.max ?? 2);
  return max > min ? [min, max] : [0, 2];
}

/** Node-relative geometry of the chart and its bars (also used by the browser tests to aim the mouse). */
function chartGeometry(node, chart) {
  const layers = layerWidgets(node);
  // The width the chart was last drawn at: the node's on the graph canvas, the widget element's in Nodes 2.0.
  const width = chart.last_width || chart.width || node.size[0];
  const top = (chart.last_y ?? chart.y ?? 0) + 2;
  const x0 = CHART_MARGIN;
  const x1 = width - CHART_MARGIN;
  const plotTop = top + CHART_PAD_TOP;
  const plotBottom = top + CHART_HEIGHT - CHART_PAD_BOTTOM;
  const slot = (x1 - x0) / Math.max(1, layers.length);
  const [min, max] = valueRange(layers[0]);
  const values = effectiveValues(node, layers);
  const yOf = (v) => plotBottom - ((Math.min(max, Math.max(min, v)) - min) / (max - min)) * (plotBottom - plotTop);
  const vOf = (y) => min + ((plotBottom - y) / (plotBottom - plotTop)) * (max - min);
  const bars = layers.map((w, i) => {
    const left = x0 + i * slot + slot * 0.15;
    const right = x0 + (i + 1) * slot - slot * 0.15;
    return { name: w.name, left, right, cx: (left + right) / 2, top: yOf(values[i]), bottom: plotBottom, value: values[i] };
  });
  return { top, x0, x1, plotTop, plotBottom, slot, min, max, yOf, vOf, bars, layers };
}

/**
 * What the node will use: the preset's values in a preset mode (the node reads in_00..middle only in "custom"),
 * the widgets' values in "custom".
 */
function effectiveValues(node, layers = layerWidgets(node)) {
  const preset = presetValues(modeWidget(node)?.value, layers.length, softOf(node));
  return preset ?? layers.map((w) => Number(w.value));
}

/** Leaving a preset for "custom": the layer widgets take the preset's values first (except `keep`). */
function adoptPreset(node, keep = null) {
  const layers = layerWidgets(node);
  const preset = presetValues(modeWidget(node)?.value, layers.length, softOf(node));
  if (preset) layers.forEach((w, i) => w !== keep && setLayerValue(node, w, preset[i]));
  setMode(node, MODE_CUSTOM);
}

function setLayerValue(node, widget, value, { snap = false } = {}) {
  const [min, max] = valueRange(widget);
  let v = Math.min(max, Math.max(min, value));
  if (snap) v = Math.round(v * 100) / 100; // mouse drags land on 0.01 steps
  if (widget.value === v) return false;
  setWidget(node, widget, v);
  return true;
}

function setMode(node, mode) {
  const mw = modeWidget(node);
  if (!mw || mw.value === mode) return;
  setWidget(node, mw, mode);
}

/** Set a widget as a program: through its whole callback chain (Nodes 2.0 updates the shown value there). */
function setWidget(node, widget, value) {
  const old = widget.value;
  widget.value = value;
  programmatic++;
  try {
    widget.callback?.(value);
  } finally {
    programmatic--;
  }
  node.onWidgetChanged?.(widget.name, value, old, widget);
}

/** Apply the preset of the node's current mode to the layer widgets (no-op for "custom"). */
function applyPreset(node) {
  const mw = modeWidget(node);
  const layers = layerWidgets(node);
  const values = presetValues(mw?.value, layers.length, softOf(node));
  if (!values) return;
  layers.forEach((w, i) => setLayerValue(node, w, values[i]));
  redraw(node);
}

function matchesPreset(node) {
  const mw = modeWidget(node);
  const layers = layerWidgets(node);
  const values = presetValues(mw?.value, layers.length, softOf(node));
  return !values || layers.every((w, i) => close(w.value, values[i]));
}

function markChanged(node) {
  if (node.graph) node.graph._version++;
  redraw(node);
  // The workflow's change tracker (undo/redo, "modified" dot) checks the graph on every window mouseup.
}

function drawChart(ctx, node, width, y) {
  const chart = this;
  chart.last_y = y;
  chart.last_width = width;
  chart.draws = (chart.draws ?? 0) + 1; // tests: the chart is really drawn (in a subgraph, in Nodes 2.0)
  if (vueNodesOn() && ctx.canvas && ctx.canvas !== app.canvas?.canvas) {
    // Nodes 2.0 draws it on a <canvas> of its own, absolutely placed (13 px up) in a widget row of no height: give
    // the row the chart's height, or the node ends above the chart and the chart hangs out under it.
    const row = ctx.canvas.parentElement;
    if (row && !row.style.height) row.style.height = `${CHART_HEIGHT - 10}px`;
    // There a press on a custom widget also bubbles to the node, which starts dragging the node (and the bar drag
    // goes with it). Keep the chart's pointer events to the chart: its own handlers, on this element, still run.
    if (!ctx.canvas.__csOwnPointer) {
      ctx.canvas.__csOwnPointer = true;
      for (const type of ["pointerdown", "pointermove", "pointerup"]) {
        ctx.canvas.addEventListener(type, (e) => e.stopPropagation());
      }
    }
  }
  const g = chartGeometry(node, chart);
  const mode = modeWidget(node)?.value;
  ctx.save();
  // frame
  ctx.fillStyle = "#1b1b1b";
  ctx.strokeStyle = "#444";
  ctx.beginPath();
  // roundRect returns undefined, so `roundRect?.() ?? rect()` always added a square frame too
  if (ctx.roundRect) ctx.roundRect(g.x0, g.top, g.x1 - g.x0, CHART_HEIGHT - 4, 4);
  else ctx.rect(g.x0, g.top, g.x1 - g.x0, CHART_HEIGHT - 4);
  ctx.fill();
  ctx.stroke();
  // 1.0 reference line
  if (g.min <= 1 && g.max >= 1) {
    const y1 = g.yOf(1);
    ctx.strokeStyle = "#666";
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(g.x0 + 2, y1);
    ctx.lineTo(g.x1 - 2, y1);
    ctx.stroke();
    ctx.setLineDash([]);
  }
  // bars
  g.bars.forEach((b, i) => {
    const active = chart.dragIndex === i;
    const isMiddle = b.name === "middle";
    ctx.fillStyle = active ? "#ffcc66" : isMiddle ? "#c586c0" : "#4fa3e0";
    ctx.fillRect(b.left, b.top, Math.max(1, b.right - b.left), Math.max(1, b.bottom - b.top));
  });
  // labels
  ctx.font = "9px Arial";
  ctx.textAlign = "center";
  ctx.fillStyle = "#999";
  g.bars.forEach((b, i) => {
    const label = b.name === "middle" ? "M" : String(i);
    ctx.fillText(label, b.cx, g.plotBottom + 10);
  });
  ctx.textAlign = "left";
  ctx.font = "10px Arial";
  ctx.fillStyle = "#ccc";
  let label = `layer scales · ${mode ?? ""}`;
  if (mode === MODE_CONTROL) label = "ControlNet is more important: cond only, uncond ×0";
  if (chart.dragIndex != null) {
    const b = g.bars[chart.dragIndex];
    if (b) label = `${b.name} = ${Number(b.value).toFixed(2)}`;
  }
  ctx.fillText(label, g.x0 + 4, g.top + 11, g.x1 - g.x0 - 8);
  ctx.restore();
}

function chartMouse(event, pos, node) {
  const chart = this;
  const g = chartGeometry(node, chart);
  const type = event.type;
  const [x, y] = pos;
  const indexAt = (px) => Math.max(0, Math.min(g.bars.length - 1, Math.floor((px - g.x0) / g.slot)));
  if (type === "pointerdown" || type === "mousedown") {
    if (x < g.x0 || x > g.x1 || y < g.plotTop - 6 || y > g.plotBottom + 2) return false;
    chart.dragIndex = indexAt(x);
    if (modeWidget(node)?.value !== MODE_CUSTOM) adoptPreset(node); // dragging switches to custom
  } else if (type === "pointermove" || type === "mousemove") {
    if (chart.dragIndex == null) return false;
    if (event.buttons === 0) {
      chart.dragIndex = null;
      return true;
    }
    chart.dragIndex = indexAt(x); // "paint" across bars while dragging
  } else if (type === "pointerup" || type === "mouseup") {
    if (chart.dragIndex == null) return false;
  } else {
    return false;
  }
  if (type === "pointerup" || type === "mouseup") {
    // The value is the last press / move's. Nodes 2.0 gives the release in node coordinates, not the widget's.
    chart.dragIndex = null;
    markChanged(node);
    return true;
  }
  const widget = g.layers[chart.dragIndex];
  if (widget) setLayerValue(node, widget, g.vOf(y), { snap: true });
  redraw(node);
  return true;
}

function setupScaleNode(node) {
  if (node.widgets?.some((w) => w.name === CHART_NAME)) return;
  const mw = modeWidget(node);
  const layers = layerWidgets(node);
  if (!mw || !layers.length) return;

  // mode -> bars: a preset rewrites the layer widgets.
  const modeCallback = mw.callback;
  mw.callback = function (value, ...rest) {
    const r = modeCallback?.call(this, value, ...rest);
    applyPreset(node);
    redraw(node);
    return r;
  };
  // soft-weight widgets -> bars (in "soft weights" mode they define the preset).
  for (const name of ["base_multiplier", "flip_weights"]) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) continue;
    const softCallback = w.callback;
    w.callback = function (...args) {
      const r = softCallback?.apply(this, args);
      if (modeWidget(node)?.value === MODE_SOFT) applyPreset(node);
      redraw(node);
      return r;
    };
  }
  // number widget -> mode: a user edit that leaves the preset switches to custom. Programmatic sets (ours,
  // app.loadApiJson) keep the mode, so an API workflow loads exactly as written. A user edit: the graph canvas
  // passes the canvas as second argument; Nodes 2.0 passes the value only, so there any call that is not ours is.
  for (const w of layers) {
    const layerCallback = w.callback;
    w.callback = function (value, canvas, ...rest) {
      const r = layerCallback?.call(this, value, canvas, ...rest);
      const userEdit = programmatic === 0 && (canvas !== undefined || vueNodesOn());
      if (userEdit && modeWidget(node)?.value !== MODE_CUSTOM && !matchesPreset(node)) adoptPreset(node, w);
      redraw(node);
      return r;
    };
  }

  // The chart goes last: serialize() leaves a hole at a non-serialized widget's index, so it must not
  // sit before the widgets whose values are saved.
  const chart = {
    name: CHART_NAME,
    type: "controlstack.layer_scales",
    value: null,
    serialize: false,
    options: { serialize: false },
    tooltip: "Drag a bar to set that layer's multiplier (shallow → deep, M = middle). Dragging switches mode to custom.",
    dragIndex: null,
    draw: drawChart,
    mouse: chartMouse,
    computeSize(width) {
      return [width ?? node.size[0], CHART_HEIGHT];
    },
    geometry() {
      const g = chartGeometry(node, chart);
      return {
        top: g.top, plotTop: g.plotTop, plotBottom: g.plotBottom, min: g.min, max: g.max, bars: g.bars,
        values: g.bars.map((b) => b.value),
      };
    },
  };
  node.addCustomWidget(chart);
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0], 280), Math.max(node.size[1], size[1])]);
}

// ---------------------------------------------------------------------------------------------------------------
// Stack order colours (ApplyHint nodes along the MODEL chain)
// ---------------------------------------------------------------------------------------------------------------

// [title colour, body colour]; index = position in the stack - 1 (cycled).
export const STACK_COLORS = [
  ["#2b5278", "#1e3a56"],
  ["#2f6b3a", "#22502b"],
  ["#7a4b1f", "#5a3716"],
  ["#6a2f6b", "#4d224e"],
  ["#7a2e2e", "#592121"],
  ["#2e6b6b", "#214f4f"],
];
const PALETTE_COLORS = new Set(STACK_COLORS.flat());

/** 1-based position of an ApplyHint node in its chain (how many ApplyHint nodes feed its model input, + 1). */
export function stackIndex(node) {
  let k = 1;
  let cur = node;
  const seen = new Set([node]);
  for (let guard = 0; guard < 256; guard++) {
    const slot = cur.findInputSlot?.("model") ?? -1;
    if (slot < 0) break;
    let up = cur.getInputNode?.(slot);
    // pass through reroutes and bypass-free plumbing nodes that have a single input
    while (up && up.comfyClass !== HINT_NODE && up.type === "Reroute") up = up.getInputNode?.(0);
    if (!up || seen.has(up) || up.comfyClass !== HINT_NODE) break;
    seen.add(up);
    k += 1;
    cur = up;
  }
  return k;
}

/** The root graph and every subgraph definition in it (nodes inside subgraphs live in the latter). */
export function allGraphs() {
  const root = app.rootGraph ?? app.graph;
  if (!root) return [];
  return [root, ...(root.subgraphs?.values?.() ?? [])];
}

function recolorStack() {
  for (const graph of allGraphs()) recolorGraph(graph);
}

function recolorGraph(graph) {
  const nodes = graph?._nodes ?? graph?.nodes ?? [];
  for (const node of nodes) {
    if (node.comfyClass !== HINT_NODE) continue;
    const k = stackIndex(node);
    node.csStackIndex = k;
    // Respect colours the user picked: only (re)colour nodes that are uncoloured or wear one of ours.
    const ours = (node.color === undefined || PALETTE_COLORS.has(node.color)) &&
      (node.bgcolor === undefined || PALETTE_COLORS.has(node.bgcolor));
    if (!ours) continue;
    const [color, bgcolor] = STACK_COLORS[(k - 1) % STACK_COLORS.length];
    node.color = color;
    node.bgcolor = bgcolor;
  }
  graph?.setDirtyCanvas?.(true, true);
}

let recolorQueued = false;
function queueRecolor() {
  if (recolorQueued) return;
  recolorQueued = true;
  queueMicrotask(() => {
    recolorQueued = false;
    recolorStack();
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Control-file kind badges and colours
// ---------------------------------------------------------------------------------------------------------------

export const KIND_COLORS = {
  controlnet: ["#2a4d6e", "#1f3a52"],
  union: ["#6e4a2a", "#523720"],
  control_lora: ["#4d2a6e", "#3a1f52"],
  t2i_adapter: ["#2a6e4a", "#1f5237"],
  lllite: ["#6e2a4d", "#521f3a"],
  unsupported: ["#6e2a2a", "#521f1f"],
};
const KIND_PALETTE = new Set(Object.values(KIND_COLORS).flat());
const describeCache = new Map();

/** The kind of a control file as the server reads it: {kind, kind_name, family_name} (cached per file name). */
export async function describeControlFile(name) {
  if (!name) return null;
  if (!describeCache.has(name)) {
    describeCache.set(
      name,
      api
        .fetchApi(`/controlstack/describe?name=${encodeURIComponent(name)}`)
        .then((r) => r.json())
        .catch(() => null),
    );
  }
  return describeCache.get(name);
}

/** A short badge text: "T2I-Adapter · SD1.x". */
export function kindBadge(info) {
  if (!info || !info.kind_name) return "";
  return info.family_name ? `${info.kind_name} · ${info.family_name}` : info.kind_name;
}

async function refreshKind(node) {
  const widget = node.widgets?.find((w) => w.name === "control_net_name");
  const name = widget?.value;
  const info = await describeControlFile(name);
  // Answers can land out of order (nodeCreated asks about the combo's default, onConfigure about the saved file):
  // only the answer for the file the widget holds now counts.
  if (widget && widget.value !== name) return;
  node.csKind = info ?? null;
  node.csKindFile = name ?? null;
  const ours = (node.color === undefined || KIND_PALETTE.has(node.color)) &&
    (node.bgcolor === undefined || KIND_PALETTE.has(node.bgcolor));
  if (ours) {
    // A kind without a colour (a missing file, an unreadable answer) drops the previous file's colour.
    [node.color, node.bgcolor] = (info && KIND_COLORS[info.kind]) || [undefined, undefined];
  }
  node.graph?.setDirtyCanvas?.(true, true);
}

/** The Load ControlNet node feeding an ApplyHint's control_net input (through Union Type and reroutes). */
export function sourceLoader(node) {
  let slot = node.findInputSlot?.("control_net") ?? -1;
  let cur = node;
  for (let guard = 0; guard < 32 && slot >= 0; guard++) {
    const up = cur.getInputNode?.(slot);
    if (!up) return null;
    if (up.comfyClass === LOAD_NODE) return up;
    cur = up;
    slot = up.comfyClass === UNION_NODE ? up.findInputSlot?.("control_net") ?? -1 : up.type === "Reroute" ? 0 : -1;
  }
  return null;
}

function drawTitleBadge(node, ctx, text) {
  if (!text || node.flags?.collapsed) return;
  const H = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = "bold 12px Arial";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  // An opaque pill (the title colour, darkened) right-aligned in the title bar: the badge stays readable where a
  // long title runs under it. Never wider than the bar right of the title's collapse dot.
  const pad = 5;
  const right = node.size[0] - 6;
  const maxText = Math.max(0, node.size[0] - H - 6 - 2 * pad);
  const width = Math.min(ctx.measureText(text).width, maxText);
  const left = right - width - 2 * pad;
  const top = -H / 2 - 9;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(left, top, right - left, 18, 9);
  else ctx.rect(left, top, right - left, 18);
  ctx.fillStyle = node.color ?? globalThis.LiteGraph?.NODE_DEFAULT_COLOR ?? "#333";
  ctx.fill();
  ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
  ctx.fill();
  ctx.fillStyle = "#e8e8e8";
  ctx.fillText(text, right - pad, -H / 2 + 0.5, maxText);
  node.csBadge = { text, left, right, text_width: ctx.measureText(text).width, max_text_width: maxText }; // tests
  ctx.restore();
}

// ---------------------------------------------------------------------------------------------------------------
// Hint preview (server event) and tooltips
// ---------------------------------------------------------------------------------------------------------------

/**
 * The node an execution id names: "12" on the root graph, "5:12" = node 12 inside subgraph node 5 (nested: "5:8:12").
 * The server's UNIQUE_ID, so the id of the hint event, is this id.
 */
export function nodeByExecutionId(id) {
  const parts = String(id).split(":");
  let graph = app.rootGraph ?? app.graph;
  for (const hop of parts.slice(0, -1)) graph = graph?.getNodeById?.(hop)?.subgraph;
  return graph?.getNodeById?.(parts.at(-1)) ?? null;
}

function onHintPreview({ detail }) {
  if (!detail || detail.node == null || !Array.isArray(detail.images)) return;
  const id = String(detail.node);
  const images = detail.images.map(({ filename, subfolder = "", type = "temp" }) => ({ filename, subfolder, type }));
  const node = nodeByExecutionId(id);
  if (node) node.csHintImages = images;
  // Announce the images as the host's own `executed` message would: the frontend then files them under the node's
  // locator (subgraphs included) in the store both renderers read: the graph canvas loads them into node.imgs,
  // Nodes 2.0 shows them in the node's image preview. Writing app.nodeOutputs[id] reaches neither a node in a
  // subgraph nor Nodes 2.0 (its store is reactive, app.nodeOutputs is not).
  const message = { node: id, display_node: id, output: { images }, prompt_id: detail.prompt_id ?? null };
  if (typeof api.dispatchCustomEvent === "function") api.dispatchCustomEvent("executed", message);
  else api.dispatchEvent(new CustomEvent("executed", { detail: message }));
  node?.graph?.setDirtyCanvas?.(true, true);
}

const FALLBACK_TOOLTIPS = {
  [HINT_NODE]: {
    model: "The model to patch; chain several Apply Hint nodes to stack ControlNets (colour = position in the stack).",
    control_net: "A ControlNet from Load ControlNet (ControlStack).",
    image: "The hint image (edges, depth, pose ...), resized to the latent size with resize_mode.",
    strength: "Multiplier on every residual of this ControlNet.",
    start_percent: "Sampling progress at which this ControlNet starts acting.",
    end_percent: "Sampling progress at which this ControlNet stops acting.",
    resize_mode: "How the hint is fitted to the generated image size.",
    mask: "Optional: restrict the ControlNet's effect to the masked area.",
    scales: "Optional per-layer multipliers from ControlNet Layer Scales.",
  },
  // ControlScale: the node definition has a tooltip for every input (nodes/controlnet_nodes.py).
  [SCALE_NODE]: {},
  [SAMPLER_NODE]: {},
};

function inputTooltip(nodeData, name) {
  for (const group of ["required", "optional"]) {
    const spec = nodeData?.input?.[group]?.[name];
    if (spec && spec[1] && spec[1].tooltip) return spec[1].tooltip;
  }
  return null;
}

function setTooltips(node, nodeData) {
  const fallbacks = FALLBACK_TOOLTIPS[node.comfyClass] ?? {};
  for (const w of node.widgets ?? []) {
    if (w.tooltip) continue;
    const tip = inputTooltip(nodeData, w.name) ?? fallbacks[w.name];
    if (tip) w.tooltip = tip;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------------------------

const OUR_NODES = new Set([SCALE_NODE, HINT_NODE, SAMPLER_NODE]);
const nodeDataByClass = new Map();

app.registerExtension({
  name: EXT,

  async setup() {
    api.addEventListener(HINT_EVENT, onHintPreview);
    // Values that app.loadApiJson sets are programmatic (it calls each widget callback with the value only, as
    // Nodes 2.0 does for user edits): an API workflow keeps its mode.
    const loadApiJson = app.loadApiJson;
    if (typeof loadApiJson === "function") {
      app.loadApiJson = function (...args) {
        programmatic++;
        try {
          return loadApiJson.apply(this, args);
        } finally {
          programmatic--;
        }
      };
    }
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const cls = nodeData?.name ?? "";
    if (!cls.startsWith("ControlStack")) return;
    nodeDataByClass.set(cls, nodeData);
    if (cls === SCALE_NODE) readScaleSchema(nodeData);
    if (!nodeData.description) {
      nodeData.description = {
        [HINT_NODE]: "Adds one ControlNet with its hint to the model's control stack.",
        [SCALE_NODE]: "Per-layer multipliers for a ControlNet's residuals; drag the bars.",
        [SAMPLER_NODE]: "KSampler that also returns a report of what each ControlNet did.",
      }[cls] ?? "";
    }

    if (cls === HINT_NODE) {
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function (...args) {
        const r = onConnectionsChange?.apply(this, args);
        queueRecolor();
        return r;
      };
      const onRemoved = nodeType.prototype.onRemoved;
      nodeType.prototype.onRemoved = function (...args) {
        const r = onRemoved?.apply(this, args);
        queueRecolor();
        return r;
      };
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
        const r = onDrawForeground?.call(this, ctx, ...rest);
        if (this.csStackIndex) {
          const kind = sourceLoader(this)?.csKind?.kind_name;
          drawTitleBadge(this, ctx, kind ? `#${this.csStackIndex} · ${kind}` : `#${this.csStackIndex}`);
        }
        return r;
      };
    }
    if (cls === LOAD_NODE) {
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
        const r = onDrawForeground?.call(this, ctx, ...rest);
        drawTitleBadge(this, ctx, kindBadge(this.csKind));
        return r;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function (...args) {
        const r = onConfigure?.apply(this, args);
        refreshKind(this);
        return r;
      };
    }
  },

  nodeCreated(node) {
    const cls = node.comfyClass;
    if (!OUR_NODES.has(cls) && !String(cls ?? "").startsWith("ControlStack")) return;
    setTooltips(node, nodeDataByClass.get(cls));
    if (cls === SCALE_NODE) setupScaleNode(node);
    if (cls === HINT_NODE) queueRecolor();
    if (cls === LOAD_NODE) {
      const widget = node.widgets?.find((w) => w.name === "control_net_name");
      if (widget) {
        const callback = widget.callback;
        widget.callback = function (...args) {
          const r = callback?.apply(this, args);
          refreshKind(node);
          return r;
        };
      }
      refreshKind(node);
    }
  },

  async afterConfigureGraph() {
    recolorStack();
  },
});

// Small, stable hooks for the browser tests (read-only helpers; nothing depends on them).
globalThis.ControlStackWeb = {
  presetValues,
  scaleSchema,
  allGraphs,
  nodeByExecutionId,
  stackIndex,
  recolorStack,
  describeControlFile,
  kindBadge,
  sourceLoader,
  KIND_COLORS,
  chartGeometry(node) {
    const chart = node && chartOf(node);
    return chart ? { ...chart.geometry(), draws: chart.draws ?? 0, width: chart.last_width ?? null } : null;
  },
};
