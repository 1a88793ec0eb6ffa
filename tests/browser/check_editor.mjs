// Opens a running ComfyUI's editor in Debian's headless Chromium (playwright-core, no browser
// download), loads every workflow twice and writes a JSON report. Called by test_browser.py:
//   node check_editor.mjs <server url> <screenshot dir> <report.json> <models dir> <workflow.json>...
// <models dir> is a models root the server lists (checkpoints/, diffusion_models/, loras/ ...), empty
// at the start:
//   1. "absent": each workflow is loaded with none of its models installed, and the editor's
//      missing-models list is read (name, folder, URL of every row): the dialog of frontend 1.2x, or
//      the Errors tab of the properties panel that later frontends open from the error overlay.
//   2. "present": an empty placeholder file is written for every model the workflows name (the editor
//      only compares names with the server's listing), the page is reloaded, and each workflow is
//      loaded again: nodes, widgets and the loader's info widget are checked and a screenshot taken.
import { chromium } from "playwright-core";
import { readFileSync, writeFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { basename, join } from "node:path";
import { tmpdir } from "node:os";

const [url, shotDir, reportPath, modelsDir, ...workflows] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
mkdirSync(shotDir, { recursive: true });

const report = { console: [], pageErrors: [], extensions: [], nodeTypes: [], workflows: {}, jsFiles: [],
                 missingModels: {}, placeholders: [] };
const userDataDir = mkdtempSync(join(tmpdir(), "chromium-profile-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  viewport: { width: 1600, height: 1000 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

// the two ways frontends list missing models (feature detection by what is on the page)
const OLD_DIALOG = ".comfy-missing-models";                       // 1.2x: a dialog with a listbox
const ERROR_OVERLAY = "[data-testid=error-overlay]";                // later: overlay -> Errors tab
const ERROR_GROUP = "[data-testid=error-group-missing-model]";

async function openEditor(page) {
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types
    && Object.keys(window.LiteGraph.registered_node_types).length > 50, null, { timeout: 120000 });
  await page.waitForTimeout(1500);
  // record what the "Copy URL" and "Download" buttons would do, without leaving the page
  await page.evaluate(() => {
    window.__copied = [];
    window.__opened = [];
    const clip = navigator.clipboard;
    if (clip) {
      const orig = clip.writeText?.bind(clip);
      clip.writeText = (t) => { window.__copied.push(String(t)); return orig ? orig(t).catch(() => {}) : Promise.resolve(); };
    }
    const click = HTMLAnchorElement.prototype.click;
    HTMLAnchorElement.prototype.click = function () {
      if (this.target === "_blank" || this.download) {
        window.__opened.push({ href: this.href, download: this.download });
        return;
      }
      return click.call(this);
    };
    window.open = (u) => { window.__opened.push({ href: String(u), download: "" }); return null; };
  });
}

async function load(page, wf, name) {
  await page.evaluate(async ([data, title]) => {
    await window.app.loadGraphData(data, true, true, title);
    // one tab: close the others (each load opens a new one); skipped where the store lacks it
    const store = window.app.extensionManager?.workflow;
    for (const w of [...(store?.openWorkflows ?? [])]) {
      if (!store.isActive?.(w)) await store.closeWorkflow?.(w, { warnIfUnsaved: false })?.catch?.(() => {});
    }
  }, [wf, name]);
}

// the whole graph in view, clear of the side toolbar and the top bars; scale at most 1
async function fitGraph(page) {
  await page.evaluate(() => {
    const app = window.app;
    const nodes = app.graph._nodes ?? app.graph.nodes ?? [];
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of nodes) {
      x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
      x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const rect = app.canvas.canvas.getBoundingClientRect();
    const side = document.querySelector(".side-tool-bar-container")?.getBoundingClientRect();
    const left = Math.max(0, (side?.right ?? rect.left) - rect.left) + 24;
    const top = rect.top < 50 ? 80 : 24;
    const scale = Math.min(1, (rect.width - left - 24) / (x1 - x0), (rect.height - top - 24) / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [left / scale - x0, top / scale - y0];
    app.graph.setDirtyCanvas(true, true);
  });
}

async function waitFor(page, selectors, ms) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    for (const sel of selectors) if (await page.locator(sel).count()) return sel;
    await page.waitForTimeout(200);
  }
  return null;
}

async function readMissingModels(page) {
  const found = await waitFor(page, [OLD_DIALOG, ERROR_OVERLAY, ERROR_GROUP], 10000);
  if (found === OLD_DIALOG) {
    // each option: <span title="URL">directory / name</span>, with a "Copy URL" button
    const rows = await page.$$eval(`${OLD_DIALOG} li`, (lis) => lis.map((li) => {
      const span = li.querySelector("span[title]");
      const [directory, ...rest] = (span?.textContent ?? "").split(" / ");
      return { name: rest.join(" / ").trim(), directory: directory.trim(), url: span?.getAttribute("title") ?? null };
    }));
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
    return { ui: "dialog", rows };
  }
  if (found === null) return { ui: null, rows: [] };
  if (!(await page.locator(ERROR_GROUP).count())) {
    await page.locator(ERROR_OVERLAY).getByText("View details").first().click();
    await page.locator(ERROR_GROUP).first().waitFor({ timeout: 10000 });
  }
  const group = page.locator(ERROR_GROUP).first();
  const download = group.locator("[data-testid=missing-model-download]");
  const rows = [];
  for (let i = 0; i < await download.count(); i++) {
    // a row: [name button (title = file name)] [Copy URL] over the folder, then [Download] [Locate]
    const row = download.nth(i).locator("xpath=..");
    const name = await row.locator("button[title]").first().getAttribute("title");
    const directory = (await row.locator(":scope > span > span").last().textContent())?.trim();
    const opened = await page.evaluate(() => window.__opened.length);
    await download.nth(i).click();
    await page.waitForFunction((n) => window.__opened.length > n, opened, { timeout: 5000 }).catch(() => {});
    const copied = await page.evaluate(() => window.__copied.length);
    await row.getByRole("button", { name: "Copy URL" }).click();
    await page.waitForFunction((n) => window.__copied.length > n, copied, { timeout: 5000 }).catch(() => {});
    rows.push({ name, directory,
                url: await page.evaluate((n) => window.__opened[n]?.href ?? null, opened),
                copiedUrl: await page.evaluate((n) => window.__copied[n] ?? null, copied) });
  }
  const toggle = page.getByRole("button", { name: "Toggle properties panel" });
  if (await toggle.count()) await toggle.first().click();  // close the panel again
  return { ui: "errors-panel", rows };
}

async function missingModelsShown(page) {
  return (await waitFor(page, [OLD_DIALOG, ERROR_OVERLAY, ERROR_GROUP], 2500)) !== null;
}

try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") {
      report.console.push({ type: msg.type(), text: msg.text(), url: msg.location()?.url ?? "" });
    }
  });
  page.on("pageerror", (err) => report.pageErrors.push(String(err?.stack || err)));
  page.on("response", (r) => {
    if (r.url().includes("/extensions/")) report.jsFiles.push({ url: r.url(), status: r.status() });
  });
  // no request leaves the machine (a frontend may try to look up model sizes on the model's host)
  await context.route((u) => !u.href.startsWith(url), (route) => route.abort());

  const loaded = workflows.map((p) => ({ name: basename(p, ".json"), wf: JSON.parse(readFileSync(p, "utf8")) }));

  // 1. models absent: what the missing-models list says
  await openEditor(page);
  report.extensions = await page.evaluate(() => (window.app.extensions ?? []).map((e) => e.name));
  report.nodeTypes = await page.evaluate(() => Object.keys(window.LiteGraph.registered_node_types));
  for (const { name, wf } of loaded) {
    await load(page, wf, name);
    report.missingModels[name] = await readMissingModels(page);
  }

  // 2. models present (empty placeholders under the names the workflows give)
  for (const { wf } of loaded) {
    for (const node of wf.nodes) {
      for (const m of node.properties?.models ?? []) {
        mkdirSync(join(modelsDir, m.directory), { recursive: true });
        writeFileSync(join(modelsDir, m.directory, m.name), "");
        report.placeholders.push(`${m.directory}/${m.name}`);
      }
    }
  }
  await openEditor(page);
  for (const { name, wf } of loaded) {
    await load(page, wf, name);
    const res = await page.evaluate((data) => {
      const app = window.app;
      const reg = window.LiteGraph.registered_node_types;
      const nodes = app.graph._nodes ?? app.graph.nodes ?? [];
      const missing = data.nodes.map((n) => n.type).filter((t) => !(t in reg));
      const loaded = nodes.map((n) => n.type);
      const widgetMismatch = [];
      const comboMissing = [];
      for (const src of data.nodes) {
        const node = app.graph.getNodeById(src.id);
        if (!node) continue;
        const widgets = (node.widgets ?? []).filter((w) => w.serialize !== false);
        if (Array.isArray(src.widgets_values) && widgets.length !== src.widgets_values.length) {
          widgetMismatch.push({ id: src.id, type: src.type, file: src.widgets_values.length, editor: widgets.length });
        }
        for (const m of src.properties?.models ?? []) {
          const w = widgets.find((x) => x.value === m.name);
          const values = w?.options?.values;
          const options = typeof values === "function" ? values() : values;
          if (!w || !Array.isArray(options) || !options.includes(m.name)) comboMissing.push({ id: src.id, name: m.name });
        }
      }
      // js/model_info.js: what the loader's ui output ({"text": [...]}) turns into on the node
      // a sample of the loader's info text (what it says after a run; here no model has run)
      const INFO_SAMPLE = "(shown after a run) detected: family, teacher, parameters, cost per step vs " +
        "the teacher, recommended sampler / steps / CFG / size";
      const modelInfo = [];
      for (const node of nodes.filter((n) => n.type === "DistilledUNetLoader")) {
        const before = JSON.stringify(node.serialize().widgets_values);
        node.onExecuted?.({ text: [INFO_SAMPLE] });
        const w = (node.widgets ?? []).find((x) => x.name === "model_info");
        modelInfo.push({ id: node.id, shown: w?.value ?? null,
                         serializedUnchanged: JSON.stringify(node.serialize().widgets_values) === before });
      }
      return { missing, loaded, widgetMismatch, comboMissing, modelInfo, nodeCount: nodes.length };
    }, wf);
    const modelsShown = await missingModelsShown(page);
    await fitGraph(page);
    await page.waitForTimeout(600);
    const dialogs = await page.$$eval(".p-dialog, [role=dialog], .comfy-modal[style*='flex']", (els) =>
      els.map((e) => (e.innerText || "").slice(0, 300)));
    const shot = join(shotDir, `${name}.png`);
    await page.screenshot({ path: shot });
    report.workflows[name] = { ...res, modelsShown, dialogs, screenshot: shot };
  }
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
  writeFileSync(reportPath, JSON.stringify(report, null, 1));
}
