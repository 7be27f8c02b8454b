// Devices page: per node, utilisation and memory of each device over the last hour (one reading a minute).
(function () {
  "use strict";
  const history = JSON.parse(document.getElementById("device-history").textContent);
  const labels = JSON.parse(document.getElementById("device-labels").textContent);
  const root = document.getElementById("device-charts");
  if (!root || !window.Plotly) return;
  for (const [node, data] of Object.entries(history)) {
    const hasMemory = Object.values(data.devices).some((d) => d.memory_used.some((v) => v !== null));
    const traces = [];
    for (const [index, d] of Object.entries(data.devices)) {
      traces.push({ x: data.times, y: d.utilization, name: `${labels.device} ${index} %`, mode: "lines" });
      if (hasMemory) {
        traces.push({ x: data.times, y: d.memory_used.map((v) => (v === null ? null : v / 2 ** 30)),
                      name: `${labels.device} ${index} GiB`, mode: "lines", yaxis: "y2", line: { dash: "dot" } });
      }
    }
    const div = document.createElement("div");
    div.className = "chart";
    div.id = "device-chart-" + node;
    root.appendChild(div);
    const layout = { title: { text: node }, margin: { t: 40, r: 60, b: 40, l: 50 }, height: 300,
                     yaxis: { title: { text: labels.utilization }, range: [0, 105] }, legend: { orientation: "h" } };
    if (hasMemory) layout.yaxis2 = { title: { text: labels.memory }, overlaying: "y", side: "right" };
    Plotly.newPlot(div, traces, layout, { responsive: true, displaylogo: false });
  }
})();
