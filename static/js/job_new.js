// New-job form: presets, datasets and base/teacher models that fit the stage, a live parameter count and the
// equivalent API request.
(function () {
  "use strict";
  const presets = JSON.parse(document.getElementById("presets").textContent);
  const wizard = JSON.parse(document.getElementById("wizard").textContent);
  const $ = (id) => document.getElementById(id);
  const field = (id) => $(id) && $(id).closest(".field");
  const CONFIG = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "epochs",
                  "batch_size", "learning_rate", "accumulation_steps", "max_seq_len", "max_steps", "log_interval",
                  "save_interval"];

  $("id_preset").addEventListener("change", function () {
    const values = presets[this.value];
    if (!values) return;
    for (const [key, value] of Object.entries(values)) $("id_" + key).value = value;
    update();
  });

  function fitStage() {
    const stage = $("id_stage").value, kind = wizard.stage_kind[stage];
    const datasets = $("id_dataset");
    for (const opt of datasets.options) {
      if (!opt.value) continue;
      opt.hidden = wizard.dataset_kinds[opt.value] !== kind;
    }
    if (datasets.selectedOptions[0] && datasets.selectedOptions[0].hidden) {
      const first = [...datasets.options].find((o) => o.value && !o.hidden);
      datasets.value = first ? first.value : "";
    }
    field("id_base_model").hidden = stage === "pretrain";
    field("id_teacher_model").hidden = stage !== "distill";
  }

  function parameters() {  // MiniMind-3 dense: tied embedding + per layer attention, q/k norms, norms, SwiGLU MLP
    const h = +$("id_hidden_size").value, layers = +$("id_num_hidden_layers").value;
    const heads = +$("id_num_attention_heads").value, kvHeads = +$("id_num_key_value_heads").value;
    if (!h || !layers || !heads || !kvHeads || h % heads) return null;
    const hd = h / heads, kv = kvHeads * hd, inter = Math.ceil((h * Math.PI) / 64) * 64;
    const perLayer = 2 * h * h + 2 * h * kv + 2 * hd + 2 * h + 3 * h * inter;
    return wizard.vocab_size * h + h + layers * perLayer;
  }

  function update() {
    const n = parameters();
    $("param-count").textContent = n === null ? "–" : (n / 1e6).toFixed(2) + "M";
    const config = {};
    for (const key of CONFIG) {
      const v = $("id_" + key).value;
      if (v !== "") config[key] = Number(v);
    }
    const body = { name: $("id_name").value, stage: $("id_stage").value, dataset: Number($("id_dataset").value),
                   config };
    if ($("id_base_model").value) body.base_model = Number($("id_base_model").value);
    if ($("id_teacher_model").value) body.teacher_model = Number($("id_teacher_model").value);
    $("spec-preview").textContent = JSON.stringify(body, null, 2);
  }

  $("id_stage").addEventListener("change", () => { fitStage(); update(); });
  $("job-form").addEventListener("input", update);
  fitStage();
  update();
})();
