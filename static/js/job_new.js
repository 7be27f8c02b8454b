// New-job form: presets, datasets and base/teacher models that fit the stage, the parameter count, memory and time
// estimate (validated by the server as the form changes) and the equivalent API request.
(function () {
  "use strict";
  const presets = JSON.parse(document.getElementById("presets").textContent);
  const wizard = JSON.parse(document.getElementById("wizard").textContent);
  const $ = (id) => document.getElementById(id);
  const field = (id) => $(id) && $(id).closest(".field");
  const setValue = (key, value) => {
    const el = $("id_" + key);
    if (!el) return;
    if (el.type === "checkbox") el.checked = !!value;
    else el.value = value === null || value === undefined ? "" : value;
  };
  const getValue = (key) => {
    const el = $("id_" + key);
    if (!el) return undefined;
    if (el.type === "checkbox") return el.checked;
    if (el.value === "") return undefined;
    return el.tagName === "SELECT" || el.type === "text" ? el.value : Number(el.value);
  };

  function fillDefaults() {  // MiniMind's defaults for the stage; the tiny preset keeps its quick CPU settings
    const stage = $("id_stage").value, defaults = wizard.defaults[stage] || {};
    const tiny = $("id_preset").value === "tiny";
    for (const [key, value] of Object.entries(defaults)) {
      setValue(key, tiny && key in wizard.quick_start ? wizard.quick_start[key] : value);
    }
  }

  $("id_preset").addEventListener("change", function () {
    const values = presets[this.value];
    if (!values) return;
    for (const [key, value] of Object.entries(values)) setValue(key, value);
    fillDefaults();
    update();
  });

  function fitStage() {
    const stage = $("id_stage").value, kind = wizard.stage_kind[stage];
    const datasets = $("id_dataset");
    for (const select of [datasets, $("id_eval_dataset")]) {
      for (const opt of select.options) {
        if (!opt.value) continue;
        opt.hidden = wizard.dataset_kinds[opt.value] !== kind;
      }
    }
    if ($("id_eval_dataset").selectedOptions[0] && $("id_eval_dataset").selectedOptions[0].hidden) {
      $("id_eval_dataset").value = "";
    }
    if (datasets.selectedOptions[0] && datasets.selectedOptions[0].hidden) {
      const first = [...datasets.options].find((o) => o.value && !o.hidden);
      datasets.value = first ? first.value : "";
    }
    const bases = wizard.base_stages[stage] || [];
    for (const id of ["id_base_model", "id_teacher_model"]) {
      const select = $(id);
      for (const opt of select.options) {
        if (!opt.value) continue;
        opt.hidden = id === "id_base_model" && !bases.includes(wizard.model_stages[opt.value]);
      }
      if (select.selectedOptions[0] && select.selectedOptions[0].hidden) select.value = "";
    }
    field("id_teacher_model").hidden = stage !== "distill";
    for (const el of document.querySelectorAll(".field[data-stages]")) {
      el.hidden = !el.dataset.stages.split(" ").includes(stage);
    }
  }

  let timer = null, asked = 0;
  function estimate() {  // the server validates the form and answers parameters, memory and time (nothing stored)
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const ticket = ++asked;
      const form = $("job-form");  // (form.dataset would be its "dataset" field)
      let answer;
      try {
        const r = await fetch(form.getAttribute("data-estimate-url"), { method: "POST", body: new FormData(form),
                                                          headers: { "X-Requested-With": "fetch" } });
        answer = await r.json();
      } catch (e) {
        return;  // offline for a moment: the next change asks again
      }
      if (ticket !== asked) return;  // a newer answer is on its way
      for (const el of form.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
      $("estimate-error").hidden = answer.ok;
      $("submit-job").disabled = !answer.ok;  // an invalid combination cannot be submitted from the page
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
    const stage = $("id_stage").value;
    let config = {};
    try { config = JSON.parse($("id_other_config").value || "{}") || {}; } catch (e) { config = {}; }
    const keys = [...wizard.config_fields, ...(wizard.stage_fields[stage] || [])];
    for (const key of keys) {
      const v = getValue(key);
      if (v !== undefined) config[key] = v;
    }
    const body = { name: $("id_name").value, stage: $("id_stage").value, dataset: Number($("id_dataset").value),
                   config };
    if ($("id_base_model").value) body.base_model = Number($("id_base_model").value);
    if ($("id_eval_dataset").value) body.eval_dataset = Number($("id_eval_dataset").value);
    if ($("id_teacher_model").value) body.teacher_model = Number($("id_teacher_model").value);
    if (getValue("gpus") !== undefined && getValue("gpus") !== 1) body.gpus = getValue("gpus");
    if (getValue("priority")) body.priority = getValue("priority");
    if (getValue("time_limit_h")) body.time_limit_s = Math.max(Math.round(getValue("time_limit_h") * 3600), 1);
    $("spec-preview").textContent = JSON.stringify(body, null, 2);
  }

  $("id_stage").addEventListener("change", () => { fitStage(); fillDefaults(); update(); });
  $("job-form").addEventListener("input", update);
  fitStage();
  update();
})();
