// Dataset page: the token-length histogram, and progress while statistics are computed (then a reload).
(function () {
  "use strict";
  const stats = JSON.parse(document.getElementById("dataset-stats").textContent || "{}");
  const chart = document.getElementById("length-chart");
  if (chart && stats.histogram && window.Plotly) {
    const h = stats.histogram;
    Plotly.newPlot(chart, [{ type: "bar", x: h.starts.map((s) => s + h.bin_width / 2), y: h.counts,
                             width: h.bin_width * 0.95, name: "records" }],
                   { margin: { t: 10, r: 10, b: 40, l: 50 }, height: 280, bargap: 0,
                     xaxis: { title: { text: "tokens" } }, yaxis: { title: { text: "records" } },
                     shapes: [{ type: "line", x0: stats.max_seq_len, x1: stats.max_seq_len, y0: 0, y1: 1,
                                yref: "paper", line: { dash: "dot", color: "#c0392b" } }] },
                   { responsive: true, displaylogo: false });
  }
  const status = document.getElementById("stats-status");
  if (status && ["queued", "running"].includes(status.dataset.status)) {
    const poll = async () => {
      const r = await fetch(status.dataset.url);
      const body = await r.json();
      const bar = document.getElementById("stats-progress");
      if (bar) bar.value = body.progress;
      if (body.status === "done" || body.status === "failed") window.location.reload();
      else setTimeout(poll, 1000);
    };
    setTimeout(poll, 1000);
  }
})();
