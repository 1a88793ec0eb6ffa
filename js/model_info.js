// Detected-model info on the loader nodes: after DistilledUNetLoader (or the pipeline / LoRA loader)
// runs, the Python node sends ui={"text": [info]}; this shows that text in a read-only box on the
// node (family, teacher, parameters, estimated cost vs the teacher, recommended settings).
// The box is not serialized, so widgets_values (and shared workflows) stay exactly as before.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const OUR_NODES = new Set(["DistilledUNetLoader", "DistilledPipelineLoader", "DistilledLoraLoader"]);
const WIDGET_NAME = "model_info";

function showInfo(node, lines) {
  const text = (Array.isArray(lines) ? lines : [lines]).filter((t) => typeof t === "string").join("\n\n");
  if (!text) return;
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets["STRING"](node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.75;
      widget.inputEl.title = "What the loader detected in the file (from its last run)";
    }
  }
  widget.value = text;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    node.setDirtyCanvas(true, true);
  });
}

app.registerExtension({
  name: "distilled_unets.modelInfo",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!OUR_NODES.has(nodeData?.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      if (message?.text) showInfo(this, message.text);
      return r;
    };
  },
});
