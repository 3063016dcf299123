// Line charts drawn as SVG by hand: one figure, several series, ticked axes, a legend, an accessible summary.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const W = 440, H = 250, M = {left: 76, right: 12, top: 12, bottom: 36};
  LK.colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

  function svg(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Round tick values covering [lo, hi].
  function ticks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function extent(values, padZero) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (!isFinite(lo)) return [0, 1];
    if (padZero) lo = Math.min(lo, 0);
    if (hi === lo) { hi += Math.abs(hi) * 0.1 || 1; lo -= padZero ? 0 : Math.abs(lo) * 0.1 || 1; }
    return [lo, hi];
  }

  // series: [{name, points: [[x, y], ...], color, dashed, dots}]; returns <figure class="chart">.
  LK.lineChart = function ({title, series, xLabel, yLabel, yZero = false, id}) {
    const fig = LK.el("figure", {class: "chart", id});
    fig.append(LK.el("h4", {}, title));
    const pts = series.flatMap((s) => s.points).filter((p) => p[1] !== null && isFinite(p[1]));
    const box = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "data-points": pts.length});
    fig.append(box);
    if (!pts.length) {
      box.setAttribute("aria-label", title + ": no data yet");
      box.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no data yet"));
      return fig;
    }
    const [x0, x1] = extent(pts.map((p) => p[0]), false);
    const [y0, y1] = extent(pts.map((p) => p[1]), yZero);
    const sx = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
    const sy = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);
    for (const t of ticks(y0, y1, 4)) {
      box.append(svg("line", {class: "axis", x1: M.left, x2: W - M.right, y1: sy(t), y2: sy(t)}));
      box.append(svg("text", {x: M.left - 6, y: sy(t) + 4, "text-anchor": "end"}, LK.fmt(t, 3)));
    }
    const xInt = pts.every((p) => Number.isInteger(p[0]));
    for (const t of ticks(x0, x1, 5).filter((v) => !xInt || Number.isInteger(v))) {
      box.append(svg("text", {x: sx(t), y: H - M.bottom + 16, "text-anchor": "middle"}, LK.fmt(t, 3)));
    }
    box.append(svg("text", {x: (W + M.left) / 2, y: H - 4, "text-anchor": "middle"}, xLabel || ""));
    box.append(svg("text", {x: 12, y: M.top + (H - M.bottom) / 2, transform: `rotate(-90 12 ${M.top + (H - M.bottom) / 2})`,
      "text-anchor": "middle"}, yLabel || ""));
    const legend = LK.el("ul", {class: "legend"});
    const summary = [];
    series.forEach((s, i) => {
      const good = s.points.filter((p) => p[1] !== null && isFinite(p[1]));
      if (!good.length) return;
      const color = s.color || LK.colors[i % LK.colors.length];
      const d = good.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join("");
      const attrs = {d, fill: "none", stroke: color, "stroke-width": s.width || 2, "data-series": s.name, "data-points": good.length};
      if (s.dashed) attrs["stroke-dasharray"] = "6 4";
      if (s.opacity) attrs["stroke-opacity"] = s.opacity;
      box.append(svg("path", attrs));
      if (s.dots || good.length === 1) {
        for (const p of good) box.append(svg("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color}));
      }
      if (!s.hideLegend) legend.append(LK.el("li", {}, LK.el("i", {style: "background:" + color}), s.name));
      const last = good[good.length - 1];
      summary.push(`${s.name}: ${good.length} points, last ${LK.fmt(last[1], 3)} at ${xLabel || "x"} ${LK.fmt(last[0], 3)}`);
    });
    box.setAttribute("aria-label", title + ". " + summary.slice(0, 8).join("; "));
    fig.append(legend);
    return fig;
  };
})();
