// New-job form: presets, datasets and base/teacher models that fit the stage, the parameter count, memory and time
// estimate (validated by the server as the form changes) and the equivalent API request.
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

  let timer = null, asked = 0;
  function estimate() {  // the server validates the form and answers parameters, memory and time (nothing stored)
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const ticket = ++asked;
      const form = $("job-form");
      let answer;
      try {
        const r = await fetch(form.dataset.estimateUrl, { method: "POST", body: new FormData(form),
                                                          headers: { "X-Requested-With": "fetch" } });
        answer = await r.json();
      } catch (e) {
        return;  // offline for a moment: the next change asks again
      }
      if (ticket !== asked) return;  // a newer answer is on its way
      for (const el of form.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
      $("estimate-error").hidden = answer.ok;
      if (!answer.ok) {
        $("estimate-error").textContent = answer.error;
        if (field("id_" + answer.field)) field("id_" + answer.field).classList.add("invalid");
        for (const id of ["param-count", "memory-estimate", "time-estimate"]) $(id).textContent = "–";
        return;
      }
      $("param-count").textContent = answer.parameters;
      $("memory-estimate").textContent = answer.memory;
      $("memory-estimate").title = Object.entries(answer.memory_parts).map(([k, v]) => k + ": " + v).join("\n");
      $("time-estimate").textContent = answer.time;
    }, 250);
  }

  function update() {
    estimate();
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
