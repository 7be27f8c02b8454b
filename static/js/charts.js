// Shared chart helpers: one metric's series from metric points, EMA smoothing, and a plotly layout.
window.MiniCharts = {
  series(points, key, xKey) {
    const x = [], y = [];
    for (const p of points) {
      if (p.values[key] === undefined || p.values[key] === null) continue;
      x.push(xKey === "tokens" ? (p.values.tokens ?? p.step) : p.step);
      y.push(p.values[key]);
    }
    return { x, y };
  },
  smooth(y, weight) {  // TensorBoard-style exponential moving average
    if (!weight) return y;
    const out = [];
    let last = null;
    for (const v of y) { last = last === null ? v : last * weight + (1 - weight) * v; out.push(last); }
    return out;
  },
  layout(logy, xTitle) {
    return { margin: { t: 10, r: 20, b: 40, l: 60 }, height: 300, legend: { orientation: "h" },
             xaxis: { title: { text: xTitle || "step" } }, yaxis: { type: logy ? "log" : "linear" } };
  },
};
