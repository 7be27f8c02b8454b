// Job page: plotly loss/lr chart fed by the job's WebSocket (/ws/jobs/<id>/), live status, progress and log.
(function () {
  "use strict";
  const meta = JSON.parse(document.getElementById("job-meta").textContent);
  const points = JSON.parse(document.getElementById("points").textContent);
  const chart = document.getElementById("chart");
  const labels = JSON.parse(document.getElementById("status-labels").textContent);
  const FINAL = ["succeeded", "failed", "cancelled"];

  function series(pts, key) {
    const x = [], y = [];
    for (const p of pts) if (p.values[key] !== undefined) { x.push(p.step); y.push(p.values[key]); }
    return { x, y };
  }
  const loss = series(points, "loss"), lr = series(points, "lr"), evl = series(points, "eval_loss");
  Plotly.newPlot(chart, [
    { x: loss.x, y: loss.y, name: "loss", mode: "lines", line: { color: "#2563eb" } },
    { x: lr.x, y: lr.y, name: "lr", mode: "lines", yaxis: "y2", line: { color: "#f59e0b", dash: "dot" } },
    { x: evl.x, y: evl.y, name: "eval loss", mode: "lines+markers", line: { color: "#16a34a" } },
  ], {
    margin: { t: 10, r: 70, b: 40, l: 50 }, height: 320, legend: { orientation: "h" },
    xaxis: { title: { text: "step" } }, yaxis: { title: { text: "loss" } },
    yaxis2: { title: { text: "lr" }, overlaying: "y", side: "right", tickformat: ".1e" },  // 3.0e-4: short ticks
  }, { responsive: true, displaylogo: false });
  chart.dataset.points = String(loss.x.length);

  // The "all metrics" chart: any metric the stage reports, with smoothing and log scale.
  const allPoints = points.slice();
  const metricSel = document.getElementById("metric"), smooth = document.getElementById("smooth");
  const logy = document.getElementById("logy"), metricChart = document.getElementById("metric-chart");
  function drawMetric() {
    if (!metricSel.value) return;
    const s = MiniCharts.series(allPoints, metricSel.value, "step");
    Plotly.react(metricChart, [{ x: s.x, y: MiniCharts.smooth(s.y, Number(smooth.value)), name: metricSel.value,
                                 mode: "lines" }], MiniCharts.layout(logy.checked), { responsive: true, displaylogo: false });
  }
  function addMetricKeys(pts) {
    for (const p of pts) for (const k of Object.keys(p.values)) {
      if (![...metricSel.options].some((o) => o.value === k)) metricSel.add(new Option(k, k));
    }
  }
  for (const el of [metricSel, smooth, logy]) el.addEventListener("input", drawMetric);
  addMetricKeys(allPoints);
  drawMetric();

  const logEl = document.getElementById("log");
  const search = document.getElementById("log-search");
  let fullLog = logEl.textContent;
  function showLog() {
    const q = search.value.trim().toLowerCase();
    logEl.textContent = q ? fullLog.split("\n").filter((l) => l.toLowerCase().includes(q)).join("\n") : fullLog;
  }
  search.addEventListener("input", showLog);
  function setStatus(job) {
    const el = document.getElementById("job-status");
    el.className = "status s-" + job.status;
    el.dataset.status = job.status;
    el.textContent = labels[job.status] || job.status;
    document.getElementById("job-progress").value = job.progress;
    document.getElementById("job-steps").textContent = job.phase_text || (job.step + " / " + (job.total_steps || "?"));
    document.getElementById("job-node").textContent = (job.node || "–") + (job.slurm ? " · " + job.slurm.text : "");
    const err = document.getElementById("job-error");
    if (job.error) { err.hidden = false; err.textContent = job.error; }
    const halve = document.getElementById("half-batch");  // out of memory while training: offer half the batch
    if (halve) halve.hidden = !job.can_halve_batch;
    if (job.output_model) {
      document.getElementById("job-model").innerHTML =
        '<a href="' + meta.modelUrl.replace("/0/", "/" + job.output_model + "/") + '">#' + job.output_model + "</a>";
    }
    for (const form of document.querySelectorAll("#job-actions form")) {
      form.hidden = !form.dataset.states.split(" ").includes(job.status);
    }
  }

  let pending = [];
  let timer = null;
  function flushPoints() {  // coalesce WebSocket batches: at most a few chart redraws a second
    timer = null;
    if (!pending.length) return;
    const l = series(pending, "loss"), r = series(pending, "lr"), e = series(pending, "eval_loss");
    allPoints.push(...pending);
    addMetricKeys(pending);
    drawMetric();
    pending = [];
    Plotly.extendTraces(chart, { x: [l.x, r.x, e.x], y: [l.y, r.y, e.y] }, [0, 1, 2]);
    chart.dataset.points = String(Number(chart.dataset.points) + l.x.length);
  }

  if (meta.final) return;
  let after = meta.after, logOffset = meta.logOffset, retry = 1000;
  function connect() {
    const proto = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(proto + location.host + "/ws/jobs/" + meta.id + "/?after=" + after + "&log_after=" + logOffset +
                              "&lang=" + encodeURIComponent(document.documentElement.lang));
    ws.onmessage = function (ev) {
      const msg = JSON.parse(ev.data);
      if (msg.points.length) {
        after = msg.points[msg.points.length - 1].seq;
        pending.push(...msg.points);
        if (!timer) timer = setTimeout(flushPoints, 250);
      }
      if (msg.log) {
        const atBottom = logEl.scrollTop + logEl.clientHeight >= logEl.scrollHeight - 5;
        fullLog += msg.log;
        showLog();
        if (atBottom) logEl.scrollTop = logEl.scrollHeight;
      }
      logOffset = msg.log_offset;
      if (msg.events) {  // the status moved: the history as the server words it, in the page's language
        document.getElementById("job-events").replaceChildren(...msg.events.map((e) => {
          const li = document.createElement("li");
          li.textContent = [e.time, e.label, e.actor, e.message].filter(Boolean).join(" · ");
          return li;
        }));
      }
      setStatus(msg.job);
      if (FINAL.includes(msg.job.status)) { flushPoints(); ws.close(); ws.onclose = null; }
    };
    ws.onopen = function () { retry = 1000; };
    ws.onclose = function () { setTimeout(connect, retry); retry = Math.min(retry * 2, 15000); };
  }
  connect();
})();
