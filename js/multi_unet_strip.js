// Multi-UNet step strip: under the widgets of MultiUNetModel and MultiUNetKSampler, one cell per
// sampling step, coloured by the UNet that runs it (early/small vs late/full). Redrawn from the
// current widget values on every canvas draw, so it follows steps / switch_percent / switch_step live.
import { app } from "../../scripts/app.js";

const OUR_NODES = new Set(["MultiUNetModel", "MultiUNetKSampler"]);
const EARLY_COLOR = "#3f8fd8";
const LATE_COLOR = "#d8803f";
const STRIP_HEIGHT = 34;
const DEFAULT_STEPS = 20;

function widgetValue(node, name) {
  const w = node.widgets?.find((x) => x.name === name);
  return w ? w.value : undefined;
}

// Steps of the sampler a MultiUNetModel feeds (follows MODEL links, through chained multi-UNet
// models, up to a few hops). Returns undefined when no connected node has a "steps" widget.
function downstreamSteps(node, depth = 0) {
  if (depth > 4 || !node?.outputs) return undefined;
  const graph = node.graph ?? app.graph;
  for (const out of node.outputs) {
    for (const linkId of out.links ?? []) {
      const link = graph?.links?.[linkId] ?? graph?.links?.get?.(linkId);
      const target = link && graph.getNodeById(link.target_id);
      if (!target) continue;
      const steps = widgetValue(target, "steps");
      if (typeof steps === "number") return steps;
      const deeper = downstreamSteps(target, depth + 1);
      if (deeper !== undefined) return deeper;
    }
  }
  return undefined;
}

// Early steps for n steps. MultiUNetKSampler: exactly switch_step. MultiUNetModel: the switch is a
// percent of the schedule turned into a sigma; on a uniform-in-time schedule ("normal", "simple")
// step i runs early when i < p * n, which is what we show (marked approximate).
export function splitSteps(node) {
  if (node.comfyClass === "MultiUNetKSampler" || node.type === "MultiUNetKSampler") {
    const n = Math.max(1, Number(widgetValue(node, "steps")) || 1);
    const k = Math.min(n, Math.max(0, Number(widgetValue(node, "switch_step")) || 0));
    return { n, k, exact: true, assumed: false };
  }
  const found = downstreamSteps(node);
  const n = Math.max(1, found ?? DEFAULT_STEPS);
  const p = Math.min(1, Math.max(0, Number(widgetValue(node, "switch_percent")) || 0));
  const k = Math.min(n, Math.max(0, Math.ceil(p * n - 1e-9)));
  return { n, k, exact: false, assumed: found === undefined };
}

function label({ n, k, exact, assumed }) {
  const approx = exact ? "" : "≈";
  const of = assumed ? ` (for ${n} steps)` : "";
  if (k === 0) return `all ${n} steps: late UNet${of}`;
  if (k === n) return `all ${n} steps: early UNet${of}`;
  return `${approx}steps 1–${k}: early · ${k + 1}–${n}: late${of}`;
}

function makeStripWidget(node) {
  return {
    name: "multi_unet_strip",
    type: "distilled_unets.strip",
    value: "",
    serialize: false, // not part of widgets_values: workflows stay loadable without this file
    options: { serialize: false },
    computeSize(width) {
      return [width, STRIP_HEIGHT];
    },
    draw(ctx, drawNode, width, y) {
      const split = splitSteps(drawNode);
      const margin = 15;
      const w = Math.max(10, width - 2 * margin);
      const barY = y + 4;
      const barH = 12;
      const cell = w / split.n;
      ctx.save();
      for (let i = 0; i < split.n; i++) {
        ctx.fillStyle = i < split.k ? EARLY_COLOR : LATE_COLOR;
        ctx.fillRect(margin + i * cell, barY, Math.max(1, cell - (cell > 4 ? 1 : 0)), barH);
      }
      ctx.fillStyle = globalThis.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? "#aaa";
      ctx.font = "11px sans-serif";
      ctx.textAlign = "left";
      ctx.fillText(label(split), margin, barY + barH + 13);
      ctx.restore();
      this.value = label(split);
    },
  };
}

app.registerExtension({
  name: "distilled_unets.multiUnetStrip",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!OUR_NODES.has(nodeData?.name)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (!this.widgets?.some((w) => w.name === "multi_unet_strip")) {
        this.addCustomWidget(makeStripWidget(this));
        const size = this.computeSize();
        this.setSize([Math.max(this.size[0], size[0]), Math.max(this.size[1], size[1])]);
      }
      for (const name of ["steps", "switch_percent", "switch_step"]) {
        const w = this.widgets?.find((x) => x.name === name);
        if (!w) continue;
        const cb = w.callback;
        w.callback = (...args) => {
          const out = cb?.apply(w, args);
          this.setDirtyCanvas?.(true, false);
          return out;
        };
      }
      return r;
    };

    // a MultiUNetModel's strip depends on the sampler it feeds: redraw when its links change
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const r = onConnectionsChange?.apply(this, arguments);
      this.setDirtyCanvas?.(true, false);
      return r;
    };
  },
});
