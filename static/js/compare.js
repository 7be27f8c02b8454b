// Compare page: the same metric of several jobs, aligned by step or by tokens.
(function () {
  "use strict";
  const series = JSON.parse(document.getElementById("series").textContent);
  const names = JSON.parse(document.getElementById("job-names").textContent);
  const chart = document.getElementById("compare-chart");
  const metric = document.getElementById("metric"), xaxis = document.getElementById("xaxis");
  const smooth = document.getElementById("smooth"), logy = document.getElementById("logy");
  function draw() {
    const traces = Object.entries(series).map(([id, points]) => {
      const s = MiniCharts.series(points, metric.value, xaxis.value);
      return { x: s.x, y: MiniCharts.smooth(s.y, Number(smooth.value)), name: names[id], mode: "lines" };
    });
    Plotly.react(chart, traces, MiniCharts.layout(logy.checked, xaxis.value), { responsive: true, displaylogo: false });
    chart.dataset.traces = String(traces.length);
  }
  for (const el of [metric, xaxis, smooth, logy]) el.addEventListener("input", draw);
  draw();
})();
