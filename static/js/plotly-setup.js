// Every chart's settings, loaded after plotly.min.js. No "Share chart" button: it uploads the chart's data to Plotly's
// cloud, and a self-hosted portal's training data stays on the box. And the charts in the page's language: the plotly
// Python package that serves plotly.min.js ships no locale files, so the Chinese month and day names and the chart
// toolbar's words are given here, as a locale module for Plotly.register
// (https://plotly.com/javascript/configuration-options/#change-the-default-locale).
(function () {
  "use strict";
  if (!window.Plotly) return;
  Plotly.setPlotConfig({ modeBarButtonsToRemove: ["sendChartToCloud"], displaylogo: false });
  if (document.documentElement.lang !== "zh-hans") return;
  const months = ["一月", "二月", "三月", "四月", "五月", "六月", "七月", "八月", "九月", "十月", "十一月", "十二月"];
  Plotly.register({
    moduleType: "locale",
    name: "zh-CN",
    dictionary: {
      "Autoscale": "自动缩放", "Zoom": "缩放", "Zoom in": "放大", "Zoom out": "缩小", "Pan": "平移",
      "Box Select": "框选", "Lasso Select": "套索选择", "Reset axes": "重置坐标轴",
      "Download plot as a PNG": "下载为 PNG 图片", "Download plot": "下载图表",
      "Show closest data on hover": "悬停时显示最近的数据", "Compare data on hover": "悬停时比较数据",
      "Toggle Spike Lines": "显示/隐藏辅助线", "Double-click to zoom back out": "双击恢复缩放",
      "Double-click on legend to isolate one trace": "双击图例只看这一条曲线",
    },
    format: {
      days: ["星期日", "星期一", "星期二", "星期三", "星期四", "星期五", "星期六"],
      shortDays: ["周日", "周一", "周二", "周三", "周四", "周五", "周六"],
      months: months,
      shortMonths: months.map((_, i) => (i + 1) + "月"),
      date: "%Y-%m-%d",
    },
  });
  Plotly.setPlotConfig({ locale: "zh-CN" });
})();
