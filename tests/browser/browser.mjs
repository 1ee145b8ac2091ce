// Shared browser plumbing for tests/browser/driver.mjs and scripts/export_ui_workflows.mjs:
// headless Debian chromium driven by npm playwright-core, every request not to 127.0.0.1 blocked,
// a page on the real ComfyUI frontend waited until the app and the ControlStack extension are up.

import { createRequire } from "node:module";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** playwright-core from the repo's node_modules (scripts/setup.sh), or $PLAYWRIGHT_CORE_DIR for a scratch copy. */
export function loadPlaywright() {
  const require = createRequire(join(REPO, "package.json"));
  const paths = [REPO];
  if (process.env.PLAYWRIGHT_CORE_DIR) paths.unshift(process.env.PLAYWRIGHT_CORE_DIR);
  return require(require.resolve("playwright-core", { paths }));
}

export const CHROMIUM_FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-dev-shm-usage",
];

/**
 * Launch chromium with a fresh user-data-dir. Returns {context, close}. All requests whose host is not
 * 127.0.0.1 are aborted and recorded in `blocked`.
 */
export async function launch({ executablePath = process.env.CHROMIUM || "/usr/bin/chromium", viewport } = {}) {
  const { chromium } = loadPlaywright();
  const userDataDir = mkdtempSync(join(tmpdir(), "cs-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: viewport ?? { width: 1920, height: 1200 },
    acceptDownloads: false,
  });
  const blocked = [];
  await context.route("**/*", (route) => {
    const url = route.request().url();
    let host = "";
    try {
      host = new URL(url).hostname;
    } catch {
      /* data:, blob: ... */
    }
    if (host === "127.0.0.1" || url.startsWith("data:") || url.startsWith("blob:")) return route.continue();
    blocked.push(url);
    return route.abort("blockedbyclient");
  });
  const close = async () => {
    await context.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
  };
  return { context, blocked, close };
}

/**
 * Console errors that come from blocking the outside world (the frontend pings a few outside hosts) are
 * expected here; everything else counts.
 */
export function isBlockedNoise(text, location) {
  const url = location?.url ?? "";
  if (/ERR_BLOCKED_BY_CLIENT/.test(text)) return true;
  // The page's own CSP (connect-src 'self') stops the frontend's look-ups on outside hosts (api.comfy.org ...).
  const csp = /^Connecting to '([^']+)' violates the following Content Security Policy/.exec(text);
  if (csp && !/^https?:\/\/127\.0\.0\.1[:/]/.test(csp[1])) return true;
  if (url && !/^https?:\/\/127\.0\.0\.1[:/]/.test(url) && !url.startsWith("blob:") && !url.startsWith("data:")) {
    return /Failed to load resource/.test(text);
  }
  return false;
}

/** Open the frontend and wait until the graph canvas, the node defs and our extension are ready. */
export async function openApp(context, url, { timeoutMs = 90_000, newPage = false, beforeGoto = null } = {}) {
  const page = (!newPage && context.pages()[0]) || (await context.newPage());
  if (beforeGoto) await beforeGoto(page); // e.g. page.route() overrides, before the app asks for anything
  const consoleErrors = [];
  const pageErrors = [];
  page.on("console", (msg) => {
    if (msg.type() !== "error") return;
    const text = msg.text();
    if (isBlockedNoise(text, msg.location())) return;
    consoleErrors.push(text);
  });
  page.on("pageerror", (err) => pageErrors.push(String(err?.stack || err)));
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: timeoutMs });
  await page.waitForFunction(
    () =>
      !!(window.app?.graph && window.app?.canvas && window.LiteGraph) &&
      Object.keys(window.LiteGraph.registered_node_types ?? {}).length > 10 &&
      (window.app.extensionManager !== undefined || true),
    null,
    { timeout: timeoutMs, polling: 250 },
  );
  // Extensions load after the node defs; wait for ours (it sets a global when its module runs).
  await page
    .waitForFunction(() => !!window.ControlStackWeb, null, { timeout: 30_000, polling: 250 })
    .catch(() => {});
  // Screenshots of whole graphs are taken zoomed out: keep text drawn at every zoom (no level-of-detail cut).
  await page.evaluate(() => {
    try {
      window.app.canvas.min_font_size_for_lod = 0;
    } catch {
      /* older frontends */
    }
  });
  return { page, consoleErrors, pageErrors };
}
