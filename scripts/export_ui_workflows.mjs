#!/usr/bin/env node
// Generate the UI-format (drag-and-drop) twin workflows/<name>.json of every API-format workflows/api/<name>.json,
// with the real ComfyUI frontend in headless chromium: app.loadApiJson(api), seeds pinned ("fixed"), nodes laid
// out left to right by dependency depth, checked (graphToPrompt() == the API file), app.graph.serialize().
//
//   node scripts/export_ui_workflows.mjs --url http://127.0.0.1:8188 [workflows/api/a.json ...]
//
// The server at --url must have the pack loaded (e.g. the host harness: python scripts/host.py ...).
// Exit code 1 if any workflow fails to load or does not round-trip.

import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { REPO, launch, openApp } from "../tests/browser/browser.mjs";
import { comparePrompts } from "../tests/browser/driver.mjs";

function parseArgs(argv) {
  const args = { url: process.env.COMFY_URL ?? null, files: [], out: join(REPO, "workflows") };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--url") args.url = argv[++i];
    else if (argv[i] === "--out") args.out = resolve(argv[++i]);
    else args.files.push(resolve(argv[i]));
  }
  if (!args.files.length) {
    const dir = join(REPO, "workflows", "api");
    args.files = readdirSync(dir)
      .filter((f) => f.endsWith(".json"))
      .sort()
      .map((f) => join(dir, f));
  }
  if (!args.url) throw new Error("--url http://127.0.0.1:PORT of a ComfyUI with the pack loaded is required");
  return args;
}

/** Runs in the page: load the API graph, pin seeds, lay it out left to right, return the serialized graph. */
async function convertInPage(api, name) {
  const app = window.app;
  const LiteGraph = window.LiteGraph;
  const missing = [...new Set(Object.values(api).map((n) => n.class_type))].filter(
    (t) => !(t in LiteGraph.registered_node_types),
  );
  if (missing.length) return { missing };
  app.loadApiJson(api, name);
  await new Promise((r) => setTimeout(r, 300));
  const graph = app.graph;
  const nodes = [...graph._nodes];

  // Reproducible runs: seeds stay as written.
  for (const n of nodes) {
    for (const w of n.widgets ?? []) if (w.name === "control_after_generate") w.value = "fixed";
  }

  // Depth = longest path from a source node; a source (loader, image, scales ...) then moves right to sit one
  // column before its nearest consumer, so hints and scales stand next to the node that uses them.
  const depth = new Map();
  const linkOf = (id) => graph.links[id] ?? graph.links.get?.(id);
  const upstream = (n) =>
    (n.inputs ?? [])
      .map((inp) => (inp.link != null ? linkOf(inp.link) : null))
      .filter(Boolean)
      .map((l) => graph.getNodeById(l.origin_id))
      .filter(Boolean);
  const downstream = (n) =>
    (n.outputs ?? [])
      .flatMap((o) => o.links ?? [])
      .map((id) => linkOf(id))
      .filter(Boolean)
      .map((l) => graph.getNodeById(l.target_id))
      .filter(Boolean);
  const visit = (n, stack = new Set()) => {
    if (depth.has(n.id)) return depth.get(n.id);
    if (stack.has(n.id)) return 0;
    stack.add(n.id);
    const d = Math.max(-1, ...upstream(n).map((u) => visit(u, stack))) + 1;
    depth.set(n.id, d);
    return d;
  };
  nodes.forEach((n) => visit(n));
  for (const n of nodes) {
    const outs = downstream(n);
    if (upstream(n).length === 0 && outs.length) depth.set(n.id, Math.min(...outs.map((o) => depth.get(o.id))) - 1);
  }
  const minDepth = Math.min(...depth.values());
  for (const [id, d] of depth) depth.set(id, d - minDepth);

  // Image loaders grow once their picture arrives: give them that room now.
  // So do the nodes that show an image after a run (hint preview, control report, saved/previewed images):
  // without the room they would cover the node below them once the run is done.
  const GROWS = new Set(["ControlStackApplyHint", "ControlStackSampler", "PreviewImage", "SaveImage"]);
  for (const n of nodes) {
    if (n.type === "LoadImage") n.setSize([Math.max(n.size[0], 315), Math.max(n.size[1], 320)]);
    else if (GROWS.has(n.type)) n.setSize([Math.max(n.size[0], 270), n.computeSize()[1] + 240]);
  }

  // Columns left to right; in a column, nodes in id order, stacked with gaps.
  const T = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
  const GAP_X = 60;
  const GAP_Y = 40;
  const cols = new Map();
  for (const n of nodes) {
    const d = depth.get(n.id);
    if (!cols.has(d)) cols.set(d, []);
    cols.get(d).push(n);
  }
  let x = 0;
  for (const d of [...cols.keys()].sort((a, b) => a - b)) {
    const col = cols.get(d).sort((a, b) => Number(a.id) - Number(b.id));
    let y = T;
    let width = 0;
    for (const n of col) {
      const min = n.computeSize();
      n.setSize([Math.max(n.size[0], min[0]), Math.max(n.size[1], min[1])]);
      n.pos = [x, y];
      y += n.size[1] + T + GAP_Y;
      width = Math.max(width, n.size[0]);
    }
    x += width + GAP_X;
  }
  graph.setDirtyCanvas(true, true);
  globalThis.ControlStackWeb?.recolorStack?.(graph);

  const serialized = graph.serialize();
  serialized.extra = { ...(serialized.extra ?? {}), ds: { scale: 0.8, offset: [40, 40] } };
  const prompt = (await app.graphToPrompt()).output;
  const rounds = {};
  for (const n of graph._nodes) {
    rounds[String(n.id)] = {};
    for (const w of n.widgets ?? []) if (w.options?.round) rounds[String(n.id)][w.name] = Number(w.options.round);
  }
  return { serialized, prompt, rounds };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { context, close } = await launch();
  let failed = 0;
  try {
    const { page, pageErrors } = await openApp(context, `${args.url.replace(/\/$/, "")}/`);
    for (const file of args.files) {
      const name = basename(file, ".json");
      const api = JSON.parse(readFileSync(file, "utf8"));
      const res = await page.evaluate(({ api, name }) => window.__csConvert(api, name), { api, name }).catch(
        async () => {
          await page.evaluate(`window.__csConvert = ${convertInPage.toString()}`);
          return page.evaluate(({ api, name }) => window.__csConvert(api, name), { api, name });
        },
      );
      if (res.missing) {
        console.error(`${name}: missing node types ${res.missing.join(", ")}`);
        failed++;
        continue;
      }
      const diffs = comparePrompts(res.prompt, api, res.rounds);
      if (diffs.length) {
        console.error(`${name}: UI graph does not convert back to the API file:\n  ${diffs.join("\n  ")}`);
        failed++;
        continue;
      }
      const out = join(args.out, `${name}.json`);
      writeFileSync(out, JSON.stringify(res.serialized, null, 2) + "\n");
      console.log(`${name}: ${res.serialized.nodes.length} nodes, ${res.serialized.links.length} links -> ${out}`);
    }
    if (pageErrors.length) console.error(`page errors:\n${pageErrors.join("\n")}`);
  } finally {
    await close();
  }
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e?.stack || e);
  process.exit(1);
});
