// Opens a running ComfyUI's editor in Debian's headless Chromium (playwright-core, no browser
// download), loads every workflow, and writes a JSON report. Called by test_browser.py:
//   node check_editor.mjs <server url> <screenshot dir> <report.json> <workflow.json>...
import { chromium } from "playwright-core";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { basename, join } from "node:path";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";

const [url, shotDir, reportPath, ...workflows] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
mkdirSync(shotDir, { recursive: true });

const report = { console: [], pageErrors: [], extensions: [], nodeTypes: [], workflows: {}, jsFiles: [] };
const userDataDir = mkdtempSync(join(tmpdir(), "chromium-profile-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  viewport: { width: 1600, height: 1000 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
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
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types
    && Object.keys(window.LiteGraph.registered_node_types).length > 50, null, { timeout: 120000 });
  await page.waitForTimeout(1500);
  report.extensions = await page.evaluate(() => (window.app.extensions ?? []).map((e) => e.name));
  report.nodeTypes = await page.evaluate(() => Object.keys(window.LiteGraph.registered_node_types));
  for (const wfPath of workflows) {
    const wf = JSON.parse(readFileSync(wfPath, "utf8"));
    const name = basename(wfPath, ".json");
    const res = await page.evaluate(async (data) => {
      const app = window.app;
      await app.loadGraphData(data, true, true, "check");
      const reg = window.LiteGraph.registered_node_types;
      const nodes = app.graph._nodes ?? app.graph.nodes ?? [];
      const missing = data.nodes.map((n) => n.type).filter((t) => !(t in reg));
      const loaded = nodes.map((n) => n.type);
      const widgetMismatch = [];
      for (const src of data.nodes) {
        const node = app.graph.getNodeById(src.id);
        if (!node) continue;
        const vals = (node.widgets ?? []).filter((w) => w.serialize !== false).map((w) => w.value);
        if (Array.isArray(src.widgets_values) && vals.length !== src.widgets_values.length) {
          widgetMismatch.push({ id: src.id, type: src.type, file: src.widgets_values.length, editor: vals.length });
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
      app.canvas?.ds && (app.canvas.ds.offset = [0, 0]);
      app.graph.setDirtyCanvas(true, true);
      return { missing, loaded, widgetMismatch, modelInfo, nodeCount: nodes.length };
    }, wf);
    // dismiss any dialog (e.g. a missing-models notice) before the screenshot
    await page.keyboard.press("Escape").catch(() => {});
    await page.waitForTimeout(600);
    const dialogs = await page.$$eval(".p-dialog, .comfy-modal[style*='flex']", (els) =>
      els.map((e) => (e.innerText || "").slice(0, 300)));
    const shot = join(shotDir, `${name}.png`);
    await page.screenshot({ path: shot });
    report.workflows[name] = { ...res, dialogs, screenshot: shot };
  }
} finally {
  await context.close();
  writeFileSync(reportPath, JSON.stringify(report, null, 1));
}
