#!/usr/bin/env node
// Browser driver for the ControlStack browser tests: real headless chromium on the real ComfyUI frontend.
//
// Input: one JSON job, as argv[2] (a path to a .json file or the JSON text itself) or on stdin:
//   {
//     "url": "http://127.0.0.1:PORT",          // a running ComfyUI with the pack loaded
//     "artifact_dir": ".artifacts/browser",    // screenshots go here
//     "workflows": [{"name": "x", "ui": "workflows/x.json", "api": "workflows/api/x.json"}],
//     "run": true,                             // queue each workflow from the UI (Run button) and wait
//     "run_timeout_s": 300,                    // per workflow
//     "png_roundtrip": true,                   // drop the first output PNG back in, compare graphToPrompt()
//     "skip_run": ["name"],                    // load and compare these, but do not queue them
//     "drag": true,                            // drag a bar of the layer-scale widget with the mouse
//     "kinds": {"workflow": "x", "classic": "cn.safetensors", "missing": "nope.safetensors"},
//                                              // Load ControlNet's kind badge and colours, the describe route
//     "modes": {"workflow": "x", "decay": 0.5, "seed": 101}
//                                              // chart + hint preview with one ApplyHint + ControlScale in a
//                                              // subgraph, classic then Nodes 2.0 (a second page, decay patched)
//   }
// Output (stdout, one JSON object): startup info and one record per workflow with the numbers pytest asserts on.
// Progress goes to stderr. Exit code 0 unless the driver itself failed (test verdicts are pytest's job).

import { readFileSync, mkdirSync, writeFileSync } from "node:fs";
import { basename, isAbsolute, join, resolve } from "node:path";
import { REPO, launch, openApp } from "./browser.mjs";

const log = (...a) => process.stderr.write(`[driver] ${a.join(" ")}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function readJob() {
  const arg = process.argv[2];
  let text;
  if (arg && arg.trim().startsWith("{")) text = arg;
  else if (arg) text = readFileSync(arg, "utf8");
  else text = readFileSync(0, "utf8");
  return JSON.parse(text);
}

const repoPath = (p) => (isAbsolute(p) ? p : resolve(REPO, p));

// --------------------------------------------------------------------------------------------------------------
// page helpers
// --------------------------------------------------------------------------------------------------------------

/** Dispatch a real `drop` DragEvent carrying `bytes` as a File, as dragging a file from the desktop does. */
async function dropFile(page, name, bytes, mime) {
  // Mark the current nodes so we can tell when the drop has replaced the graph.
  await page.evaluate(() => {
    for (const n of window.app.graph._nodes) n.__csOld = true;
  });
  await page.evaluate(
    ({ name, b64, mime }) => {
      const bin = atob(b64);
      const arr = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) arr[i] = bin.charCodeAt(i);
      const file = new File([arr], name, { type: mime });
      const dt = new DataTransfer();
      dt.items.add(file);
      const target = document.querySelector("#graph-canvas") ?? document.body;
      const rect = target.getBoundingClientRect();
      const opts = {
        dataTransfer: dt,
        bubbles: true,
        cancelable: true,
        clientX: rect.left + rect.width / 2,
        clientY: rect.top + rect.height / 2,
      };
      target.dispatchEvent(new DragEvent("dragenter", opts));
      target.dispatchEvent(new DragEvent("dragover", opts));
      target.dispatchEvent(new DragEvent("drop", opts));
    },
    { name, b64: Buffer.from(bytes).toString("base64"), mime },
  );
}

async function waitGraphReplaced(page, expectedCount, timeoutMs = 30_000) {
  await page.waitForFunction(
    (n) => {
      const nodes = window.app.graph._nodes;
      return nodes.length > 0 && (n == null || nodes.length === n) && nodes.every((x) => !x.__csOld);
    },
    expectedCount,
    { timeout: timeoutMs, polling: 100 },
  );
  await sleep(300); // let onAfterGraphConfigured / extension hooks settle
}

async function fitView(page) {
  await page.evaluate(() => {
    const nodes = window.app.graph._nodes;
    if (!nodes.length) return;
    const T = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
      x0 = Math.min(x0, n.pos[0]);
      y0 = Math.min(y0, n.pos[1] - T);
      x1 = Math.max(x1, n.pos[0] + n.size[0]);
      y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const ds = window.app.canvas.ds;
    ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.85 });
    ds.offset[1] += 50 / ds.scale; // clear the top bar and tabs that overlay the canvas
    window.app.graph.setDirtyCanvas(true, true);
  });
  await sleep(250);
}

async function screenshot(page, dir, name) {
  const path = join(dir, `${name}.png`);
  try {
    await page.screenshot({ path });
    return path;
  } catch (e) {
    log("screenshot failed", name, String(e));
    return null;
  }
}

/** Dialog texts currently shown (missing nodes, errors ...). */
async function openDialogs(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll(".p-dialog")]
      .filter((d) => d.offsetParent !== null || d.getClientRects().length)
      .map((d) => (d.innerText || "").slice(0, 500)),
  );
}

async function closeDialogs(page) {
  for (let i = 0; i < 3; i++) {
    const n = await page.evaluate(() => document.querySelectorAll(".p-dialog").length);
    if (!n) return;
    await page.keyboard.press("Escape").catch(() => {});
    await sleep(150);
  }
}

// --------------------------------------------------------------------------------------------------------------
// prompt comparison (graphToPrompt output vs an API-format file)
// --------------------------------------------------------------------------------------------------------------

function sameValue(a, b, round = 0) {
  if (typeof a === "number" && typeof b === "number") {
    // A FLOAT widget rounds what it is given to its `round` step (loadApiJson calls the widget callback).
    return Math.abs(a - b) <= Math.max(1e-6 * Math.max(1, Math.abs(b)), round / 2 + 1e-9);
  }
  return JSON.stringify(a) === JSON.stringify(b);
}

/**
 * Compare two API-format prompts node by node (class_type, inputs). Links [id, slot] are compared through an id
 * map: identity where both sides use the same ids (loadApiJson keeps them), else matched by class_type order.
 */
export function comparePrompts(got, want, rounds = {}) {
  const diffs = [];
  const gotIds = Object.keys(got);
  const wantIds = Object.keys(want);
  const map = new Map();
  const sameIds = gotIds.length === wantIds.length && wantIds.every((id) => id in got);
  if (sameIds) for (const id of wantIds) map.set(id, id);
  else {
    const pool = new Map();
    for (const id of gotIds) {
      const c = got[id].class_type;
      if (!pool.has(c)) pool.set(c, []);
      pool.get(c).push(id);
    }
    for (const id of wantIds) {
      const cand = pool.get(want[id].class_type);
      if (cand?.length) map.set(id, cand.shift());
    }
  }
  if (gotIds.length !== wantIds.length) diffs.push(`node count ${gotIds.length} != ${wantIds.length}`);
  for (const id of wantIds) {
    const gid = map.get(id);
    const w = want[id];
    const g = gid != null ? got[gid] : undefined;
    if (!g) {
      diffs.push(`${id} (${w.class_type}): missing`);
      continue;
    }
    if (g.class_type !== w.class_type) diffs.push(`${id}: class_type ${g.class_type} != ${w.class_type}`);
    const keys = new Set([...Object.keys(w.inputs ?? {}), ...Object.keys(g.inputs ?? {})]);
    for (const k of keys) {
      const wv = w.inputs?.[k];
      const gv = g.inputs?.[k];
      if (Array.isArray(wv) && wv.length === 2 && typeof wv[1] === "number" && typeof wv[0] !== "number") {
        const ok = Array.isArray(gv) && String(gv[0]) === String(map.get(String(wv[0]))) && gv[1] === wv[1];
        if (!ok) diffs.push(`${id}.${k}: link ${JSON.stringify(gv)} != ${JSON.stringify(wv)}`);
      } else if (!sameValue(gv, wv, rounds[gid]?.[k] ?? 0)) {
        diffs.push(`${id}.${k}: ${JSON.stringify(gv)} != ${JSON.stringify(wv)}`);
      }
    }
  }
  return diffs;
}

// --------------------------------------------------------------------------------------------------------------
// steps
// --------------------------------------------------------------------------------------------------------------

async function loadWorkflow(page, wf, errs, artifactDir) {
  const t0 = Date.now();
  const text = readFileSync(repoPath(wf.ui), "utf8");
  const json = JSON.parse(text);
  const types = [...new Set((json.nodes ?? []).map((n) => n.type))];
  const missing = await page.evaluate(
    (types) => types.filter((t) => !(t in window.LiteGraph.registered_node_types)),
    types,
  );
  const mark = errs.console.length;
  const pmark = errs.page.length;
  await dropFile(page, basename(wf.ui), Buffer.from(text), "application/json");
  let loaded = true;
  try {
    await waitGraphReplaced(page, (json.nodes ?? []).length);
  } catch {
    loaded = false;
  }
  const dialogs = await openDialogs(page);
  const state = await page.evaluate(() => ({
    nodes: window.app.graph._nodes.length,
    links: Object.keys(window.app.graph.links ?? {}).length,
    title: document.title,
    unregistered: window.app.graph._nodes
      .filter((n) => !(n.type in window.LiteGraph.registered_node_types) || n.has_errors)
      .map((n) => n.type),
  }));
  await fitView(page);
  const shot = await screenshot(page, artifactDir, `${wf.name}-loaded`);
  return {
    loaded,
    node_types: types,
    missing_node_types: [...new Set([...missing, ...state.unregistered])],
    dialogs,
    nodes: state.nodes,
    links: state.links,
    load_ms: Date.now() - t0,
    console_errors: errs.console.slice(mark),
    page_errors: errs.page.slice(pmark),
    screenshot: shot,
  };
}

/** {nodeId: {widgetName: round step}} of the FLOAT widgets in the current graph. */
async function widgetRounds(page) {
  return page.evaluate(() => {
    const out = {};
    for (const n of window.app.graph._nodes) {
      out[String(n.id)] = {};
      for (const w of n.widgets ?? []) if (w.options?.round) out[String(n.id)][w.name] = Number(w.options.round);
    }
    return out;
  });
}

async function promptOutput(page) {
  return page.evaluate(async () => (await window.app.graphToPrompt()).output);
}

async function fetchJson(url, timeoutMs = 15_000) {
  const r = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function queueFromUi(page, base, timeoutS) {
  const t0 = Date.now();
  const respP = page.waitForResponse(
    (r) => r.url().endsWith("/api/prompt") && r.request().method() === "POST",
    { timeout: 30_000 },
  );
  const button = page.locator('[data-testid="queue-button"] button').first();
  await button.click({ timeout: 15_000 });
  const resp = await respP;
  const body = await resp.json().catch(() => ({}));
  const promptId = body.prompt_id ?? null;
  const res = { prompt_id: promptId, queue_http_status: resp.status(), node_errors: body.node_errors ?? null };
  if (!promptId) {
    res.error = `no prompt id: ${JSON.stringify(body).slice(0, 800)}`;
    return res;
  }
  const deadline = Date.now() + timeoutS * 1000;
  let entry = null;
  // Software-rendered canvas frames cost CPU the 2-core host needs for sampling: pause drawing while we wait
  // (events still arrive and update the stores; the first frame after resuming draws the results).
  await page.evaluate(() => (window.app.canvas.pause_rendering = true));
  try {
    while (Date.now() < deadline) {
      const h = await fetchJson(`${base}/api/history/${promptId}`).catch(() => ({}));
      entry = h[promptId];
      if (entry?.status?.completed || entry?.status?.status_str === "error") break;
      await sleep(500);
    }
  } finally {
    await page.evaluate(() => (window.app.canvas.pause_rendering = false)).catch(() => {});
  }
  res.run_ms = Date.now() - t0;
  res.completed = !!entry?.status?.completed;
  res.status = entry?.status?.status_str ?? (entry ? "unknown" : "timeout");
  res.messages = (entry?.status?.messages ?? [])
    .filter(([t]) => t === "execution_error")
    .map(([, d]) => `${d.node_type}: ${d.exception_message}`.slice(0, 1000));
  const images = [];
  for (const [nodeId, out] of Object.entries(entry?.outputs ?? {})) {
    for (const im of out.images ?? []) images.push({ node: nodeId, ...im });
  }
  res.images = images;
  res.output_images = images.filter((i) => i.type === "output").length;
  return res;
}

/** After a run: what the page shows on ControlStack nodes (hint previews, control report). */
async function nodeImages(page, timeoutMs = 15_000) {
  const read = () =>
    page.evaluate(() => {
      const out = {};
      for (const n of window.app.graph._nodes) {
        if (!String(n.comfyClass ?? n.type).startsWith("ControlStack") && !/Save|Preview/.test(n.type)) continue;
        out[n.id] = {
          type: n.type,
          imgs: (n.imgs ?? []).filter((i) => i?.complete && i.naturalWidth > 0).length,
          srcs: (n.imgs ?? []).map((i) => i.src?.replace(/^.*\/view\?/, "view?")),
          hint_event_images: (n.csHintImages ?? []).length,
          stack_index: n.csStackIndex ?? null,
          color: n.color ?? null,
        };
      }
      return out;
    });
  const want = (o) =>
    Object.values(o).every((n) => {
      if (n.type === "ControlStackApplyHint") return n.hint_event_images === 0 || n.imgs > 0;
      if (n.type === "ControlStackSampler") return n.imgs > 0;
      return true;
    });
  const deadline = Date.now() + timeoutMs;
  let o = await read();
  while (!want(o) && Date.now() < deadline) {
    await page.evaluate(() => window.app.graph.setDirtyCanvas(true, true));
    await sleep(300);
    o = await read();
  }
  return o;
}

async function pngRoundtrip(page, base, image, before, artifactDir, name) {
  const t0 = Date.now();
  const q = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type });
  const r = await fetch(`${base}/api/view?${q}`, { signal: AbortSignal.timeout(60_000) });
  const bytes = Buffer.from(await r.arrayBuffer());
  writeFileSync(join(artifactDir, `${name}-output.png`), bytes);
  await dropFile(page, image.filename, bytes, "image/png");
  let loaded = true;
  try {
    await waitGraphReplaced(page, null);
  } catch {
    loaded = false;
  }
  const after = await promptOutput(page);
  await fitView(page);
  const shot = await screenshot(page, artifactDir, `${name}-from-png`);
  return { image: image.filename, loaded, diffs: comparePrompts(after, before), ms: Date.now() - t0, screenshot: shot };
}

/** Drag bar `index` of the first ControlScale node's chart to `target` with the real mouse. */
async function dragBar(page, artifactDir, { index = 3, target = 1.5 } = {}) {
  const t0 = Date.now();
  const setup = await page.evaluate(() => {
    let node = window.app.graph._nodes.find((n) => n.comfyClass === "ControlStackControlScale");
    let created = false;
    if (!node) {
      node = window.LiteGraph.createNode("ControlStackControlScale");
      if (!node) return { error: "ControlStackControlScale not registered" };
      node.pos = [200, 200];
      window.app.graph.add(node);
      created = true;
    }
    // Put the node at a known spot on screen at zoom 1.
    const ds = window.app.canvas.ds;
    ds.scale = 1;
    ds.offset[0] = -node.pos[0] + 150;
    ds.offset[1] = -node.pos[1] + 120;
    window.app.graph.setDirtyCanvas(true, true);
    return { id: node.id, created };
  });
  if (setup.error) return setup;
  await sleep(400); // a frame draws the chart and records its y
  const geo = await page.evaluate(
    ({ id, index, target }) => {
      const node = window.app.graph.getNodeById(id);
      const g = window.ControlStackWeb?.chartGeometry(node);
      if (!g) return { error: "no layer-scale chart on the node" };
      const bar = g.bars[index];
      const ds = window.app.canvas.ds;
      const rect = window.app.canvas.canvas.getBoundingClientRect();
      const toScreen = (x, y) => [
        rect.left + (node.pos[0] + x + ds.offset[0]) * ds.scale,
        rect.top + (node.pos[1] + y + ds.offset[1]) * ds.scale,
      ];
      const yOf = (v) => g.plotBottom - ((v - g.min) / (g.max - g.min)) * (g.plotBottom - g.plotTop);
      const mode = node.widgets.find((w) => w.name === "mode")?.value;
      const w = node.widgets.find((w) => w.name === bar.name);
      return {
        name: bar.name,
        from: toScreen(bar.cx, (bar.top + bar.bottom) / 2 - 1),
        to: toScreen(bar.cx, yOf(target)),
        before_value: w.value,
        before_mode: mode,
      };
    },
    { id: setup.id, index, target },
  );
  if (geo.error) return geo;
  const before = await promptOutput(page);
  await page.mouse.move(geo.from[0], geo.from[1]);
  await page.mouse.down();
  const steps = 8;
  for (let i = 1; i <= steps; i++) {
    const y = geo.from[1] + ((geo.to[1] - geo.from[1]) * i) / steps;
    await page.mouse.move(geo.from[0], y);
    await sleep(30);
  }
  await page.mouse.up();
  await sleep(300);
  const after = await page.evaluate(
    ({ id, name }) => {
      const node = window.app.graph.getNodeById(id);
      return {
        value: node.widgets.find((w) => w.name === name).value,
        mode: node.widgets.find((w) => w.name === "mode")?.value,
        bar_top: window.ControlStackWeb.chartGeometry(node).bars.find((b) => b.name === name).top,
      };
    },
    { id: setup.id, name: geo.name },
  );
  const prompt = await promptOutput(page);
  const shot = await screenshot(page, artifactDir, "layer-scale-drag");
  // Presets redraw the bars: switch to "prompt is more important" through the widget's callback (as the UI does).
  const preset = await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id);
    const mw = node.widgets.find((w) => w.name === "mode");
    mw.value = "prompt is more important";
    mw.callback?.(mw.value, window.app.canvas, node);
    const layers = node.widgets.filter((w) => /^in_\d\d$|^middle$/.test(w.name));
    const geo = window.ControlStackWeb.chartGeometry(node);
    return { values: layers.map((w) => w.value), bar_tops: geo.bars.map((b) => b.top) };
  }, setup.id);
  const presetPrompt = await promptOutput(page);
  return {
    node: setup.id,
    created_node: setup.created,
    widget: geo.name,
    target,
    before_value: geo.before_value,
    before_mode: geo.before_mode,
    after_value: after.value,
    after_mode: after.mode,
    prompt_before: before[String(setup.id)]?.inputs ?? null,
    prompt_after: prompt[String(setup.id)]?.inputs ?? null,
    preset_values: preset.values,
    preset_bar_tops: preset.bar_tops,
    preset_prompt: presetPrompt[String(setup.id)]?.inputs ?? null,
    ms: Date.now() - t0,
    screenshot: shot,
  };
}

/**
 * Kind badges (GET /controlstack/describe): load `wf`, read what Load ControlNet shows for its file (csKind, colours,
 * badge text and where the badge sits next to the title), ask the route about `classic` and `missing` from the page,
 * switch the loader's combo to `classic` and `missing` through the widget callback and back, and screenshot the
 * loader and the ApplyHint it feeds at zoom `zoom` (<artifact_dir>/kind-badge-loader.png, kind-badge-hint.png).
 */
async function kindBadges(page, wf, errs, artifactDir, { classic, missing, zoom = 1.5 } = {}) {
  const t0 = Date.now();
  const rec = await loadWorkflow(page, wf, errs, artifactDir);
  if (!rec.loaded) return { error: `could not load ${wf.name}` };
  const ids = await page.evaluate((LOAD) => {
    const nodes = window.app.graph._nodes;
    const loader = nodes.find((n) => n.comfyClass === LOAD);
    return {
      loader: loader?.id ?? null,
      hints: nodes.filter((n) => n.comfyClass === "ControlStackApplyHint").map((n) => n.id),
    };
  }, "ControlStackLoadControlNet");
  if (ids.loader == null) return { error: `no Load ControlNet node in ${wf.name}` };
  /** Wait until the loader's csKind describes `file` (or any kind when `file` is null); the loader's state. */
  const loaderState = async (file) => {
    await page
      .waitForFunction(
        ({ id, file }) => {
          const n = window.app.graph.getNodeById(id);
          const w = n?.widgets?.find((x) => x.name === "control_net_name");
          return !!n?.csKind && n.csKindFile === w?.value && (file == null || w?.value === file);
        },
        { id: ids.loader, file },
        { timeout: 15_000, polling: 100 },
      )
      .catch(() => {});
    // csKind is set by an async fetch: give a late (stale) answer the chance to land before reading.
    await sleep(300);
    return page.evaluate((id) => {
      const n = window.app.graph.getNodeById(id);
      return {
        value: n.widgets.find((x) => x.name === "control_net_name")?.value ?? null,
        cs_kind: n.csKind ?? null,
        badge: window.ControlStackWeb.kindBadge(n.csKind),
        color: n.color ?? null,
        bgcolor: n.bgcolor ?? null,
      };
    }, ids.loader);
  };
  const out = { workflow: wf.name, loader_id: ids.loader, hint_ids: ids.hints };
  out.initial = await loaderState(null);
  out.kind_colors = await page.evaluate(() => window.ControlStackWeb.KIND_COLORS ?? null);
  out.source_loaders = await page.evaluate(
    (hints) =>
      Object.fromEntries(
        hints.map((id) => [id, window.ControlStackWeb.sourceLoader(window.app.graph.getNodeById(id))?.id ?? null]),
      ),
    ids.hints,
  );
  // The route, asked from the page (console errors during these calls count).
  const mark = errs.console.length;
  const pmark = errs.page.length;
  out.describe = await page.evaluate(
    async (names) => {
      const res = {};
      for (const name of names) {
        const r = await fetch(`/api/controlstack/describe?name=${encodeURIComponent(name)}`);
        let body = null;
        try {
          body = await r.json();
        } catch {
          /* not JSON */
        }
        res[name] = { status: r.status, body, via_extension: await window.ControlStackWeb.describeControlFile(name) };
      }
      return res;
    },
    [classic, missing].filter(Boolean),
  );
  // The widget callback (as picking a file in the combo does) refreshes the kind; then the missing file; then back.
  const pick = (file) =>
    page.evaluate(
      ({ id, file }) => {
        const n = window.app.graph.getNodeById(id);
        const w = n.widgets.find((x) => x.name === "control_net_name");
        w.value = file;
        w.callback?.(file, window.app.canvas, n);
      },
      { id: ids.loader, file },
    );
  out.after_change = {};
  for (const file of [classic, missing, out.initial.value].filter(Boolean)) {
    await pick(file);
    out.after_change[file] = await loaderState(file);
  }
  await sleep(300);
  out.console_errors = errs.console.slice(mark);
  out.page_errors = errs.page.slice(pmark);
  // Zoomed screenshots of the loader and the first ApplyHint, with where the badge and the title text sit.
  const shoot = async (id, name) => {
    const box = await page.evaluate(
      ({ id, zoom }) => {
        const n = window.app.graph.getNodeById(id);
        const canvas = window.app.canvas;
        const ds = canvas.ds;
        const H = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
        ds.scale = zoom;
        ds.offset[0] = -n.pos[0] + 120 / zoom;
        ds.offset[1] = -n.pos[1] + 260 / zoom;
        canvas.deselectAll?.();
        window.app.graph.setDirtyCanvas(true, true);
        const rect = canvas.canvas.getBoundingClientRect();
        return {
          x: rect.left + (n.pos[0] + ds.offset[0]) * zoom - 12,
          y: rect.top + (n.pos[1] - H + ds.offset[1]) * zoom - 12,
          width: n.size[0] * zoom + 24,
          height: (n.size[1] + H) * zoom + 24,
        };
      },
      { id, zoom },
    );
    await sleep(400);
    const geom = await page.evaluate((id) => {
      const n = window.app.graph.getNodeById(id);
      const H = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
      const ctx = document.createElement("canvas").getContext("2d");
      ctx.font = n.titleFontStyle ?? `${window.LiteGraph.NODE_TEXT_SIZE ?? 14}px Arial`;
      const title = String(n.getTitle?.() ?? n.title ?? "");
      return {
        title,
        size: [n.size[0], n.size[1]],
        title_left: H,
        title_right: H + Math.min(ctx.measureText(title).width, n.size[0] - 2 * H),
        badge: n.csBadge ?? null,
      };
    }, id);
    const path = join(artifactDir, `${name}.png`);
    try {
      await page.screenshot({ path, clip: box });
    } catch (e) {
      log("screenshot failed", name, String(e));
      return { ...geom, screenshot: null };
    }
    return { ...geom, screenshot: path };
  };
  out.loader_view = await shoot(ids.loader, "kind-badge-loader");
  if (ids.hints.length) out.hint_view = await shoot(ids.hints[0], "kind-badge-hint");
  out.ms = Date.now() - t0;
  return out;
}

// --------------------------------------------------------------------------------------------------------------
// Nodes 2.0 and subgraphs (job.modes)
// --------------------------------------------------------------------------------------------------------------

const SCALE_NODE = "ControlStackControlScale";
const HINT_NODE = "ControlStackApplyHint";

/**
 * Move the second ApplyHint of the loaded graph and the ControlScale that feeds it into a new subgraph (the host
 * then runs them as "<subgraph node>:<inner id>"). Returns the ids: root hint / scale, the subgraph node and the
 * inner hint / scale.
 */
async function makeSubgraph(page) {
  return page.evaluate(
    ({ SCALE, HINT }) => {
      const g = window.app.graph;
      const hints = g._nodes.filter((n) => n.comfyClass === HINT);
      if (hints.length < 2) return { error: `need two ${HINT} nodes, found ${hints.length}` };
      const scaleOf = (h) => {
        const slot = h.findInputSlot("scales");
        const up = slot >= 0 ? h.getInputNode(slot) : null;
        return up?.comfyClass === SCALE ? up : null;
      };
      const [rootHint, moved] = hints;
      const rootScale = scaleOf(rootHint);
      const movedScale = scaleOf(moved);
      if (!rootScale || !movedScale) return { error: "each ApplyHint needs a ControlScale on its scales input" };
      const { subgraph, node } = g.convertToSubgraph(new Set([moved, movedScale]));
      const inner = (cls) => subgraph._nodes.find((n) => n.comfyClass === cls)?.id ?? null;
      return {
        root: { hint: rootHint.id, scale: rootScale.id },
        subgraph_node: node.id,
        subgraph_id: subgraph.id,
        inner: { hint: inner(HINT), scale: inner(SCALE) },
      };
    },
    { SCALE: SCALE_NODE, HINT: HINT_NODE },
  );
}

/** Show `nodeId` of the graph on screen (root, or the subgraph when `subgraph` is true) at zoom 1. */
async function showNode(page, ids, nodeId, subgraph) {
  const switched = await page.evaluate(
    ({ ids, subgraph }) => {
      const canvas = window.app.canvas;
      const root = window.app.graph;
      const sgNode = root.getNodeById(ids.subgraph_node);
      const want = subgraph ? sgNode.subgraph : root;
      if (canvas.graph === want) return false;
      if (subgraph) canvas.openSubgraph(want, sgNode);
      else canvas.setGraph(root);
      return true;
    },
    { ids, subgraph },
  );
  // After a graph switch the frontend restores that graph's saved view a moment later: aim after that.
  if (switched) await sleep(800);
  await page.evaluate((nodeId) => {
    const canvas = window.app.canvas;
    const node = canvas.graph.getNodeById(nodeId);
    const ds = canvas.ds;
    ds.scale = 1;
    ds.offset[0] = -node.pos[0] + 150;
    ds.offset[1] = -node.pos[1] + 120;
    canvas.setDirty(true, true);
  }, nodeId);
  await sleep(700); // a frame (classic) / the Vue node mounts and draws its widgets
}

/**
 * The layer-scale chart of ControlScale `nodeId` in the graph now shown: what the extension computed (values,
 * draws) and the colours of the drawn pixels at the centres of the middle and in_11 bars. Classic: the graph
 * canvas; Nodes 2.0: the chart's own <canvas> inside the node's DOM element.
 */
async function chartState(page, nodeId) {
  return page.evaluate((nodeId) => {
    const canvas = window.app.canvas;
    const node = canvas.graph.getNodeById(nodeId);
    const g = window.ControlStackWeb.chartGeometry(node);
    if (!g) return { error: "no chart widget" };
    const vue = !!window.LiteGraph.vueNodesMode;
    const el = vue ? document.querySelector(`[data-node-id="${nodeId}"] canvas`) : canvas.canvas;
    const pixel = (bar) => {
      if (!el || !bar) return null;
      const ratio = el.width / el.clientWidth; // device pixels per CSS pixel of that canvas
      const ds = canvas.ds;
      const y = (bar.top + bar.bottom) / 2;
      const [x, yy] = vue
        ? [bar.cx, y]
        : [(node.pos[0] + bar.cx + ds.offset[0]) * ds.scale, (node.pos[1] + y + ds.offset[1]) * ds.scale];
      const d = el.getContext("2d").getImageData(Math.round(x * ratio), Math.round(yy * ratio), 1, 1).data;
      return [d[0], d[1], d[2]];
    };
    const byName = (name) => g.bars.find((b) => b.name === name);
    return {
      vue,
      element: vue ? !!el : null,
      draws: g.draws,
      width: g.width,
      names: g.bars.map((b) => b.name),
      values: g.values,
      mode: node.widgets.find((w) => w.name === "mode")?.value ?? null,
      pixel_middle: pixel(byName("middle")),
      pixel_in_11: pixel(byName("in_11")),
    };
  }, nodeId);
}

/** After a run: the hint previews of the root ApplyHint and of the one in the subgraph, as the page shows them. */
async function previewState(page, ids, subgraph, timeoutMs = 15_000) {
  const hintId = subgraph ? ids.inner.hint : ids.root.hint;
  await showNode(page, ids, hintId, subgraph);
  const read = () =>
    page.evaluate(
      ({ ids, hintId, subgraph }) => {
        const vue = !!window.LiteGraph.vueNodesMode;
        const node = window.app.canvas.graph.getNodeById(hintId);
        const loaded = (imgs) => imgs.filter((i) => i?.complete && i.naturalWidth > 0).length;
        const locator = subgraph ? `${ids.subgraph_id}:${hintId}` : String(hintId);
        const execId = subgraph ? `${ids.subgraph_node}:${hintId}` : String(hintId);
        return {
          execution_id: execId,
          found_by_execution_id: window.ControlStackWeb.nodeByExecutionId(execId) === node,
          hint_event_images: (node.csHintImages ?? []).length,
          stored_images: window.app.nodeOutputs[locator]?.images?.length ?? 0,
          // what is on screen: classic loads node.imgs when it draws the node; Nodes 2.0 has <img> in the node
          shown: vue
            ? loaded([...document.querySelectorAll(`[data-node-id="${hintId}"] img`)])
            : loaded(node.imgs ?? []),
        };
      },
      { ids, hintId, subgraph },
    );
  const deadline = Date.now() + timeoutMs;
  let s = await read();
  while (s.shown === 0 && Date.now() < deadline) {
    await page.evaluate(() => window.app.canvas.setDirty(true, true));
    await sleep(300);
    s = await read();
  }
  return s;
}

/** Drag bar `index` of ControlScale `nodeId`'s chart (graph now shown) to `target` with the real mouse. */
async function dragChart(page, nodeId, { index = 3, target = 1.5 } = {}) {
  const geo = await page.evaluate(
    ({ nodeId, index, target }) => {
      const canvas = window.app.canvas;
      const node = canvas.graph.getNodeById(nodeId);
      const g = window.ControlStackWeb.chartGeometry(node);
      const bar = g.bars[index];
      const yOf = (v) => g.plotBottom - ((v - g.min) / (g.max - g.min)) * (g.plotBottom - g.plotTop);
      let toScreen;
      if (window.LiteGraph.vueNodesMode) {
        const el = document.querySelector(`[data-node-id="${nodeId}"] canvas`);
        const r = el.getBoundingClientRect();
        const sx = r.width / el.clientWidth; // the canvas zoom transform on the node element
        const sy = r.height / el.clientHeight;
        toScreen = (x, y) => [r.left + x * sx, r.top + y * sy];
      } else {
        const ds = canvas.ds;
        const r = canvas.canvas.getBoundingClientRect();
        toScreen = (x, y) => [
          r.left + (node.pos[0] + x + ds.offset[0]) * ds.scale,
          r.top + (node.pos[1] + y + ds.offset[1]) * ds.scale,
        ];
      }
      return { name: bar.name, from: toScreen(bar.cx, (bar.top + bar.bottom) / 2 - 1), to: toScreen(bar.cx, yOf(target)) };
    },
    { nodeId, index, target },
  );
  // What the press lands on (a diagnosis when the drag does nothing): the chart's canvas or something over it.
  const hit = await page.evaluate(([x, y]) => {
    const el = document.elementFromPoint(x, y);
    const what = el ? `${el.tagName.toLowerCase()}.${String(el.className?.baseVal ?? el.className).slice(0, 80)}` : null;
    return { at: [Math.round(x), Math.round(y)], element: what };
  }, geo.from);
  await page.mouse.move(geo.from[0], geo.from[1]);
  await page.mouse.down();
  for (let i = 1; i <= 8; i++) {
    await page.mouse.move(geo.from[0], geo.from[1] + ((geo.to[1] - geo.from[1]) * i) / 8);
    await sleep(30);
  }
  await page.mouse.up();
  await sleep(300);
  const prompt = await promptOutput(page);
  const inputs = Object.values(prompt).find((n) => n.class_type === SCALE_NODE && n.inputs?.[geo.name] != null)
    ?.inputs;
  const after = await page.evaluate(
    ({ nodeId, name }) => {
      const node = window.app.canvas.graph.getNodeById(nodeId);
      return {
        value: node.widgets.find((w) => w.name === name).value,
        mode: node.widgets.find((w) => w.name === "mode").value,
      };
    },
    { nodeId, name: geo.name },
  );
  return { widget: geo.name, target, hit, ...after, prompt_value: inputs?.[geo.name] ?? null, prompt_mode: inputs?.mode ?? null };
}

/**
 * Edits as the node's own widgets make them (value, then the callback with what that renderer passes), on
 * ControlScale `nodeId`: the "prompt is more important" preset, then a user edit of in_05 that leaves it.
 */
async function presetAndEdit(page, nodeId) {
  return page.evaluate((nodeId) => {
    const vue = !!window.LiteGraph.vueNodesMode;
    const canvas = window.app.canvas;
    const node = canvas.graph.getNodeById(nodeId);
    const w = (name) => node.widgets.find((x) => x.name === name);
    // Nodes 2.0's widget components call widget.callback(value); the graph canvas adds (canvas, node, pos, e).
    const edit = (widget, value) => {
      widget.value = value;
      if (vue) widget.callback?.(value);
      else widget.callback?.(value, canvas, node);
    };
    const layers = () => window.ControlStackWeb.scaleSchema.layers.map((n) => Number(w(n).value));
    // soft weights: the preset follows its base and flip widgets
    edit(w("mode"), "soft weights");
    edit(w("base_multiplier"), 0.5);
    edit(w("flip_weights"), true);
    const soft = { mode: w("mode").value, values: layers() };
    edit(w("mode"), "prompt is more important");
    const preset = { mode: w("mode").value, values: layers() };
    edit(w("in_05"), 0.3);
    return { soft, preset, after_edit: { mode: w("mode").value, values: layers() } };
  }, nodeId);
}

/**
 * The "Convert ControlNet nodes to ControlStack" command on a graph of built-in nodes (job.convert.api, loaded with
 * app.loadApiJson): graphToPrompt() before, after, and after one undo; the server's answer; whether the command is
 * registered in the menu's command store.
 */
async function convertOnPage(page, { api, ui, ui_converted: uiConverted }) {
  const out = await convertOneOnPage(page, { api });
  out.subgraph = await convertSubgraphOnPage(page, { api });
  if (ui) {
    // a UI file dropped on the page (a ComfyUI template), then the CLI's conversion of the same file
    out.ui = await convertOneOnPage(page, { ui });
    out.ui.cli = await page.evaluate(async (g) => {
      await window.app.loadGraphData(g);
      await new Promise((r) => setTimeout(r, 300));
      return (await window.app.graphToPrompt()).output;
    }, uiConverted);
  }
  return out;
}

async function convertOneOnPage(page, { api, ui }) {
  return page.evaluate(async ({ api, ui }) => {
    const app = window.app;
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    if (ui) await app.loadGraphData(ui);
    else app.loadApiJson(api, "controlstack-convert");
    await sleep(300);
    const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
    tracker?.checkState?.();
    const before = (await app.graphToPrompt()).output;
    const commands = app.extensionManager?.command?.commands ?? [];
    const registered = commands.some?.((c) => c.id === window.ControlStackConvert.CONVERT_COMMAND) ?? null;
    const result = await window.ControlStackConvert.convertOpenGraph();
    const after = (await app.graphToPrompt()).output;
    const undoDepth = tracker?.undoQueue?.length ?? null;
    await tracker.undo();
    await sleep(300);
    const restored = (await app.graphToPrompt()).output;
    return { before, after, restored, registered, undoDepth, applied: result.applied, report: result.report };
  }, { api, ui });
}

/**
 * The same graph with its sampler and ControlNet nodes moved into a subgraph by the frontend (convertToSubgraph),
 * then the menu command: graphToPrompt() (flattened, "<subgraph node>:<inner id>") before, after and after one undo,
 * the serialized workflow, and the node types inside the subgraph after the command.
 */
async function convertSubgraphOnPage(page, { api }) {
  return page.evaluate(async ({ api }) => {
    const app = window.app;
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    app.loadApiJson(api, "controlstack-convert-subgraph");
    await sleep(300);
    const g = app.graph;
    const inside = new Set(["KSampler", "ControlNetLoader", "ControlNetApplyAdvanced", "ControlNetApply"]);
    const { subgraph, node } = g.convertToSubgraph(new Set(g._nodes.filter((n) => inside.has(n.comfyClass))));
    await sleep(300);
    const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
    tracker?.checkState?.();
    const before = (await app.graphToPrompt()).output;
    const serialized = app.graph.serialize();
    const result = await window.ControlStackConvert.convertOpenGraph();
    const after = (await app.graphToPrompt()).output;
    const sub = app.graph.getNodeById(node.id)?.subgraph;
    const innerTypes = (sub?._nodes ?? []).map((n) => n.comfyClass).sort();
    await tracker.undo();
    await sleep(300);
    const restored = (await app.graphToPrompt()).output;
    return {
      before,
      after,
      restored,
      serialized,
      subgraph_id: subgraph.id,
      inner_types: innerTypes,
      applied: result.applied,
      report: result.report,
    };
  }, { api });
}

/**
 * One renderer (classic graph canvas or Nodes 2.0) over `wf`: load it, move one ApplyHint + ControlScale into a
 * subgraph, read the root chart, run (seed `seed`, so the host samples again), read both hint previews and the
 * chart inside the subgraph; in Nodes 2.0 also drag a bar and edit the widgets.
 */
async function modesOnPage(page, wf, base, errs, artifactDir, { seed, label, timeoutS, drag }) {
  const t0 = Date.now();
  const out = { label };
  const mark = errs.console.length;
  const pmark = errs.page.length;
  const rec = await loadWorkflow(page, wf, errs, artifactDir);
  if (!rec.loaded) return { ...out, error: `could not load ${wf.name}` };
  out.vue_nodes_mode = await page.evaluate(() => !!window.LiteGraph.vueNodesMode);
  out.scale_schema = await page.evaluate(() => window.ControlStackWeb.scaleSchema);
  const ids = await makeSubgraph(page);
  if (ids.error) return { ...out, error: ids.error };
  out.ids = ids;
  await page.evaluate((seed) => {
    for (const n of window.app.graph._nodes) {
      const w = n.widgets?.find((x) => x.name === "seed");
      if (w) w.value = seed;
    }
  }, seed);
  await showNode(page, ids, ids.root.scale, false);
  out.root_chart = await chartState(page, ids.root.scale);
  await screenshot(page, artifactDir, `modes-${label}-root`);
  const before = await promptOutput(page);
  out.prompt_ids = Object.keys(before).sort();
  out.run = await queueFromUi(page, base, timeoutS);
  out.root_preview = await previewState(page, ids, false);
  out.subgraph_preview = await previewState(page, ids, true);
  await showNode(page, ids, ids.inner.scale, true);
  out.subgraph_chart = await chartState(page, ids.inner.scale);
  await screenshot(page, artifactDir, `modes-${label}-subgraph`);
  if (drag) {
    await showNode(page, ids, ids.root.scale, false);
    out.drag = await dragChart(page, ids.root.scale);
    out.edit = await presetAndEdit(page, ids.root.scale);
    out.chart_after_edit = await chartState(page, ids.root.scale);
    await screenshot(page, artifactDir, `modes-${label}-drag`);
  }
  out.console_errors = errs.console.slice(mark);
  out.page_errors = errs.page.slice(pmark);
  out.ms = Date.now() - t0;
  return out;
}

/** A page with Nodes 2.0 on (the setting answered by a route, nothing stored on the server) and, to show that the
 * extension takes them from the node definition, ControlScale's prompt decay replaced by `decay`. */
async function openVuePage(context, base, decay) {
  return openApp(context, `${base}/`, {
    newPage: true,
    beforeGoto: async (page) => {
      await page.route(/\/api\/settings$/, async (route) => {
        if (route.request().method() !== "GET") return route.continue();
        const resp = await route.fetch();
        const settings = await resp.json();
        await route.fulfill({ response: resp, json: { ...settings, "Comfy.VueNodes.Enabled": true } });
      });
      await page.route(/\/api\/object_info$/, async (route) => {
        const resp = await route.fetch();
        const info = await resp.json();
        const meta = info[SCALE_NODE]?.input?.required?.mode?.[1]?.controlstack;
        if (meta && decay != null) meta.prompt_decay = decay;
        await route.fulfill({ response: resp, json: info });
      });
    },
  });
}

// --------------------------------------------------------------------------------------------------------------

async function main() {
  const job = readJob();
  const base = job.url.replace(/\/$/, "");
  const artifactDir = repoPath(job.artifact_dir ?? ".artifacts/browser");
  mkdirSync(artifactDir, { recursive: true });
  const t0 = Date.now();
  const result = { url: base, workflows: [], timings: {} };
  const { context, blocked, close } = await launch();
  try {
    const { page, consoleErrors, pageErrors } = await openApp(context, `${base}/`);
    const errs = { console: consoleErrors, page: pageErrors };
    result.timings.open_ms = Date.now() - t0;
    result.startup = await page.evaluate(() => ({
      extension: !!window.ControlStackWeb,
      controlstack_types: Object.keys(window.LiteGraph.registered_node_types).filter((t) =>
        t.startsWith("ControlStack"),
      ),
      frontend_version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
    }));
    result.startup.console_errors = [...consoleErrors];
    result.startup.page_errors = [...pageErrors];
    await closeDialogs(page);
    await screenshot(page, artifactDir, "startup");
    let roundtripDone = false;

    for (const wf of job.workflows ?? []) {
      log("workflow", wf.name);
      const rec = { name: wf.name };
      result.workflows.push(rec);
      try {
        Object.assign(rec, await loadWorkflow(page, wf, errs, artifactDir));
        if (wf.api) {
          const api = JSON.parse(readFileSync(repoPath(wf.api), "utf8"));
          const got = await promptOutput(page);
          rec.api_diffs = comparePrompts(got, api, await widgetRounds(page));
        }
        await closeDialogs(page);
        rec.queued = !!(job.run && rec.loaded && !(job.skip_run ?? []).includes(wf.name));
        if (rec.queued) {
          const before = await promptOutput(page);
          const mark = errs.console.length;
          const pmark = errs.page.length;
          Object.assign(rec, await queueFromUi(page, base, job.run_timeout_s ?? 300));
          rec.node_images = await nodeImages(page);
          rec.run_console_errors = errs.console.slice(mark);
          rec.run_page_errors = errs.page.slice(pmark);
          rec.dialogs_after_run = await openDialogs(page);
          await fitView(page);
          rec.run_screenshot = await screenshot(page, artifactDir, `${wf.name}-run`);
          const png = (rec.images ?? []).find((i) => i.type === "output" && i.filename.endsWith(".png"));
          if (job.png_roundtrip && png && !roundtripDone) {
            rec.png_roundtrip = await pngRoundtrip(page, base, png, before, artifactDir, wf.name);
            roundtripDone = true;
          }
        }
      } catch (e) {
        rec.error = String(e?.stack || e);
        log("error", wf.name, rec.error);
        await screenshot(page, artifactDir, `${wf.name}-error`);
      }
    }

    if (job.drag) {
      log("drag");
      try {
        const wf = (job.workflows ?? []).find((w) => {
          const j = JSON.parse(readFileSync(repoPath(w.ui), "utf8"));
          return (j.nodes ?? []).some((n) => n.type === "ControlStackControlScale");
        });
        if (wf) {
          const rec = await loadWorkflow(page, wf, errs, artifactDir);
          if (!rec.loaded) throw new Error(`could not reload ${wf.name}`);
        } else {
          await page.evaluate(() => window.app.graph.clear());
        }
        result.drag = { workflow: wf?.name ?? null, ...(await dragBar(page, artifactDir, job.drag_args ?? {})) };
      } catch (e) {
        result.drag = { error: String(e?.stack || e) };
      }
    }
    if (job.kinds) {
      log("kinds");
      try {
        const wf = (job.workflows ?? []).find((w) => w.name === job.kinds.workflow);
        if (!wf) throw new Error(`kinds: no workflow ${job.kinds.workflow} in the job`);
        result.kinds = await kindBadges(page, wf, errs, artifactDir, job.kinds);
      } catch (e) {
        result.kinds = { error: String(e?.stack || e) };
      }
    }
    if (job.convert) {
      log("convert");
      // its own page: a dropped template opens a workflow (and may show a missing-models dialog) that must not
      // stay for the steps after it
      let own = null;
      try {
        own = await openApp(context, `${base}/`, { newPage: true });
        await closeDialogs(own.page);
        result.convert = await convertOnPage(own.page, job.convert);
        result.convert.page_errors = own.pageErrors.slice(0, 20);
      } catch (e) {
        result.convert = { error: String(e?.stack || e) };
      } finally {
        await own?.page?.close();
      }
    }
    if (job.modes) {
      log("modes");
      const m = job.modes;
      result.modes = {};
      try {
        const wf = (job.workflows ?? []).find((w) => w.name === m.workflow);
        if (!wf) throw new Error(`modes: no workflow ${m.workflow} in the job`);
        const timeoutS = job.run_timeout_s ?? 300;
        result.modes.classic = await modesOnPage(page, wf, base, errs, artifactDir, {
          seed: m.seed ?? 101, label: "classic", timeoutS, drag: false,
        });
        // One page at a time: the hint events go to every open page.
        await page.close();
        const vue = await openVuePage(context, base, m.decay);
        const verrs = { console: vue.consoleErrors, page: vue.pageErrors };
        await closeDialogs(vue.page);
        result.modes.vue = await modesOnPage(vue.page, wf, base, verrs, artifactDir, {
          seed: (m.seed ?? 101) + 1, label: "vue", timeoutS, drag: true,
        });
        result.modes.vue.startup_console_errors = vue.consoleErrors.slice(0, 20);
      } catch (e) {
        result.modes.error = String(e?.stack || e);
      }
    }
    result.console_errors = [...consoleErrors];
    result.page_errors = [...pageErrors];
  } finally {
    result.blocked_requests = [...new Set(blocked)];
    await close();
  }
  result.timings.total_ms = Date.now() - t0;
  process.stdout.write(JSON.stringify(result) + "\n");
}

const isMain = process.argv[1] && resolve(process.argv[1]) === resolve(new URL(import.meta.url).pathname);
if (isMain) {
  main().catch((e) => {
    process.stderr.write(String(e?.stack || e) + "\n");
    process.exit(1);
  });
}
